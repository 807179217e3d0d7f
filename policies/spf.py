"""SPF (RFC 7208) for the MAIL FROM and HELO identities, with pyspf over our resolver.

pyspf is synchronous. Each evaluation runs in a worker thread of a small pool
owned by this policy; every DNS lookup pyspf makes is handed back to the event
loop (``asyncio.run_coroutine_threadsafe``) on the gateway's one resolver, so
the cache, negative caching and SERVFAIL -> ``temperror`` apply (RFC 7208
§5/§4.4). The whole evaluation has its own deadline; when it passes, the
worker's next lookup fails fast and the result is ``temperror``.

pyspf's DNS hook (``spf.DNSLookup``) is module-global, so it is replaced once
by a dispatcher that finds the lookup function bound to the current worker
thread. pyspf itself enforces the §4.6.4 limits (10 DNS-querying terms,
2 void lookups -> ``permerror``), macros (§7), ``exp=`` (§6.2), ``redirect=``
(§6.1), ``ptr`` (§5.5) and IPv6.

SPF never rejects on its own: RFC 9989 (DMARC) advises against acting on an
SPF ``fail`` before DMARC has evaluated, since a DKIM-aligned message must
still pass. A ``temperror`` only tempfails when the operator asks for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import threading
import time
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
    Services,
    Symbol,
    SymbolDef,
)
from policies._authcommon import printable, valid_domain

__all__ = ["SPFOptions", "SPFOutcome", "SPFPolicy", "evaluate_spf"]

log = logging.getLogger("gateway.policies.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# -- pyspf's DNS hook ---------------------------------------------------------

_bound = threading.local()

DNSRecord = tuple[tuple[str, str], Any]


def _dispatch_lookup(name: str, qtype: str, *_args: Any, **_kwargs: Any) -> list[DNSRecord]:
    """Installed as ``spf.DNSLookup``: route to the lookup bound to this thread."""
    lookup: Callable[[str, str], list[DNSRecord]] | None = getattr(_bound, "lookup", None)
    if lookup is None:
        raise spf.TempError("DNS: no resolver bound to this SPF evaluation")
    return lookup(name, qtype)


spf.DNSLookup = _dispatch_lookup


class _Bridge:
    """pyspf's DNS function for one evaluation: calls our resolver on the event loop."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop, deadline: float):
        self.resolver = resolver
        self.loop = loop
        self.deadline = deadline
        self.abandoned = threading.Event()
        self.queries = 0

    def __call__(self, name: str, qtype: str) -> list[DNSRecord]:
        if self.abandoned.is_set():
            raise spf.TempError("DNS: SPF evaluation abandoned after its time limit")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise spf.TempError("DNS: SPF evaluation time limit exceeded")
        self.queries += 1
        try:
            fut = asyncio.run_coroutine_threadsafe(self.resolver.query(name, qtype), self.loop)
        except RuntimeError:  # the loop is closing
            raise spf.TempError("DNS: resolver unavailable") from None
        try:
            answer = fut.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise spf.TempError(f"DNS: {name}/{qtype} timed out") from None
        except concurrent.futures.CancelledError:
            raise spf.TempError(f"DNS: {name}/{qtype} cancelled") from None
        except DNSTemporaryError as exc:
            raise spf.TempError(f"DNS: {printable(str(exc))}") from None
        except DNSError:
            return []
        key = (name.lower().rstrip("."), qtype)
        out: list[DNSRecord] = []
        for rec in answer.records:
            if qtype in ("TXT", "SPF"):
                out.append((key, [rec.encode("utf-8", "surrogateescape")]))
            elif qtype == "MX":
                pref, _, exchange = rec.partition(" ")
                try:
                    out.append((key, (int(pref), exchange)))
                except ValueError:
                    continue
            else:  # A, AAAA (address text), PTR (target name)
                out.append((key, rec))
        return out


def _run_query(bridge: _Bridge, ip: str, sender: str, helo: str, receiver: str) -> tuple[str, str]:
    """In a worker thread: one pyspf evaluation with DNS bound to ``bridge``."""
    _bound.lookup = bridge
    try:
        q = spf.query(i=ip, s=sender, h=helo, receiver=receiver, strict=True)
        result, _code, explanation = q.check()
        return str(result), str(explanation or "")
    except Exception as exc:  # pyspf on hostile input: an answer, never a crash
        log.warning("spf_evaluation_failed", extra={"error": type(exc).__name__})
        return "permerror", f"SPF evaluation error: {type(exc).__name__}"
    finally:
        _bound.lookup = None


@dataclass(frozen=True, slots=True)
class SPFOutcome:
    """One identity's result (RFC 7208 §2.6) and its evidence."""

    identity: str  # "mailfrom" or "helo"
    domain: str
    result: str
    detail: str


async def evaluate_spf(
    resolver: Resolver,
    executor: concurrent.futures.Executor,
    *,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    limit: float,
) -> tuple[str, str]:
    """(result, explanation) for one identity, never longer than ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    bridge = _Bridge(resolver, loop, time.monotonic() + limit)
    cfut = executor.submit(_run_query, bridge, ip, sender, helo, receiver)
    try:
        async with asyncio.timeout(limit):
            return await asyncio.wrap_future(cfut)
    except TimeoutError:
        bridge.abandoned.set()
        cfut.cancel()
        return "temperror", f"SPF evaluation exceeded {limit}s"
    except BaseException:
        bridge.abandoned.set()
        cfut.cancel()
        raise


# -- the policy ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SPFOptions:
    check_helo: bool = True  # also evaluate the HELO identity (RFC 7208 §2.3)
    check_timeout: float = 8.0  # one identity's whole evaluation (RFC 7208 §4.6.4 allows a limit)
    tempfail_on_temperror: bool = False  # answer 451 when the MAIL FROM result is temperror
    max_workers: int = 16  # threads running pyspf; each waits on DNS most of the time

    def __post_init__(self) -> None:
        if not 0 < self.check_timeout <= 60:
            raise OptionError(
                "check_timeout", f"must be 0 < seconds <= 60, got {self.check_timeout}"
            )
        if not 1 <= self.max_workers <= 256:
            raise OptionError("max_workers", f"must be 1..256, got {self.max_workers}")


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
    symbols = _symbols()
    Options = SPFOptions

    def __init__(self, options: SPFOptions) -> None:
        super().__init__(options)
        self.options: SPFOptions = options
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.options.max_workers, thread_name_prefix="spf"
            )
        return self._executor

    async def start(self, services: Services) -> None:
        self._pool()

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _one(self, ctx: Context, ip: str, sender: str, helo: str) -> tuple[str, str]:
        return await evaluate_spf(
            ctx.resolver,
            self._pool(),
            ip=ip,
            sender=sender,
            helo=helo,
            receiver=ctx.hostname,
            limit=self.options.check_timeout,
        )

    async def check(self, ctx: Context) -> Result:
        ip = _client_ip(ctx)
        helo = ctx.helo.strip().rstrip(".").lower()
        helo_ok = valid_domain(helo) and not helo.startswith("[")
        null_sender = ctx.mail_from.strip("<> ") == ""
        if null_sender:
            # RFC 7208 §2.4: the MAIL FROM identity of a bounce is postmaster@HELO.
            sender, mf_domain = (f"postmaster@{helo}", helo) if helo_ok else ("", "")
        else:
            sender = ctx.mail_from.strip().strip("<>")
            local, at, domain = sender.rpartition("@")
            mf_domain = domain.rstrip(".").lower() if at else sender.rstrip(".").lower()
            if not at or not local:
                sender = f"postmaster@{mf_domain}"  # RFC 7208 §4.3: no local-part

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
