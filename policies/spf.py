"""SPF (RFC 7208) for the MAIL FROM and HELO identities, with pyspf over our resolver.

pyspf is synchronous and asks for DNS answers as it goes. Instead of parking a
thread on every lookup, an evaluation is *replayed*: pyspf runs on the event
loop with a DNS function that answers only from the records fetched so far;
when it asks for one it does not have, the run stops, the record is fetched
asynchronously through the gateway's one resolver (cache, negative caching,
SERVFAIL/timeout -> ``temperror``, RFC 7208 §4.4/§5), and pyspf runs again
from the start. Runs are deterministic given the answers, so the last run is
exactly pyspf's verdict; each run is CPU-only and short (no blocking call on
the loop), the number of runs is bounded, and the whole evaluation has its own
deadline. No thread pool, so a domain whose DNS never answers cannot starve
other evaluations.

pyspf's DNS hook (``spf.DNSLookup``) is module-global: it is replaced once by a
dispatcher to the answers of the run in progress (runs never interleave: they
contain no ``await``). pyspf enforces the §4.6.4 limits (10 DNS-querying
terms, 2 void lookups -> ``permerror``), macros (§7), ``exp=`` (§6.2),
``redirect=`` (§6.1), ``ptr`` (§5.5) and IPv6.

SPF never rejects on its own: RFC 9989 (DMARC) advises against acting on an
SPF ``fail`` before DMARC has evaluated, since a DKIM-aligned message must
still pass. A ``temperror`` only tempfails when the operator asks for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf

from gateway.api import (
    Action,
    AuthResult,
    Context,
    DNSError,
    DNSTemporaryError,
    OptionError,
    Policy,
    Resolver,
    Result,
    Symbol,
    SymbolDef,
)
from policies._authcommon import ascii_domain, printable, valid_domain

__all__ = ["SPFOptions", "SPFOutcome", "SPFPolicy", "evaluate_spf"]

log = logging.getLogger("gateway.policies.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# A run stops at each answer it lacks; pyspf's own limits (§4.6.4: 10 terms,
# each MX/PTR name list capped at 10) keep real evaluations far below this.
MAX_RUNS = 150

# -- pyspf's DNS hook ---------------------------------------------------------

DNSRecord = tuple[tuple[str, str], Any]
_current = threading.local()


class _NeedAnswer(Exception):
    """Raised inside pyspf when a run asks for a record not fetched yet."""


def _dispatch_lookup(name: str, qtype: str, *_args: Any, **_kwargs: Any) -> list[DNSRecord]:
    """Installed as ``spf.DNSLookup``: answer from the run in progress."""
    answers: Callable[[str, str], list[DNSRecord]] | None = getattr(_current, "answers", None)
    if answers is None:
        raise spf.TempError("DNS: no resolver bound to this SPF evaluation")
    return answers(name, qtype)


spf.DNSLookup = _dispatch_lookup


class _Answers:
    """The DNS answers of one evaluation, in pyspf's format; records what is missing."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], list[DNSRecord] | str] = {}  # str: temperror text
        self.missing: list[tuple[str, str]] = []
        self.queries = 0

    def __call__(self, name: str, qtype: str) -> list[DNSRecord]:
        key = (name.lower().rstrip("."), qtype.upper())
        found = self.known.get(key)
        if found is None:
            if key not in self.missing:
                self.missing.append(key)
            raise _NeedAnswer
        if isinstance(found, str):
            raise spf.TempError(found)
        return found

    async def fetch(self, resolver: Resolver) -> None:
        for name, qtype in self.missing:
            self.queries += 1
            try:
                answer = await resolver.query(name, qtype)
            except DNSTemporaryError as exc:
                self.known[(name, qtype)] = f"DNS: {printable(str(exc))}"
                continue
            except DNSError:
                self.known[(name, qtype)] = []
                continue
            key = (name, qtype)
            out: list[DNSRecord] = []
            for rec in answer.records:
                if qtype in ("TXT", "SPF"):
                    out.append((key, [rec.encode("utf-8", "surrogateescape")]))
                elif qtype == "MX":
                    pref, _, exchange = rec.partition(" ")
                    if pref.isdigit():
                        out.append((key, (int(pref), exchange)))
                else:  # A, AAAA (address text), PTR (target name)
                    out.append((key, rec))
            self.known[key] = out
        self.missing.clear()


def _run(answers: _Answers, ip: str, sender: str, helo: str, receiver: str) -> tuple[str, str]:
    """One synchronous pyspf run over the answers known so far."""
    _current.answers = answers
    try:
        q = spf.query(i=ip, s=sender, h=helo, receiver=receiver, strict=True)
        result, _code, explanation = q.check()
        return str(result), str(explanation or "")
    except _NeedAnswer:
        return "", ""
    except Exception as exc:  # pyspf on hostile input: an answer, never a crash
        log.warning("spf_evaluation_failed", extra={"error": type(exc).__name__})
        return "permerror", f"SPF evaluation error: {type(exc).__name__}"
    finally:
        _current.answers = None


@dataclass(frozen=True, slots=True)
class SPFOutcome:
    """One identity's result (RFC 7208 §2.6) and its evidence."""

    identity: str  # "mailfrom" or "helo"
    domain: str
    result: str
    detail: str


async def evaluate_spf(
    resolver: Resolver, *, ip: str, sender: str, helo: str, receiver: str, limit: float
) -> tuple[str, str]:
    """(result, explanation) for one identity, never longer than ``limit`` seconds."""
    answers = _Answers()
    try:
        async with asyncio.timeout(limit):
            for _ in range(MAX_RUNS):
                result, explanation = _run(answers, ip, sender, helo, receiver)
                # A swallowed _NeedAnswer (pyspf ignores errors fetching exp=) also replays.
                if not answers.missing:
                    return result, explanation
                await answers.fetch(resolver)
    except TimeoutError:
        return "temperror", f"SPF evaluation exceeded {limit}s"
    return "permerror", f"SPF evaluation needed more than {MAX_RUNS} DNS lookups"


# -- the policy ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SPFOptions:
    check_helo: bool = True  # also evaluate the HELO identity (RFC 7208 §2.3)
    check_timeout: float = 8.0  # one identity's whole evaluation (RFC 7208 §4.6.4 allows a limit)
    tempfail_on_temperror: bool = False  # answer 451 when the MAIL FROM result is temperror

    def __post_init__(self) -> None:
        if not 0 < self.check_timeout <= 60:
            raise OptionError(
                "check_timeout", f"must be 0 < seconds <= 60, got {self.check_timeout}"
            )


def _symbols() -> dict[str, SymbolDef]:
    mf = {
        "pass": (-0.2, "SPF: the client is authorized for the MAIL FROM domain"),
        "fail": (1.0, "SPF: the MAIL FROM domain says this client is not authorized (-all)"),
        "softfail": (0.5, "SPF: the MAIL FROM domain discourages this client (~all)"),
        "neutral": (0.0, "SPF: the MAIL FROM domain asserts nothing about this client (?all)"),
        "none": (0.0, "SPF: no SPF record for the MAIL FROM domain, or no usable domain"),
        "temperror": (0.0, "SPF: temporary DNS error while checking the MAIL FROM domain"),
        "permerror": (0.5, "SPF: the MAIL FROM domain's SPF record is broken or over limits"),
    }
    helo = {
        "pass": (0.0, "SPF: the client is authorized for its HELO name"),
        "fail": (0.5, "SPF: the HELO name's domain says this client is not authorized"),
        "softfail": (0.2, "SPF: the HELO name's domain discourages this client"),
        "neutral": (0.0, "SPF: the HELO name's domain asserts nothing about this client"),
        "none": (0.0, "SPF: no SPF record for the HELO name, or HELO is not a domain"),
        "temperror": (0.0, "SPF: temporary DNS error while checking the HELO name"),
        "permerror": (0.0, "SPF: the HELO name's SPF record is broken or over limits"),
    }
    out = {f"SPF_{r.upper()}": SymbolDef(*mf[r]) for r in RESULTS}
    out.update({f"SPF_HELO_{r.upper()}": SymbolDef(*helo[r]) for r in RESULTS})
    return out


def _client_ip(ctx: Context) -> str | None:
    addr = ctx.client_address
    if addr is None:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class SPFPolicy(Policy):
    """SPF for MAIL FROM (or postmaster@HELO for the null sender) and for HELO."""

    name = "spf"
    auth_results = {"spf": RESULTS}  # RFC 7208 §2.6, RFC 8601 §2.7.2
    symbols = _symbols()
    Options = SPFOptions

    def __init__(self, options: SPFOptions) -> None:
        super().__init__(options)
        self.options: SPFOptions = options

    async def _one(self, ctx: Context, ip: str, sender: str, helo: str) -> tuple[str, str]:
        return await evaluate_spf(
            ctx.resolver,
            ip=ip,
            sender=sender,
            helo=helo,
            receiver=ctx.hostname,
            limit=self.options.check_timeout,
        )

    async def check(self, ctx: Context) -> Result:
        ip = _client_ip(ctx)
        helo = ascii_domain(ctx.helo)
        helo_ok = valid_domain(helo) and not helo.startswith("[")
        null_sender = ctx.mail_from.strip("<> ") == ""
        if null_sender:
            # RFC 7208 §2.4: the MAIL FROM identity of a bounce is postmaster@HELO.
            sender, mf_domain = (f"postmaster@{helo}", helo) if helo_ok else ("", "")
        else:
            sender = ctx.mail_from.strip().strip("<>")
            local, at, domain = sender.rpartition("@")
            mf_domain = ascii_domain(domain if at else sender)
            # RFC 7208 §4.3: no local-part means "postmaster"; the domain as an A-label.
            sender = f"{local if at and local else 'postmaster'}@{mf_domain}"

        async def mailfrom() -> SPFOutcome:
            if ip is None:
                return SPFOutcome("mailfrom", mf_domain, "none", "no client IP address")
            if not valid_domain(mf_domain):
                # RFC 7208 §4.3: a malformed or single-label domain yields "none".
                return SPFOutcome("mailfrom", mf_domain, "none", "no usable MAIL FROM domain")
            res, why = await self._one(ctx, ip, sender, helo if helo_ok else "unknown")
            return SPFOutcome("mailfrom", mf_domain, res, why)

        async def helo_check() -> SPFOutcome:
            if ip is None:
                return SPFOutcome("helo", helo, "none", "no client IP address")
            if not helo_ok:
                # RFC 7208 §2.3: a HELO that is not a domain name has no SPF result.
                return SPFOutcome("helo", helo, "none", "HELO is not a domain name")
            res, why = await self._one(ctx, ip, "", helo)
            return SPFOutcome("helo", helo, res, why)

        if null_sender:
            # One evaluation answers both identities (they are the same mailbox).
            h = await helo_check()
            outcomes = [SPFOutcome("mailfrom", mf_domain, h.result, h.detail)]
            if self.options.check_helo:
                outcomes.append(h)
        elif self.options.check_helo:
            outcomes = list(await asyncio.gather(mailfrom(), helo_check()))
        else:
            outcomes = [await mailfrom()]
        return self._result(ctx, outcomes)

    def _result(self, ctx: Context, outcomes: list[SPFOutcome]) -> Result:
        symbols: list[Symbol] = []
        auth: list[AuthResult] = []
        force: Action | None = None
        reason = ""
        for o in outcomes:
            prefix = "SPF_" if o.identity == "mailfrom" else "SPF_HELO_"
            what = printable(o.domain, 100) or "(none)"
            detail = printable(f"{what}: {o.detail}" if o.detail else what)
            symbols.append(Symbol(prefix + o.result.upper(), detail=detail))
            if o.identity == "mailfrom":
                null_sender = ctx.mail_from.strip("<> ") == ""
                if null_sender:
                    value = f"postmaster@{what}" if o.domain else "<>"
                else:
                    # RFC 8601 §2.7.2: the domain; the address as given when it has none.
                    value = what if o.domain else printable(ctx.mail_from, 100) or "<>"
                auth.append(AuthResult("spf", o.result, properties=(("smtp.mailfrom", value),)))
                if o.result == "temperror" and self.options.tempfail_on_temperror:
                    force = Action.TEMPFAIL
                    reason = f"SPF check for {what} failed temporarily (DNS)"
            elif o.domain:  # no HELO name at all (scan without --helo): nothing to report
                auth.append(AuthResult("spf", o.result, properties=(("smtp.helo", what),)))
        return Result(symbols=tuple(symbols), force=force, reason=reason, auth=tuple(auth))
