"""The policy plugin API: the only module a policy imports.

A policy is a class registered in the entry-point group ``gateway.policies``
and enabled by a ``[policies.<name>]`` table in the config. It reports named
findings (symbols) with evidence; the config weighs them; thresholds choose the
action. A policy may force an action as a floor (DMARC ``p=reject``) that a
higher score can still exceed.

Built-in policies import only this module, which keeps the API honest.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from gateway.content import (
    URL,
    HTMLLink,
    MIMEStructure,
    TextPart,
    URLSource,
    body_text,
    html_links,
    mime_structure,
    normalize_url,
    registrable_domain,
    text_parts,
    urls,
)

__all__ = [
    "URL",
    "Action",
    "AuthResult",
    "AutoLearn",
    "Context",
    "DNSAnswer",
    "DNSError",
    "DNSTemporaryError",
    "HTMLLink",
    "MIMEStructure",
    "NoOptions",
    "OptionError",
    "Policy",
    "Resolver",
    "Result",
    "ScoredSymbolView",
    "Services",
    "StateStore",
    "StateUnavailableError",
    "Symbol",
    "SymbolDef",
    "TLSInfo",
    "TextPart",
    "URLSource",
    "VerdictView",
    "body_text",
    "html_links",
    "mime_structure",
    "normalize_url",
    "registrable_domain",
    "text_parts",
    "urls",
]

T = TypeVar("T")


class Action(enum.Enum):
    """What happens to a message. Ordered: a later member is 'at least' an earlier one.

    TEMPFAIL ranks above QUARANTINE: when a check could not finish, asking the
    sender to retry beats storing a message judged on partial evidence.
    """

    RELAY = "relay"
    ADD_HEADER = "add_header"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def rank(self) -> int:
        return _ACTION_ORDER.index(self)

    def at_least(self, other: Action | None) -> Action:
        """The stronger of the two actions (``other`` may be None)."""
        if other is None or self.rank >= other.rank:
            return self
        return other


_ACTION_ORDER = (Action.RELAY, Action.ADD_HEADER, Action.QUARANTINE, Action.TEMPFAIL, Action.REJECT)


@dataclass(frozen=True, slots=True)
class SymbolDef:
    """A symbol a policy may emit: its default score and what it means."""

    score: float
    description: str


@dataclass(frozen=True, slots=True)
class Symbol:
    """One finding. Evidence goes in ``detail``, never in the name."""

    name: str
    weight: float = 1.0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One RFC 8601 result (``method=result (reason) ptype.prop=value``).

    ``properties`` are ordered pairs such as ``("smtp.mailfrom", "example.com")``
    or ``("header.d", "example.com")``.
    """

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        for key, value in self.properties:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Result:
    """What a policy found. ``force`` is a floor for the final action.

    ``cap`` is a ceiling for what the *score* decides (an allowlisted sender:
    however many heuristics fire, at most ``add_header``); another policy's
    ``force`` still applies above it (GTUBE, a virus, a blocked attachment).
    """

    symbols: tuple[Symbol, ...] = ()
    force: Action | None = None
    reason: str = ""
    auth: tuple[AuthResult, ...] = ()
    cap: Action | None = None


@dataclass(frozen=True, slots=True)
class TLSInfo:
    version: str
    cipher: str


@dataclass(frozen=True, slots=True)
class DNSAnswer:
    """A DNS answer. NXDOMAIN and NODATA are answers (empty ``records``).

    TXT records are the concatenation of their character-strings (RFC 7208
    §3.3, RFC 6376 §3.6.2.2), decoded as UTF-8 with undecodable bytes escaped.
    MX records are ``"<preference> <exchange>"``. Names carry no trailing dot.
    """

    name: str
    rdtype: str
    records: tuple[str, ...]
    nxdomain: bool = False
    ttl: float = 0.0


class DNSError(Exception):
    """A DNS lookup failed."""


class DNSTemporaryError(DNSError):
    """SERVFAIL, REFUSED, timeout or network error: retry later (``temperror``)."""


class Resolver(Protocol):
    """The gateway's one async, caching resolver."""

    async def query(self, name: str, rdtype: str) -> DNSAnswer:
        """Look up ``name``; raise DNSTemporaryError on a temporary failure."""
        ...


class StateUnavailableError(Exception):
    """The shared state store (Redis, SQLite) cannot be reached right now."""


class StateStore(Protocol):
    """Shared counters and token tables (classifier, rate limits, reputation).

    Local (SQLite) by default, Redis when configured; every method may raise
    StateUnavailableError, and policies step aside with a symbol when it does.
    """

    async def incr_many(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        """Add (a, b) pairs to the counters of ``table`` (e.g. spam/ham counts)."""
        ...

    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        """The (a, b) counter pairs of ``keys`` that exist in ``table``."""
        ...

    async def hit(self, key: str, window: float, now: float | None = None) -> int:
        """Record one event for ``key`` and return the count in the sliding window."""
        ...

    async def put_blobs(self, table: str, items: Mapping[str, bytes]) -> None:
        """Store (replace) byte strings by key in ``table`` (a classifier's training set)."""
        ...

    async def get_blobs(self, table: str, keys: list[str]) -> dict[str, bytes]:
        """The byte strings of ``keys`` that exist in ``table``."""
        ...

    async def blob_keys(self, table: str) -> list[str]:
        """Every key of ``table``'s byte strings."""
        ...


@dataclass(frozen=True, slots=True)
class Services:
    """What the gateway hands a policy at start-up (``Policy.start``)."""

    resolver: Resolver
    state: StateStore
    hostname: str
    config_dir: Path


class OptionError(ValueError):
    """A policy option is invalid; ``key`` names it within the policy table."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class NoOptions:
    """Options of a policy that takes none."""


class Context:
    """Everything a policy sees of one message.

    ``results`` holds the results of the policies named in the policy's
    ``after`` (and only those). Derived data (text parts, URLs, tokens) is
    computed once per message through :meth:`memo` and shared by policies.
    """

    __slots__ = (
        "_memo",
        "client_ip",
        "client_name",
        "helo",
        "hostname",
        "mail_from",
        "message",
        "queue_id",
        "raw",
        "rcpt_to",
        "received_at",
        "resolver",
        "results",
        "tls",
    )

    def __init__(
        self,
        *,
        client_ip: str | None,
        helo: str,
        mail_from: str,
        rcpt_to: tuple[str, ...],
        raw: bytes,
        message: EmailMessage,
        resolver: Resolver,
        hostname: str = "localhost",
        queue_id: str = "",
        tls: TLSInfo | None = None,
        client_name: str = "",
        received_at: datetime | None = None,
        results: Mapping[str, Result] | None = None,
    ) -> None:
        self.client_ip = client_ip
        self.client_name = client_name
        self.helo = helo
        self.mail_from = mail_from
        self.rcpt_to = rcpt_to
        self.raw = raw
        self.message = message
        self.resolver = resolver
        self.hostname = hostname
        self.queue_id = queue_id
        self.tls = tls
        self.received_at = received_at
        self.results: Mapping[str, Result] = results or {}
        self._memo: dict[Callable[..., Any], Any] = {}

    def with_results(self, results: Mapping[str, Result]) -> Context:
        """A view of this context with other dependency results, sharing the memo."""
        view = Context.__new__(Context)
        for name in Context.__slots__:
            object.__setattr__(view, name, getattr(self, name))
        view.results = results
        return view

    def memo(self, fn: Callable[[Context], T]) -> T:
        """``fn(self)``, computed once per message and shared by every policy."""
        try:
            return self._memo[fn]  # type: ignore[no-any-return]
        except KeyError:
            value = fn(self)
            self._memo[fn] = value
            return value

    def auth(self, method: str) -> tuple[AuthResult, ...]:
        """Authentication results of ``method`` from the policies this one runs after."""
        return tuple(a for r in self.results.values() for a in r.auth if a.method == method)

    @property
    def client_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if not self.client_ip:
            return None
        try:
            return ipaddress.ip_address(self.client_ip)
        except ValueError:
            return None

    @property
    def mail_from_domain(self) -> str:
        """The domain of the reverse-path, lower-cased; '' for the null sender."""
        _, _, domain = self.mail_from.rpartition("@")
        return domain.lower().rstrip(".") if "@" in self.mail_from else ""


class ScoredSymbolView(Protocol):
    """One symbol of a final verdict, as scored (``[scores]`` overrides applied)."""

    @property
    def name(self) -> str: ...
    @property
    def score(self) -> Decimal: ...
    @property
    def policy(self) -> str: ...


class VerdictView(Protocol):
    """The final verdict as :meth:`Policy.after_verdict` sees it.

    ``forced_by`` names the floor that decided the action (a policy, or
    ``scores.<SYMBOL>``), None when the score did.
    """

    @property
    def action(self) -> Action: ...
    @property
    def score(self) -> Decimal: ...
    @property
    def symbols(self) -> Sequence[ScoredSymbolView]: ...
    @property
    def forced_by(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class AutoLearn:
    """A policy's decision to learn from a verdict (SpamAssassin's ``autolearn=``).

    ``label`` is the word the message log shows: ``spam`` or ``ham`` when
    ``learn`` is set, else why not (``no``, ``unavailable``); ``detail`` says
    why. The engine runs ``learn`` in the background once the message is
    handed on, never before the reply: under ``timeout``, at most
    ``max_pending`` at once per policy (beyond that it is skipped and
    counted), and drained on close. ``learn`` returns whether the counts
    changed (False: the message was learned before).
    """

    label: str
    detail: str = ""
    learn: Callable[[], Awaitable[bool]] | None = None
    timeout: float = 2.0
    max_pending: int = 100


class Policy:
    """Subclass this. One instance per configuration, shared by all messages.

    Class attributes:
    - ``name``: the entry-point and config table name.
    - ``symbols``: every symbol it may emit, with its default score.
    - ``after``: names of policies whose results it reads (ordering and data).
    - ``after_optional``: like ``after``, but only when that policy is enabled
      (the lists policy reads DMARC if it runs, and still works without it).
    - ``Options``: a frozen dataclass of its options, filled from its table.
    - ``auth_results``: the RFC 8601 methods it reports in ``Result.auth`` and
      the results each may take; ``gateway_auth_results_total`` exports them at
      zero from start-up, so dashboards and alerts see 0 rather than no data.
    - ``observable``: False for a protection that must act even in observe mode
      (the rate limit): its floors always act and ``observe = true`` is refused.
    - ``may_cap``: True when its results may carry ``Result.cap``;
      ``gateway_capped_actions_total`` exports it at zero from start-up.
    """

    name: ClassVar[str] = ""
    symbols: ClassVar[Mapping[str, SymbolDef]] = {}
    auth_results: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    after: ClassVar[tuple[str, ...]] = ()
    after_optional: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[Any]] = NoOptions
    observable: ClassVar[bool] = True
    may_cap: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def preload(cls, options: Any) -> None:
        """Process-wide set-up every instance's ``start`` would repeat (a model, a
        table), done once in a parent before it forks workers (``replay --jobs``), so
        each worker starts with it. Keep it fork-safe: no thread, socket or open file
        may outlive the call. Optional; the default does nothing.
        """

    async def start(self, services: Services) -> None:
        """Called once before the first message: open stores, load files."""

    async def close(self) -> None:
        """Called once at shutdown or when replaced by a reload."""

    async def ready(self) -> str | None:
        """Asked by ``/readyz``: None when this policy can judge mail, else why not
        (a scanner daemon that does not answer). Keep it to one quick probe; the
        default is always ready.
        """
        return None

    async def check(self, ctx: Context) -> Result:
        raise NotImplementedError

    def after_verdict(self, ctx: Context, verdict: VerdictView) -> AutoLearn | None:
        """Called once per message with the final verdict; ``ctx.results`` holds every
        policy's result. Runs before the reply: decide quickly, without I/O, and put
        the slow part in the returned :class:`AutoLearn`. The default does nothing.
        """
        return None

    def rule_symbols(self) -> Mapping[str, SymbolDef]:
        """Symbols known only at run time (rule files); defaults to none."""
        return {}
