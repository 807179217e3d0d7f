"""DKIM (RFC 6376, RFC 8301, RFC 8463) with dkimpy: every signature, each its own result.

Key records are fetched first, concurrently, through the gateway's resolver
(``policies._authcommon.fetch_keys``); then dkimpy verifies each signature in
a worker thread (RSA and canonicalization are CPU-bound) with a DNS function
that only reads those answers. A SERVFAIL or timeout on a key is
``temperror``; a missing or malformed key is ``permerror`` (RFC 6376 §6.1.2);
a bad signature or body hash is ``fail``.

RFC 8301: RSA keys under 1024 bits and ``rsa-sha1`` are not acceptable, so such
signatures ``fail`` with a symbol saying why. An ``l=`` tag that leaves part of
the body unsigned (RFC 6376 §8.2) passes but is flagged: content can have
been appended after signing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import parse_tag_value

from gateway.api import AuthResult, Context, OptionError, Policy, Result, Symbol, SymbolDef
from policies._authcommon import (
    KeyAnswer,
    auth_fields,
    fetch_keys,
    key_dnsfunc,
    key_name,
    printable,
    same_field,
)

__all__ = ["DKIMOptions", "DKIMPolicy", "SignatureResult", "verify_signatures"]

log = logging.getLogger("gateway.policies.dkim")

# Body bytes canonicalized and hashed per message, over all signatures: each
# signature hashes the body again, so ten signatures on a 25 MB message would
# cost seconds of CPU. Signatures past the budget are not verified ("policy").
VERIFY_BUDGET_BYTES = 100_000_000
# Up to this many body bytes x signatures, verification runs on the event loop (about
# 1-2 ms per signature); bigger work goes to a worker thread so the loop stays responsive.
INLINE_BYTES = 16_000


@dataclass(frozen=True, slots=True)
class DKIMOptions:
    max_signatures: int = 10  # verify at most this many DKIM-Signature fields (cost bound)
    min_key_bits: int = 1024  # RFC 8301 §3.2: RSA keys under 1024 bits MUST NOT be accepted

    def __post_init__(self) -> None:
        if not 1 <= self.max_signatures <= 50:
            raise OptionError("max_signatures", f"must be 1..50, got {self.max_signatures}")
        if not 1024 <= self.min_key_bits <= 8192:
            raise OptionError(
                "min_key_bits", f"must be 1024..8192 (RFC 8301), got {self.min_key_bits}"
            )


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """One DKIM-Signature's outcome (RFC 8601 §2.7.1 result values)."""

    result: str  # pass fail policy temperror permerror
    domain: str
    selector: str
    algorithm: str
    identity: str
    b_prefix: str  # first characters of b= to tell signatures apart (RFC 6008)
    reason: str
    flags: tuple[str, ...] = ()  # extra symbols: DKIM_KEY_TOO_SMALL, DKIM_BODY_LENGTH_LIMITED ...

    def auth(self) -> AuthResult:
        props: list[tuple[str, str]] = []
        if self.domain:
            props.append(("header.d", self.domain))
        if self.identity:
            props.append(("header.i", self.identity))
        if self.selector:
            props.append(("header.s", self.selector))
        if self.algorithm:
            props.append(("header.a", self.algorithm))
        if self.b_prefix:
            props.append(("header.b", self.b_prefix))
        return AuthResult("dkim", self.result, reason=self.reason, properties=tuple(props))


@dataclass(frozen=True, slots=True)
class _Parsed:
    index: int
    tags: dict[bytes, bytes]
    key: str | None  # key record name
    error: str  # set when the signature is malformed (permerror)
    value: bytes = b""  # the field value as scanned, cross-checked against dkimpy's parse


def _text(tags: dict[bytes, bytes], tag: bytes, limit: int = 100) -> str:
    return printable(re.sub(rb"\s+", b"", tags.get(tag, b"")), limit)


def _parse(index: int, value: bytes) -> _Parsed:
    parsed = _parse_tags(index, value)
    return _Parsed(parsed.index, parsed.tags, parsed.key, parsed.error, value)


def _parse_tags(index: int, value: bytes) -> _Parsed:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except Exception as exc:  # InvalidTagValueList and whatever else hostile bytes provoke
        return _Parsed(index, {}, None, f"malformed signature: {printable(str(exc), 80)}")
    try:
        dkim.validate_signature_fields(tags)
    except dkim.DKIMException as exc:
        # Missing tags, bad syntax, expired (x=), i= outside d=: RFC 6376 §6.1.1 PERMFAIL.
        return _Parsed(index, tags, None, printable(str(exc), 120))
    except Exception as exc:  # dkimpy slips on some values (IndexError for i= equal to d=)
        return _Parsed(index, tags, None, printable(f"malformed signature: {exc!r}", 120))
    name = key_name(tags[b"s"], tags[b"d"])
    if name is None:
        return _Parsed(index, tags, None, "d= or s= is not a valid domain name")
    return _Parsed(index, tags, name, "")


def _result(p: _Parsed, result: str, reason: str, flags: tuple[str, ...] = ()) -> SignatureResult:
    b = re.sub(rb"\s+", b"", p.tags.get(b"b", b""))
    return SignatureResult(
        result=result,
        domain=_text(p.tags, b"d").lower().rstrip("."),
        selector=_text(p.tags, b"s"),
        algorithm=_text(p.tags, b"a"),
        identity=_text(p.tags, b"i"),
        b_prefix=printable(b[:8]),
        reason=reason,
        flags=flags,
    )


def _body_length_flag(verifier: Any, tags: dict[bytes, bytes]) -> bool:
    """True when l= covers less than the canonicalized body (RFC 6376 §8.2)."""
    if b"l" not in tags:
        return False
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        body = policy.canonicalize_body(verifier.body)
        return int(tags[b"l"]) < len(body)
    except (InvalidCanonicalizationPolicyError, ValueError):
        return False


def _verifier(raw: bytes, min_key_bits: int) -> Any:
    """``dkim.DKIM(raw)`` without dkimpy splitting and re-joining the whole body.

    dkimpy's ``rfc822_parse`` splits the message at every line end and joins the
    body again with CRLF: on a 2 MB attachment that was most of DKIM's cost.
    When every line already ends in CRLF (as SMTP delivers it) that body is the
    bytes after the first empty line, unchanged, so only the header section is
    parsed; anything else (bare LF, no body) takes dkimpy's own path.
    """
    end = raw.find(b"\r\n\r\n")
    if end > 0 and not raw.startswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n"):
        verifier = dkim.DKIM(raw[: end + 4], minkey=min_key_bits, logger=log)
        verifier.body = raw[end + 4 :]
        return verifier
    return dkim.DKIM(raw, minkey=min_key_bits, logger=log)


def _verify_all(
    raw: bytes, parsed: list[_Parsed], keys: dict[str, KeyAnswer], min_key_bits: int
) -> list[SignatureResult]:
    """CPU-bound part, run in a worker thread; DNS answers come from ``keys`` only."""
    out: list[SignatureResult] = []
    try:
        verifier = _verifier(raw, min_key_bits)
    except (dkim.DKIMException, IndexError) as exc:  # IndexError: a leading continuation line
        reason = f"message cannot be parsed: {printable(str(exc), 80)}"
        return [_result(p, "permerror", reason) for p in parsed]
    dnsfunc = key_dnsfunc(keys)
    seen = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    spent = 0
    for p in parsed:
        if p.error:
            out.append(_result(p, "permerror", p.error))
            continue
        if p.index >= len(seen) or not same_field(seen[p.index], p.value):
            # Our scan and dkimpy's parse disagree (hostile folding): never report a
            # result for one signature that was computed for another.
            out.append(_result(p, "permerror", "signature field is ambiguous"))
            continue
        assert p.key is not None
        answer = keys.get(p.key)
        if answer is not None and answer.temperror:
            out.append(_result(p, "temperror", f"key lookup: {answer.temperror}"))
            continue
        if answer is None or answer.record is None:
            out.append(_result(p, "permerror", f"no key at {p.key}"))
            continue
        try:
            _pk, keysize, ktag, _tls = dkim.evaluate_pk(p.key, answer.record)
        except Exception as exc:  # KeyFormatError, binascii errors, ASN.1 errors on hostile keys
            out.append(_result(p, "permerror", f"unusable key: {printable(str(exc), 80)}"))
            continue
        algorithm = p.tags.get(b"a", b"")
        if algorithm == b"rsa-sha1":
            out.append(_result(p, "fail", "rsa-sha1 is not acceptable (RFC 8301)", ("DKIM_SHA1",)))
            continue
        if ktag == b"rsa" and keysize is not None and keysize < min_key_bits:
            reason = f"RSA key of {keysize} bits is under {min_key_bits} (RFC 8301)"
            out.append(_result(p, "fail", reason, ("DKIM_KEY_TOO_SMALL",)))
            continue
        cost = len(verifier.body)
        if b"l" in p.tags:
            cost = min(cost, int(p.tags[b"l"] or b"0"))
        if spent + cost > VERIFY_BUDGET_BYTES:
            reason = f"not verified: over the {VERIFY_BUDGET_BYTES} byte verification budget"
            out.append(_result(p, "policy", reason))
            continue
        spent += cost
        try:
            ok = verifier.verify(idx=p.index, dnsfunc=dnsfunc)
        except dkim.KeyFormatError as exc:
            out.append(_result(p, "fail", printable(str(exc), 80)))
            continue
        except dkim.ValidationError as exc:  # body hash mismatch
            out.append(_result(p, "fail", printable(str(exc).split(" (")[0], 80)))
            continue
        except Exception as exc:  # MessageFormatError, UnknownKeyTypeError, hostile input
            out.append(_result(p, "permerror", printable(f"{type(exc).__name__}: {exc}", 80)))
            continue
        if ok:
            flags = ("DKIM_BODY_LENGTH_LIMITED",) if _body_length_flag(verifier, p.tags) else ()
            out.append(_result(p, "pass", "", flags))
        else:
            out.append(_result(p, "fail", "signature did not verify"))
    return out


def _signature_fields(raw: bytes) -> list[bytes]:
    """The values of the DKIM-Signature fields, top first."""
    return [v for k, v in auth_fields(raw) if k == b"dkim-signature"]


async def verify_signatures(
    ctx: Context, max_signatures: int, min_key_bits: int = 1024
) -> tuple[list[SignatureResult], int]:
    """Results for the first ``max_signatures`` signatures, and the total count."""
    values = _signature_fields(ctx.raw)
    if not values:
        return [], 0  # unsigned: no copy of the message for dkimpy (a 20 MB one costs 20 MB)
    parsed = [_parse(i, v) for i, v in enumerate(values[:max_signatures])]
    keys = await fetch_keys(ctx.resolver, [p.key for p in parsed if p.key])
    if len(ctx.raw) * max(len(parsed), 1) <= INLINE_BYTES:
        # A few milliseconds of CPU: cheaper on the loop than a thread hand-off.
        results = _verify_all(ctx.raw, parsed, keys, min_key_bits)
    else:
        results = await asyncio.to_thread(_verify_all, ctx.raw, parsed, keys, min_key_bits)
    return results, len(values)


_RESULT_SYMBOL = {
    "pass": "DKIM_PASS",
    "fail": "DKIM_FAIL",
    "temperror": "DKIM_TEMPERROR",
    "permerror": "DKIM_PERMERROR",
    "policy": "DKIM_TOO_MANY_SIGNATURES",
}


class DKIMPolicy(Policy):
    """Verifies every DKIM signature (up to ``max_signatures``)."""

    name = "dkim"
    # RFC 8601 §2.7.1
    auth_results = {"dkim": ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")}
    symbols = {
        "DKIM_PASS": SymbolDef(-0.2, "DKIM: a signature verified"),
        "DKIM_FAIL": SymbolDef(1.0, "DKIM: a signature did not verify (altered or forged)"),
        "DKIM_TEMPERROR": SymbolDef(0.0, "DKIM: a key lookup failed temporarily (DNS)"),
        "DKIM_PERMERROR": SymbolDef(0.0, "DKIM: a signature is malformed or has no usable key"),
        "DKIM_NONE": SymbolDef(0.0, "DKIM: the message is not signed"),
        "DKIM_KEY_TOO_SMALL": SymbolDef(0.5, "DKIM: RSA key under 1024 bits (RFC 8301)"),
        "DKIM_SHA1": SymbolDef(0.5, "DKIM: rsa-sha1 signature, not acceptable (RFC 8301)"),
        "DKIM_BODY_LENGTH_LIMITED": SymbolDef(
            1.0, "DKIM: l= leaves part of the body unsigned (content may have been appended)"
        ),
        "DKIM_TOO_MANY_SIGNATURES": SymbolDef(
            0.5, "DKIM: more signatures than max_signatures or the CPU budget; some not checked"
        ),
    }
    Options = DKIMOptions

    def __init__(self, options: DKIMOptions) -> None:
        super().__init__(options)
        self.options: DKIMOptions = options

    async def check(self, ctx: Context) -> Result:
        results, total = await verify_signatures(
            ctx, self.options.max_signatures, self.options.min_key_bits
        )
        if total == 0:
            return Result(
                symbols=(Symbol("DKIM_NONE"),),
                auth=(AuthResult("dkim", "none", reason="message not signed"),),
            )
        details: dict[str, list[str]] = {}
        for r in results:
            who = f"{r.domain or '?'}/{r.selector or '?'}"
            details.setdefault(_RESULT_SYMBOL[r.result], []).append(
                f"{who}: {r.reason}" if r.reason else who
            )
            for flag in r.flags:
                details.setdefault(flag, []).append(who)
        if total > len(results):
            details["DKIM_TOO_MANY_SIGNATURES"] = [f"{total} signatures, checked {len(results)}"]
        # One symbol per kind, evidence joined: two passing signatures are not twice the credit.
        symbols = tuple(Symbol(name, detail=printable("; ".join(d))) for name, d in details.items())
        return Result(symbols=symbols, auth=tuple(r.auth() for r in results))
