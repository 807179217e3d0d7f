"""DNS blocklists: the client IP against IP lists, sender and URL domains against domain lists.

Every lookup of a message runs concurrently through ``ctx.resolver`` under one
deadline (``lookup_timeout``). Answers map to symbols by return code (Spamhaus ZEN's
127.0.0.2/3/4/9/10/11 ...) or by bit (SURBL/URIBL ``multi`` zones). Answers in
127.255.255.0/24 are Spamhaus's "your resolver is blocked / over quota" error
codes: they are not listings, so they become ``DNSBL_BLOCKED_RESOLVER`` (score
0) and the operator learns to use a resolver of their own. A lookup that fails
or times out is ``DNSBL_TEMPFAIL`` (score 0): a blocklist outage never blocks mail.

IP query names (RFC 5782 §2.1, §2.4): IPv4 octets reversed; IPv6 as 32 reversed
nibbles. Domain query names (RFC 5782 §2.3): ``<domain>.<zone>``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from gateway.api import (
    Context,
    DNSError,
    OptionError,
    Policy,
    Result,
    Symbol,
    SymbolDef,
    registrable_domain,
    urls,
)
from policies._mail import from_address

__all__ = ["DNSBLOptions", "DNSBLPolicy", "Zone", "ip_query_name"]

_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_BLOCKED = ipaddress.ip_network("127.255.255.0/24")  # Spamhaus error codes (not listings)
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True, slots=True)
class Zone:
    """One blocklist. ``codes`` maps an answer (``"127.0.0.2"``, or a bit value such as
    ``"8"`` when ``bitmask``) to a symbol; ``scores`` gives a symbol's score (default
    ``score``); an answer in 127/8 that ``codes`` does not name gives ``symbol``."""

    zone: str
    symbol: str
    type: Literal["ip", "domain"] = "ip"
    score: float = 3.0
    codes: Mapping[str, str] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    bitmask: bool = False
    ignore: tuple[str, ...] = ()  # answers that are errors, not listings (DBL 127.0.1.255)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"(?:[a-z0-9-]{1,63}\.)+[a-z0-9-]{1,63}", self.zone.lower()):
            raise OptionError(
                "zone", f"must be a DNS zone like zen.spamhaus.org, got {self.zone!r}"
            )
        for sym in (self.symbol, *self.codes.values(), *self.scores):
            if not _SYMBOL.match(sym):
                raise OptionError("symbol", f"must be an UPPER_SNAKE symbol name, got {sym!r}")
        for code in self.codes:
            if self.bitmask:
                if not code.isdigit() or int(code) not in (1, 2, 4, 8, 16, 32, 64, 128):
                    raise OptionError("codes", f"bitmask codes are bit values 1..128, got {code!r}")
            else:
                try:
                    ipaddress.IPv4Address(code)
                except ValueError:
                    raise OptionError(
                        "codes", f"must be answers like 127.0.0.2, got {code!r}"
                    ) from None

    def symbol_defs(self) -> dict[str, SymbolDef]:
        out = {
            self.symbol: SymbolDef(
                self.scores.get(self.symbol, self.score), f"listed in {self.zone}"
            )
        }
        for code, sym in self.codes.items():
            what = f"bit {code}" if self.bitmask else code
            out[sym] = SymbolDef(
                self.scores.get(sym, self.score), f"listed in {self.zone} ({what})"
            )
        return out

    def symbols_for(self, answers: tuple[str, ...]) -> list[tuple[str, str]]:
        """(symbol, answer) for each listing in ``answers``."""
        out: list[tuple[str, str]] = []
        for answer in answers:
            if answer in self.ignore:
                continue
            try:
                addr = ipaddress.IPv4Address(answer)
            except ValueError:
                continue
            if addr in _BLOCKED:
                out.append(("DNSBL_BLOCKED_RESOLVER", answer))
            elif addr not in _LOOPBACK:
                continue  # not a blocklist answer (a hijacking resolver's wildcard)
            elif self.bitmask:
                bits = int(answer.rsplit(".", 1)[1])
                named = [sym for code, sym in self.codes.items() if bits & int(code)]
                out.extend((sym, answer) for sym in named)
                if not named and bits > 1:
                    out.append((self.symbol, answer))
            else:
                out.append((self.codes.get(answer, self.symbol), answer))
        return out


def _zen() -> Zone:
    return Zone(
        zone="zen.spamhaus.org",
        symbol="RBL_SPAMHAUS",
        score=3.0,
        codes=MappingProxyType(
            {
                "127.0.0.2": "RBL_SPAMHAUS_SBL",
                "127.0.0.3": "RBL_SPAMHAUS_CSS",
                "127.0.0.4": "RBL_SPAMHAUS_XBL",
                "127.0.0.5": "RBL_SPAMHAUS_XBL",
                "127.0.0.6": "RBL_SPAMHAUS_XBL",
                "127.0.0.7": "RBL_SPAMHAUS_XBL",
                "127.0.0.9": "RBL_SPAMHAUS_DROP",
                "127.0.0.10": "RBL_SPAMHAUS_PBL",
                "127.0.0.11": "RBL_SPAMHAUS_PBL",
            }
        ),
        scores=MappingProxyType(
            {
                "RBL_SPAMHAUS_SBL": 4.0,
                "RBL_SPAMHAUS_CSS": 2.0,
                "RBL_SPAMHAUS_XBL": 4.0,
                "RBL_SPAMHAUS_DROP": 6.0,
                "RBL_SPAMHAUS_PBL": 2.0,
            }
        ),
    )


def _dbl() -> Zone:
    return Zone(
        zone="dbl.spamhaus.org",
        symbol="DBL_LISTED",
        type="domain",
        score=3.0,
        codes=MappingProxyType(
            {
                "127.0.1.2": "DBL_SPAM",
                "127.0.1.4": "DBL_PHISH",
                "127.0.1.5": "DBL_MALWARE",
                "127.0.1.6": "DBL_BOTNET",
                "127.0.1.102": "DBL_ABUSED_LEGIT",
                "127.0.1.103": "DBL_ABUSED_LEGIT",
                "127.0.1.104": "DBL_ABUSED_LEGIT",
                "127.0.1.105": "DBL_ABUSED_LEGIT",
                "127.0.1.106": "DBL_ABUSED_LEGIT",
            }
        ),
        scores=MappingProxyType(
            {
                "DBL_SPAM": 4.0,
                "DBL_PHISH": 5.0,
                "DBL_MALWARE": 5.0,
                "DBL_BOTNET": 5.0,
                "DBL_ABUSED_LEGIT": 1.0,
            }
        ),
        ignore=("127.0.1.255",),
    )


@dataclass(frozen=True, slots=True)
class DNSBLOptions:
    zones: tuple[Zone, ...] = field(default_factory=lambda: (_zen(), _dbl()))
    lookup_timeout: float = 2.0  # seconds for all lookups of one message together
    max_domains: int = 20  # sender, From and URL domains looked up per message
    check_urls: bool = True  # look up URL domains (URIBL style) in domain zones
    check_senders: bool = True  # look up the MAIL FROM and From domains in domain zones

    def __post_init__(self) -> None:
        if self.lookup_timeout <= 0:
            raise OptionError(
                "lookup_timeout", f"must be a number of seconds > 0, got {self.lookup_timeout}"
            )
        if self.max_domains < 0:
            raise OptionError("max_domains", f"must be 0 or more, got {self.max_domains}")


FIXED_SYMBOLS: Mapping[str, SymbolDef] = {
    "DNSBL_BLOCKED_RESOLVER": SymbolDef(
        0.0,
        "a blocklist refused our resolver (127.255.255.x): not a listing; "
        "query through a resolver of your own",
    ),
    "DNSBL_TEMPFAIL": SymbolDef(0.0, "a blocklist lookup failed or timed out; not counted"),
}


def ip_query_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """RFC 5782 §2.1 (IPv4 octets reversed) and §2.4 (IPv6 nibbles reversed)."""
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + "." + zone
    nibbles = ip.exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + "." + zone


class DNSBLPolicy(Policy):
    name = "dnsbl"
    symbols = FIXED_SYMBOLS
    Options = DNSBLOptions

    def __init__(self, options: DNSBLOptions) -> None:
        super().__init__(options)
        self.options: DNSBLOptions = options
        self._defs: dict[str, SymbolDef] = {}
        for z in options.zones:
            self._defs.update(z.symbol_defs())

    def rule_symbols(self) -> Mapping[str, SymbolDef]:
        return self._defs

    def _domains(self, ctx: Context) -> list[str]:
        found: list[str] = []
        if self.options.check_senders:
            sender = from_address(ctx)
            for d in (ctx.mail_from_domain, sender.domain if sender else ""):
                found.append(registrable_domain(d) if d else "")
        if self.options.check_urls:
            found.extend(u.domain for u in urls(ctx))
        out: list[str] = []
        for d in found:
            if d and "." in d and d not in out:
                out.append(d)
            if len(out) >= self.options.max_domains:
                break
        return out

    async def check(self, ctx: Context) -> Result:
        lookups: list[tuple[Zone, str, str]] = []  # (zone, query name, what)
        ip = ctx.client_address
        if ip is not None and ip.is_global:
            lookups += [
                (z, ip_query_name(ip, z.zone), str(ip))
                for z in self.options.zones
                if z.type == "ip"
            ]
        domain_zones = [z for z in self.options.zones if z.type == "domain"]
        if domain_zones:
            for d in self._domains(ctx):
                lookups += [(z, f"{d}.{z.zone}", d) for z in domain_zones]
        if not lookups:
            return Result()
        tasks = [asyncio.ensure_future(ctx.resolver.query(q, "A")) for _, q, _ in lookups]
        done, pending = await asyncio.wait(tasks, timeout=self.options.lookup_timeout)
        for t in pending:
            t.cancel()
        hits: dict[str, str] = {}
        failed: list[str] = []
        for (zone, _q, what), task in zip(lookups, tasks, strict=True):
            if task not in done:
                failed.append(f"{zone.zone}: timeout")
                continue
            exc = task.exception()
            if exc is not None:
                if not isinstance(exc, DNSError | OSError | ValueError):
                    raise exc
                failed.append(f"{zone.zone}: {type(exc).__name__}")
                continue
            for sym, answer in zone.symbols_for(task.result().records):
                hits.setdefault(sym, f"{what} in {zone.zone} ({answer})")
        symbols = [Symbol(s, detail=d) for s, d in hits.items()]
        if failed:
            symbols.append(Symbol("DNSBL_TEMPFAIL", detail="; ".join(sorted(set(failed)))[:200]))
        return Result(symbols=tuple(symbols))
