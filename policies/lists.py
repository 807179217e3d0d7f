"""Allow and block lists: sender addresses, domains and client networks from policy files.

Each list is a text file (one entry a line, ``#`` comments) with its own
symbol, score and optional forced action:

    user@example.com      an address (MAIL FROM or header From)
    example.com           a domain and its subdomains
    @example.com          that domain only
    192.0.2.0/24          a client network (or a single IP, v4 or v6)

Anyone can write any From address, so a list with ``authenticated = true``
(the default) matches addresses and domains only when DMARC passed for that
From domain (read from the dmarc policy when it is enabled; without it such
entries never match, and ``authenticated = false`` is the explicit choice to
trust unauthenticated senders). Client IP entries need no authentication.

An allowlisted, authenticated sender gets a large negative score
(:data:`RECOMMENDED_ALLOW_SCORE`, -100) and ``max_action = "add_header"``:
the score alone can then at most mark the message, however many heuristics
fire (a sum of scores is no guarantee once rules are added); forced actions
of other policies (GTUBE, a blocked attachment, DMARC p=reject) still apply.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.api import (
    Action,
    Context,
    OptionError,
    Policy,
    Result,
    Services,
    Symbol,
    SymbolDef,
)
from policies._mail import from_address

__all__ = [
    "RECOMMENDED_ALLOW_SCORE",
    "ListEntries",
    "ListSpec",
    "ListsOptions",
    "ListsPolicy",
    "parse_list",
]

# SpamAssassin's USER_IN_WHITELIST weight: more than every shipped content heuristic
# together (tests/policies/test_heuristics.py checks), so they never reject such mail.
RECOMMENDED_ALLOW_SCORE = -100.0

_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_DOMAIN = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9-]{1,63}$")
_MAX_ENTRIES = 1_000_000
_MAX_FILE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ListSpec:
    file: str  # relative to the config directory
    symbol: str
    score: float
    description: str = ""
    action: Literal["", "add_header", "quarantine", "reject"] = ""  # forced floor on a match
    authenticated: bool = True  # addresses/domains match only a DMARC-passing From
    # On a match the score alone decides at most this ("add_header": an allowlisted
    # sender is never quarantined or rejected by heuristics, whatever they sum to).
    max_action: Literal["", "relay", "add_header", "quarantine"] = ""

    def __post_init__(self) -> None:
        if not _SYMBOL.match(self.symbol):
            raise OptionError("symbol", f"must be an UPPER_SNAKE symbol name, got {self.symbol!r}")
        if not self.file:
            raise OptionError("file", "must name a list file")


@dataclass(frozen=True, slots=True)
class ListsOptions:
    lists: tuple[ListSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class ListEntries:
    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()  # and their subdomains
    exact_domains: frozenset[str] = frozenset()  # "@example.com": that domain only
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def match_address(self, addr: str) -> str:
        addr = addr.lower()
        if addr in self.addresses:
            return addr
        if "@" not in addr:
            return ""
        domain = addr.rpartition("@")[2].rstrip(".")
        if domain in self.exact_domains:
            return "@" + domain
        return self.match_domain(domain)

    def match_domain(self, domain: str) -> str:
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1 if len(labels) > 1 else 1):
            candidate = ".".join(labels[i:])
            if candidate in self.domains:
                return candidate
        return ""

    def match_ip(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str:
        if ip is None:
            return ""
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return str(net)
        return ""


def parse_list(text: str, label: str) -> ListEntries:
    """Parse a list file; an unreadable entry is an error naming ``label:line``."""
    addresses: set[str] = set()
    domains: set[str] = set()
    exact: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if len(addresses) + len(domains) + len(exact) + len(networks) >= _MAX_ENTRIES:
            raise ValueError(f"{label}: more than {_MAX_ENTRIES} entries")
        if "@" in entry:
            local, _, domain = entry.rpartition("@")
            if not domain or not _DOMAIN.match(domain):
                raise ValueError(f"{label}:{n}: {entry!r} is not an address or @domain")
            if local:
                addresses.add(entry)
            else:
                exact.add(domain.rstrip("."))
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if _DOMAIN.match(entry.rstrip(".")) and "." in entry:
            domains.add(entry.rstrip("."))
        else:
            raise ValueError(
                f"{label}:{n}: {entry!r} is not an address, domain, IP or network "
                "(e.g. user@example.com, example.com, 192.0.2.0/24)"
            )
    return ListEntries(frozenset(addresses), frozenset(domains), frozenset(exact), tuple(networks))


def _read(path: Path, label: str) -> ListEntries:
    try:
        if path.stat().st_size > _MAX_FILE:
            raise ValueError(f"{label}: larger than {_MAX_FILE} bytes")
        return parse_list(path.read_text(encoding="utf-8"), label)
    except FileNotFoundError:
        raise ValueError(f"{label}: no such file; create it or fix policies.lists.lists") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{label}: cannot read: {exc}") from None


class ListsPolicy(Policy):
    name = "lists"
    symbols = {}  # from [[policies.lists.lists]]: see rule_symbols()
    after_optional = ("dmarc",)
    Options = ListsOptions
    may_cap = True  # max_action

    def __init__(self, options: ListsOptions) -> None:
        super().__init__(options)
        self.options: ListsOptions = options
        self._entries: list[ListEntries] = []
        self._defs = {
            s.symbol: SymbolDef(s.score, s.description or f"listed in {Path(s.file).name}")
            for s in options.lists
        }
        if all(Path(s.file).expanduser().is_absolute() for s in options.lists):
            self._entries = self._load(Path("/"))

    def _load(self, config_dir: Path) -> list[ListEntries]:
        out = []
        for i, spec in enumerate(self.options.lists):
            path = Path(spec.file).expanduser()
            path = path if path.is_absolute() else config_dir / path
            try:
                out.append(_read(path, str(path)))
            except ValueError as exc:
                raise OptionError(f"lists[{i}].file", str(exc)) from None
        return out

    async def start(self, services: Services) -> None:
        self._entries = self._load(services.config_dir)

    def rule_symbols(self) -> Mapping[str, SymbolDef]:
        return self._defs

    async def check(self, ctx: Context) -> Result:
        sender = from_address(ctx)
        from_addr = sender.addr if sender else ""
        from_domain = sender.domain if sender else ""
        dmarc_ok = bool(from_domain) and any(
            a.result == "pass" and (a.prop("header.from") or "").lower() == from_domain
            for a in ctx.auth("dmarc")
        )
        symbols: list[Symbol] = []
        force: Action | None = None
        cap: Action | None = None
        reason = ""
        for spec, entries in zip(self.options.lists, self._entries, strict=True):
            detail = ""
            hit = entries.match_ip(ctx.client_address)
            if hit:
                detail = f"client {ctx.client_ip} in {hit}"
            elif spec.authenticated:
                if dmarc_ok and (hit := entries.match_address(from_addr)):
                    detail = f"From {from_addr} ({hit}), DMARC pass"
            else:
                for who, addr in (("MAIL FROM", ctx.mail_from), ("From", from_addr)):
                    if addr and (hit := entries.match_address(addr)):
                        detail = f"{who} {addr} ({hit})"
                        break
            if not detail:
                continue
            symbols.append(Symbol(spec.symbol, detail=detail))
            if spec.max_action and (cap is None or Action(spec.max_action).rank < cap.rank):
                cap = Action(spec.max_action)
            if spec.action:
                action = Action(spec.action)
                if action.at_least(force) is action and action is not force:
                    force, reason = (
                        action,
                        spec.description or f"sender is on the {spec.symbol} list",
                    )
        return Result(symbols=tuple(symbols), force=force, reason=reason, cap=cap)
