"""The gateway's one async, caching resolver (dnspython).

- NXDOMAIN and NODATA are answers, cached for the SOA's negative TTL (RFC 2308).
- SERVFAIL, REFUSED, timeouts and network errors raise DNSTemporaryError, so
  SPF and DMARC report ``temperror`` instead of ``none``; they are not cached.
- Identical lookups in flight at once share one query (DNSBL and URI checks
  fan out to the same names).
- The cache is bounded (LRU) and respects TTLs, clamped to [min_ttl, max_ttl].
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import dns.asyncresolver
import dns.exception
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.api import DNSAnswer, DNSError, DNSTemporaryError
from gateway.config import DNSConfig, parse_hostport
from gateway.metrics import DNS_QUERIES

__all__ = ["CachingResolver"]

_SUPPORTED = {"A", "AAAA", "TXT", "MX", "PTR", "NS", "CNAME", "SOA", "SPF"}


def _negative_ttl(response: dns.message.Message | None, cap: float) -> float:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return cap
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum, cap))
    return cap


def _text(rdtype: str, rdata: object) -> str:
    if rdtype in ("TXT", "SPF"):
        strings: list[bytes] = rdata.strings  # type: ignore[attr-defined]
        return b"".join(strings).decode("utf-8", "replace")
    if rdtype == "MX":
        exchange = str(rdata.exchange).rstrip(".")  # type: ignore[attr-defined]
        return f"{rdata.preference} {exchange}"  # type: ignore[attr-defined]
    if rdtype in ("PTR", "NS", "CNAME"):
        return str(rdata.target).rstrip(".")  # type: ignore[attr-defined]
    return str(rdata)


class CachingResolver:
    """Implements ``gateway.api.Resolver``."""

    def __init__(self, config: DNSConfig) -> None:
        self.config = config
        if config.nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in config.nameservers:
                host, port = parse_hostport(ns, default_port=53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            res.nameservers = servers
        else:
            res = dns.asyncresolver.Resolver()
        res.lifetime = config.timeout
        res.timeout = config.timeout
        res.cache = None
        self._resolver = res
        self._cache: OrderedDict[tuple[str, str], tuple[float, DNSAnswer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[DNSAnswer]] = {}
        self.hits = 0
        self.misses = 0

    async def query(self, name: str, rdtype: str) -> DNSAnswer:
        qname = name.rstrip(".").lower()
        qtype = rdtype.upper()
        if qtype not in _SUPPORTED:
            raise DNSError(f"unsupported record type {rdtype}")
        if (
            not qname
            or len(qname) > 253
            or any(len(lbl) > 63 or not lbl for lbl in qname.split("."))
        ):
            # An impossible name (from hostile input) cannot exist: NXDOMAIN without a query.
            return DNSAnswer(qname, qtype, (), nxdomain=True)
        key = (qname, qtype)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None:
            if cached[0] > now:
                self._cache.move_to_end(key)
                self.hits += 1
                DNS_QUERIES.labels(result="hit").inc()
                return cached[1]
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            self.hits += 1
            DNS_QUERIES.labels(result="hit").inc()
            return await asyncio.shield(pending)
        self.misses += 1
        fut: asyncio.Future[DNSAnswer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            answer = await self._lookup(qname, qtype)
            DNS_QUERIES.labels(result="nxdomain" if answer.nxdomain else "miss").inc()
        except BaseException as exc:
            if isinstance(exc, DNSTemporaryError):
                DNS_QUERIES.labels(result="temperror").inc()
            if not fut.done():
                fut.set_exception(
                    exc if isinstance(exc, Exception) else DNSTemporaryError("cancelled")
                )
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            fut.set_result(answer)
            self._store(key, answer)
            return answer
        finally:
            self._inflight.pop(key, None)

    def _store(self, key: tuple[str, str], answer: DNSAnswer) -> None:
        if self.config.cache_size <= 0:
            return
        ttl = max(self.config.min_ttl, min(answer.ttl, self.config.max_ttl))
        if ttl <= 0:
            return
        self._cache[key] = (time.monotonic() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, qname: str, qtype: str) -> DNSAnswer:
        try:
            ans = await self._resolver.resolve(
                qname + ".", qtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            resp = next(iter(responses.values()), None) if responses else None
            return DNSAnswer(
                qname, qtype, (), nxdomain=True, ttl=_negative_ttl(resp, self.config.negative_ttl)
            )
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DNSTemporaryError(f"{qname}/{qtype}: {type(exc).__name__}") from None
        except dns.resolver.YXDOMAIN:
            return DNSAnswer(qname, qtype, (), nxdomain=True)
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSTemporaryError(f"{qname}/{qtype}: {type(exc).__name__}") from None
        if ans.rrset is None:
            return DNSAnswer(
                qname, qtype, (), ttl=_negative_ttl(ans.response, self.config.negative_ttl)
            )
        records = tuple(_text(qtype, r) for r in ans.rrset)
        return DNSAnswer(qname, qtype, records, ttl=float(ans.rrset.ttl))
