"""ARC chain validation (RFC 8617) with dkimpy, over the gateway's resolver.

Not a policy of its own: the ``dmarc`` policy validates the chain (option
``arc``, on by default), reports ``arc=pass|fail|none`` and uses the chain
only to override a DMARC failure for sealers the operator trusts
(``trusted_arc_sealers``). One policy keeps the dependency simple: DMARC
never needs a second table enabled to read ARC.

As for DKIM, the ARC-Seal and ARC-Message-Signature keys of every instance
are fetched first through our resolver, then dkimpy validates in a worker
thread with those answers only.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import authres
import dkim
from dkim.util import parse_tag_value

from gateway.api import AuthResult, Context
from policies._authcommon import (
    KeyAnswer,
    auth_fields,
    fetch_keys,
    header_block,
    key_dnsfunc,
    key_name,
    printable,
)

__all__ = ["ARCOutcome", "RecordedResult", "verify_arc"]

log = logging.getLogger("gateway.policies.arc")

MAX_INSTANCES = 50  # RFC 8617 §4.2.1: i= is 1..50
# Each ARC set's message signature hashes the body again: past this many body
# bytes in total the chain is not validated (arc=fail), bounding CPU per message.
VERIFY_BUDGET_BYTES = 100_000_000


@dataclass(frozen=True, slots=True)
class RecordedResult:
    """One result a sealer recorded in its ARC-Authentication-Results."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...]

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.properties if k == name), None)


@dataclass(frozen=True, slots=True)
class ARCOutcome:
    """The chain validation status (RFC 8617 §5.2) and what the latest sealer said."""

    result: str  # "pass", "fail" or "none"
    reason: str
    instances: int = 0
    sealer: str = ""  # d= of the latest ARC-Seal
    recorded: tuple[RecordedResult, ...] = ()  # from the latest ARC-Authentication-Results
    temperror: bool = False

    def auth(self, client_ip: str | None) -> AuthResult:
        props = (("smtp.remote-ip", client_ip),) if client_ip else ()  # RFC 8617 §10.1
        reason = self.reason
        if self.result == "pass":
            reason = f"{self.instances} ARC set(s), latest sealer {self.sealer}"
        return AuthResult("arc", self.result, reason=reason, properties=props)


def _arc_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in auth_fields(raw) if k != b"dkim-signature"]


def _tags(value: bytes) -> dict[bytes, bytes]:
    """Tag list of an ARC field; empty when malformed (dkimpy then fails the chain)."""
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except Exception:  # InvalidTagValueList and whatever else hostile bytes provoke
        return {}
    return tags


def _instance(value: bytes) -> int:
    m = re.match(rb"\s*i\s*=\s*(\d{1,3})\s*;", value)
    return int(m.group(1)) if m else 0


def _recorded(aar: bytes) -> tuple[str, tuple[RecordedResult, ...]]:
    """(authserv-id, results) of an ARC-Authentication-Results value; empty when unparseable."""
    text = aar.decode("utf-8", "replace")
    text = re.sub(r"^\s*i\s*=\s*\d+\s*;", "", text)
    try:
        header = authres.all_features().parse_value(text)
    except Exception:  # authres raises its own SyntaxError and others on hostile input
        return "", ()
    results = []
    for r in header.results:
        props = tuple(
            (f"{p.type}.{p.name}".lower(), str(p.value).lower().strip("<>")) for p in r.properties
        )
        results.append(RecordedResult(str(r.method).lower(), str(r.result).lower(), props))
    return str(header.authserv_id).lower(), tuple(results)


@dataclass(frozen=True, slots=True)
class _Validation:
    result: str
    reason: str
    sealer: str = ""  # d= of the latest ARC-Seal, as dkimpy validated it
    aar: bytes = b""  # the latest ARC-Authentication-Results, as dkimpy read it


def _validate(raw: bytes, keys: dict[str, KeyAnswer], min_key_bits: int) -> _Validation:
    """CPU-bound dkimpy validation (worker thread)."""
    try:
        cv, data, reason = dkim.ARC(raw, minkey=min_key_bits, logger=log).verify(
            dnsfunc=key_dnsfunc(keys)
        )
    except Exception as exc:  # DKIMException and parse errors on hostile headers
        return _Validation("fail", printable(f"{type(exc).__name__}: {exc}", 120))
    if cv == dkim.CV_Pass:
        # data[0] is the highest instance: the sealer and results the override may trust
        # come from what dkimpy validated, never from a separate scan of the header.
        latest = data[0]
        sealer = printable(latest.get("as-domain", b""), 100).lower().rstrip(".")
        return _Validation("pass", "", sealer, latest.get("aar-value", b""))
    if cv == dkim.CV_None:
        return _Validation("none", printable(reason, 120))
    return _Validation("fail", printable(reason or "chain terminated", 120))


async def verify_arc(ctx: Context, min_key_bits: int = 1024) -> ARCOutcome:
    """Validate the ARC chain of ``ctx.raw``."""
    fields = _arc_fields(ctx.raw)
    if not fields:
        return ARCOutcome("none", "")
    seals = [v for k, v in fields if k == b"arc-seal"]
    instances = max((_instance(v) for v in seals), default=0)
    if len(seals) > MAX_INSTANCES or instances > MAX_INSTANCES:
        return ARCOutcome("fail", f"more than {MAX_INSTANCES} ARC sets", instances)
    body = len(ctx.raw) - len(header_block(ctx.raw))
    if instances * body > VERIFY_BUDGET_BYTES:
        return ARCOutcome(
            "fail", f"{instances} ARC sets on a {body}-byte body: too costly", instances
        )
    names: list[str] = []
    for k, v in fields:
        if k == b"arc-authentication-results":
            continue
        tags = _tags(v)
        name = key_name(tags.get(b"s", b""), tags.get(b"d", b""))
        if name:
            names.append(name)
    keys = await fetch_keys(ctx.resolver, names)
    temp = [a for a in keys.values() if a.temperror]
    if temp:
        # RFC 8617 defines no temperror for arc=; the chain cannot be trusted right now.
        reason = f"key lookup failed temporarily: {temp[0].name}"
        return ARCOutcome("fail", reason, instances, temperror=True)
    checked = await asyncio.to_thread(_validate, ctx.raw, keys, min_key_bits)
    recorded = _recorded(checked.aar)[1] if checked.result == "pass" else ()
    return ARCOutcome(checked.result, checked.reason, instances, checked.sealer, recorded)
