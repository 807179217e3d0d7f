"""The SMTP front door: aiosmtpd's wire protocol behind one small adapter.

aiosmtpd parses commands; this module decides. :class:`GatewaySMTP`
subclasses ``aiosmtpd.smtp.SMTP`` (one instance per connection) and overrides
what a gateway on port 25 must control itself:

- EHLO advertises SIZE, 8BITMIME, SMTPUTF8, PIPELINING, ENHANCEDSTATUSCODES
  and STARTTLS when a certificate is configured; AUTH is not offered.
- RCPT refuses every recipient outside ``server.accepted_domains`` with
  550 5.7.1, including the classic open-relay tricks (``%`` and ``!`` hacks,
  source routes, quoted local parts holding an ``@``, several ``@``), caps the
  recipients per message (452) and optionally verifies them downstream.
- DATA is read in large chunks (not line by line), dot-unstuffed with the
  strict ``CRLF.CRLF`` end of RFC 5321 §4.1.1.4, bounded by
  ``max_message_size`` while it streams (552 5.3.4), and handed to the
  server's :class:`Backend`; the reply comes only after the hand-off.
- Session limits (total and per client IP, 421 4.7.0), timeouts (421 4.4.2),
  HAProxy PROXY v1/v2 accepted only from trusted networks.
- Postfix's XFORWARD (``XFORWARD_README``) offered to and accepted only from
  ``server.xforward_trusted_networks``: behind ``smtpd_proxy_filter`` or
  ``content_filter`` the policies judge the real client, not Postfix.
- No exception text ever reaches the peer; every reply carries an RFC 3463
  enhanced status code on an ESMTP session (RFC 2034).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import logging
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, AnyStr, Protocol

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP, TLSSetupException

from gateway import metrics, replies, smuggling
from gateway.api import TLSInfo
from gateway.budget import DataBudget
from gateway.config import ServerConfig
from gateway.engine import Envelope
from gateway.handoff import new_queue_id
from gateway.replies import Reply
from gateway.xforward import XFORWARD_ATTRIBUTES, Forwarded, XForwardError, parse_xforward

__all__ = [
    "Backend",
    "DataBudget",
    "DataOutcome",
    "GatewaySMTP",
    "ListenerSettings",
    "RecipientError",
    "SessionLimits",
    "Transaction",
    "check_recipient",
    "new_queue_id",
    "received_field",
    "tls_context",
]

log = logging.getLogger("gateway.smtp")

IDENT = "ESMTP gateway"
_READ_CHUNK = 256 * 1024  # bytes per DATA read; memory per session is bounded by max_message_size
_LONG_LINE = 1 << 20  # bytes of one unfinished line held before it is moved on in pieces
_TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds for the STARTTLS handshake


# --- queue ids and the Received field ---------------------------------------


_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def _token(text: str, limit: int = 255) -> str:
    """Client-controlled text made safe for a header field (no CR/LF, no comments)."""
    return _HELO_SAFE.sub("?", text)[:limit] or "unknown"


def received_field(
    *,
    helo: str,
    client_ip: str | None,
    client_name: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls: TLSInfo | None,
    recipient: str | None,
    when: datetime,
    via: tuple[str, str | None] | None = None,
) -> str:
    """Our trace field (RFC 5321 §4.4), folded, without the trailing CRLF.

    ``protocol`` is an RFC 3848 / RFC 6531 "with" keyword (ESMTP, ESMTPS,
    UTF8SMTPS, ...). The recipient is named only for single-recipient mail
    (RFC 5321 §7.6: naming one of several would leak the others).
    ``via`` is the (HELO, address) of the MTA that passed the client on with
    XFORWARD: the from clause names the original client, and a comment (CFWS
    before "by", RFC 5321 §4.4) names the hop it came through.
    """
    ip = client_ip or "unknown"
    literal = f"IPv6:{ip}" if ":" in ip else ip
    lines = [f"Received: from {_token(helo)} ({_token(client_name or 'unknown')} [{literal}])"]
    if via is not None:
        hop_ip = via[1] or "unknown"
        hop = f"IPv6:{hop_ip}" if ":" in hop_ip else hop_ip
        lines.append(f"\t(via XFORWARD from {_token(via[0])} [{hop}])")
    lines.append(f"\tby {_token(hostname)} (gateway) with {protocol}")
    if tls is not None:
        lines.append(f"\t(using {_token(tls.version, 40)} with cipher {_token(tls.cipher, 80)})")
    lines.append(f"\tid {queue_id}")
    if recipient is not None and _ADDR_SAFE.fullmatch(recipient):
        lines.append(f"\tfor <{recipient}>")
    lines[-1] += ";"
    lines.append(f"\t{format_datetime(when)}")
    return "\r\n".join(lines)


_ADDR_SAFE = re.compile(r"[\x21-\x7e\u0080-\U0010ffff]{1,320}")


# --- recipients: never an open relay ----------------------------------------


class RecipientError(enum.Enum):
    """Why a recipient is refused at RCPT."""

    SYNTAX = "syntax"
    NOT_ACCEPTED = "not_accepted"


_LOCAL_ATOM = re.compile(r"[A-Za-z0-9!#$&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+")
_DOMAIN = re.compile(r"[A-Za-z0-9\-\u0080-\U0010ffff]+(?:\.[A-Za-z0-9\-\u0080-\U0010ffff]+)*\.?")


def _split_path(arg: str) -> tuple[str, str] | None:
    """``<path> params`` -> (path, params); quoted strings may hold ``>``."""
    text = arg.strip()
    if not text.startswith("<"):
        # Lenient like most MTAs: a bare address (RFC 5321 wants angle brackets).
        path, _, params = text.partition(" ")
        return (path, params.strip()) if path and ">" not in path else None
    quoted = False
    escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return text[1:i], text[i + 1 :].strip()
    return None


def check_recipient(path: str, accepted_domains: Iterable[str]) -> RecipientError | None:
    """Decide a RCPT TO path (without the angle brackets); None means acceptable.

    Only a plain ``local@domain`` whose domain is exactly one of
    ``accepted_domains`` (case-insensitive; subdomains only when listed) is
    accepted. Everything a downstream MTA might route elsewhere is refused:
    source routes (RFC 5321 §4.1.1.3, obsolete), ``%`` and ``!`` routing
    hacks, quoted local parts holding ``@``, several ``@``, address literals.
    """
    if not path or path.startswith("@"):
        return RecipientError.NOT_ACCEPTED if path else RecipientError.SYNTAX
    if path.startswith('"'):
        end = path.find('"', 1)
        while end > 0 and path[end - 1] == "\\":
            end = path.find('"', end + 1)
        if end < 0 or path[end + 1 : end + 2] != "@":
            return RecipientError.SYNTAX
        local, domain = path[1:end], path[end + 2 :]
        if "@" in local or "%" in local or "!" in local or "\\" in local:
            return RecipientError.NOT_ACCEPTED
        if any(ord(c) < 32 or ord(c) == 127 for c in local):
            return RecipientError.SYNTAX
    else:
        if path.count("@") != 1:
            return RecipientError.NOT_ACCEPTED if path.count("@") > 1 else RecipientError.SYNTAX
        local, _, domain = path.partition("@")
        if "%" in local or "!" in local:
            return RecipientError.NOT_ACCEPTED
        if not all(_LOCAL_ATOM.fullmatch(a) for a in local.split(".")):
            return RecipientError.SYNTAX
    if "@" in domain or "%" in domain or "!" in domain or domain.startswith("["):
        return RecipientError.NOT_ACCEPTED
    if not _DOMAIN.fullmatch(domain):
        return RecipientError.SYNTAX
    if domain.lower().rstrip(".") not in set(accepted_domains):
        return RecipientError.NOT_ACCEPTED
    return None


# --- what the listener needs from the server --------------------------------


@dataclass(frozen=True, slots=True)
class Transaction:
    """One received message, ready for evaluation and hand-off."""

    envelope: Envelope
    raw: bytes  # exactly as received, dot-unstuffed
    received: str  # our Received: field (folded, no trailing CRLF)
    via: str | None = None  # the MTA that forwarded the client with XFORWARD (its address)
    upstream_queue_id: str | None = None  # that MTA's queue id (XFORWARD IDENT), for its logs
    # The client as the downstream should see it (relay XFORWARD): IDENT is our queue id.
    client: Forwarded | None = None


class Backend(Protocol):
    """The running gateway, as the SMTP sessions see it."""

    @property
    def settings(self) -> ListenerSettings: ...

    @property
    def draining(self) -> bool: ...

    async def verify_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        """None to accept the recipient, else the reply refusing it."""
        ...

    async def deliver(self, tx: Transaction) -> Reply:
        """Evaluate and hand the message on; the reply to DATA."""
        ...

    async def client_name(self, ip: str) -> str:
        """The forward-confirmed reverse DNS name of ``ip``, or "" (bounded in time)."""
        ...

    def session_opened(self, session: GatewaySMTP) -> None: ...

    def session_closed(self, session: GatewaySMTP) -> None: ...


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """The per-connection knobs, taken from the config generation current at connect."""

    server: ServerConfig
    tls: ssl.SSLContext | None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    verify_recipients: bool
    xforward_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, server: ServerConfig, *, verify_recipients: bool) -> ListenerSettings:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in server.proxy_trusted_networks)
        xfwd = tuple(
            ipaddress.ip_network(n, strict=False) for n in server.xforward_trusted_networks
        )
        return cls(server, tls_context(server), nets, verify_recipients, xfwd)

    def is_trusted_proxy(self, ip: str | None) -> bool:
        return _in_networks(ip, self.trusted_proxies)

    def is_xforward_host(self, ip: str | None) -> bool:
        """May ``ip`` (the SMTP peer) override the client with XFORWARD?"""
        return _in_networks(ip, self.xforward_hosts)


def _in_networks(
    ip: str | None, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in nets)


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The STARTTLS context (TLS 1.2 minimum), or None when no certificate is configured."""
    if not server.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE  # senders rarely present client certificates
    ctx.load_cert_chain(server.tls_cert, server.tls_key)
    return ctx


class SessionLimits:
    """Concurrent sessions in total and per client IP (one abusive client never starves others)."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: collections.Counter[str] = collections.Counter()
        # Connections from each trusted PROXY-protocol peer (exact address), from
        # connect to close: before its header a connection has no client to count.
        self.per_proxy: collections.Counter[str] = collections.Counter()

    @staticmethod
    def key(ip: str) -> str:
        """IPv6 clients count per /64: one host usually holds the whole prefix."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
        return str(addr)

    def acquire(self, ip: str, max_total: int, max_per_ip: int) -> str | None:
        """None when admitted (and counted), else the refusal reason (a metric label)."""
        key = self.key(ip)
        if self.total >= max_total:
            return "max_sessions"
        if self.per_ip[key] >= max_per_ip:
            return "max_sessions_per_ip"
        self.total += 1
        self.per_ip[key] += 1
        return None

    def release(self, ip: str) -> None:
        key = self.key(ip)
        self.total -= 1
        self.per_ip[key] -= 1
        if self.per_ip[key] <= 0:
            del self.per_ip[key]

    def acquire_proxy(self, peer: str, max_connections: int) -> bool:
        """Count a connection from trusted proxy ``peer``; False when its budget is spent."""
        if self.per_proxy[peer] >= max_connections:
            return False
        self.per_proxy[peer] += 1
        return True

    def release_proxy(self, peer: str) -> None:
        self.per_proxy[peer] -= 1
        if self.per_proxy[peer] <= 0:
            del self.per_proxy[peer]


class DataOutcome(enum.Enum):
    """How reading DATA ended."""

    OK = "ok"
    TOO_BIG = "too_big"  # over max_message_size: 552
    NO_MEMORY = "no_memory"  # the shared DataBudget is spent: 452


# --- the session --------------------------------------------------------------

_ENHANCED = re.compile(r"^\d\.\d{1,3}\.\d{1,3} ")
_DEFAULT_STATUS = {
    211: "2.0.0",
    214: "2.0.0",
    221: "2.0.0",
    250: "2.0.0",
    252: "2.5.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    550: "5.7.1",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.3.0",
    555: "5.5.4",
}
_STAGES = {"HELO": "helo", "EHLO": "helo", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}
# Exported at zero from start-up (metrics.zero): what gateway_smtp_sessions_refused_total
# and gateway_smtp_replies_total count, so dashboards and alerts see 0, not "no data".
REFUSAL_REASONS = (
    "max_sessions",
    "max_sessions_per_ip",
    "draining",
    "proxy_untrusted",
    "proxy_invalid",
    "proxy_timeout",
    "max_connections_per_proxy",
)
_STAGE_CODES = {  # the replies of replies.py and aiosmtpd at each stage
    "connect": ("220", "421", "554"),
    "helo": ("250", "421", "501", "503", "554"),
    "mail": ("250", "421", "451", "452", "501", "503", "550", "552", "553", "555"),
    "rcpt": ("250", "421", "450", "451", "452", "501", "503", "550", "553", "555"),
    "data": ("250", "354", "421", "451", "452", "501", "503", "550", "552", "554"),
}
metrics.zero(metrics.SESSIONS_REFUSED, reason=REFUSAL_REASONS)
metrics.zero(metrics.PROXY_CONNECTIONS, state=("awaiting_header", "session"))
for _stage, _codes in _STAGE_CODES.items():
    metrics.zero(metrics.REPLIES, stage=(_stage,), code=_codes)
_SMUGGLING_REPLY = Reply(
    550,
    "5.5.2",
    "Message refused: a period follows a bare CR or LF; send CRLF line endings "
    "(RFC 5321 section 2.3.8)",
)


class _ClientGone(Exception):
    """The connection closed or timed out in the middle of DATA."""


class GatewaySMTP(SMTP):
    """One SMTP session. Built by the listener's protocol factory."""

    def __init__(self, backend: Backend, limits: SessionLimits, budget: DataBudget) -> None:
        settings = backend.settings
        server = settings.server
        self.backend = backend
        self.limits = limits
        self.budget = budget
        self._taken = 0  # bytes of ``budget`` this session holds
        self.settings = settings
        # The StreamReader limit bounds a command line (RFC 5321 §4.5.3.1.4).
        self.line_length_limit = server.max_command_length + 2
        super().__init__(
            _NoHandler(),
            data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True,
            hostname=server.hostname,
            ident=IDENT,
            tls_context=settings.tls,
            timeout=server.command_timeout,
            auth_require_tls=True,
            command_call_limit={
                "*": 1000,
                "RCPT": max(1000, 10 * server.max_recipients),
                "NOOP": 100,
                "VRFY": 20,
                "EXPN": 20,
                "HELP": 20,
                "STARTTLS": 2,
            },
        )
        limit = server.max_command_length
        self.command_size_limit = limit
        self.command_size_limits = collections.defaultdict(lambda: limit)
        self.client_ip: str | None = None
        self.client_port: int | None = None  # passed downstream in XFORWARD PORT
        self.peer_ip: str | None = None
        self.helo = ""
        # XFORWARD attributes for the next transaction; None = the real peer (README).
        self.forwarded: Forwarded | None = None
        self._rdns: asyncio.Future[str] | None = None
        self._counted = False
        # Through a trusted proxy: "refused" (its budget spent), "awaiting_header",
        # "session" (the gateway_smtp_proxy_connections state), None otherwise.
        self._proxy_state: str | None = None
        self._stage = "connect"
        self.busy = False  # inside a DATA transaction (reading, evaluating, handing off)
        self._closing = False
        self._registered = False
        self._smtp_methods = {
            name: self._staged(name, method) for name, method in self._smtp_methods.items()
        }

    # -- connection lifecycle ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self.transport is None:
            peer = transport.get_extra_info("peername")
            self.peer_ip = _ip_of(peer)
            self.client_ip = self.peer_ip
            self.client_port = _port_of(peer)
            server = self.settings.server
            if server.proxy_protocol and self.settings.is_trusted_proxy(self.peer_ip):
                # Per-IP limits wait for the client the header announces; until then the
                # connection counts against the proxy's own budget, for a bounded time.
                self._proxy_timeout = server.proxy_header_timeout
                if self.limits.acquire_proxy(self.peer_ip or "", server.proxy_max_connections):
                    self._set_proxy_state("awaiting_header")
                else:
                    self._proxy_state = "refused"
            self.backend.session_opened(self)
            self._registered = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._rdns is not None and not self._rdns.done():
            self._rdns.cancel()
        if self._counted:
            self._counted = False
            self.limits.release(self.client_ip or "unknown")
            metrics.SESSIONS_ACTIVE.dec()
        if self._proxy_state not in (None, "refused"):
            self._set_proxy_state(None)
            self.limits.release_proxy(self.peer_ip or "")
        if self._registered:
            self._registered = False
            self.backend.session_closed(self)
        super().connection_lost(error)

    def _set_proxy_state(self, state: str | None) -> None:
        if self._proxy_state is not None:
            metrics.PROXY_CONNECTIONS.labels(state=self._proxy_state).dec()
        if state is not None:
            metrics.PROXY_CONNECTIONS.labels(state=state).inc()
        self._proxy_state = state

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return  # the connection is already gone
        if self._proxy_state == "awaiting_header":
            log.info("proxy_header_timeout", extra={"peer": self.peer_ip})
            metrics.SESSIONS_REFUSED.labels(reason="proxy_timeout").inc()
        # RFC 5321 §4.5.3.2: say why before closing instead of just dropping the line.
        self._write_now(replies.TIMEOUT)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _write_now(self, reply: Reply) -> None:
        transport: Any = self.transport  # uvloop transports are not asyncio.WriteTransport
        if transport is not None and not transport.is_closing():
            self._count_reply(reply.code)
            transport.write(f"{reply}\r\n".encode("ascii", "replace"))

    def shutdown(self) -> None:
        """Drain: idle sessions get 421 now; a session inside DATA finishes its message first."""
        self._closing = True
        if not self.busy and self.transport is not None:
            self._write_now(replies.SHUTTING_DOWN)
            self.transport.close()

    async def _handle_client(self) -> None:
        server = self.settings.server
        if self._proxy_state == "refused":
            await self._refuse(replies.TOO_MANY_THROUGH_PROXY, "max_connections_per_proxy")
            return
        if self._proxy_timeout is not None:
            # HAProxy PROXY v1/v2, only from trusted networks (connection_made decided).
            self._reset_timeout(self._proxy_timeout)
            try:
                proxy = await get_proxy(self._reader)
            except asyncio.CancelledError:
                # The proxy hung up first: aiosmtpd cancels us and would keep the
                # half-closed transport (and the proxy's slot) until the timeout.
                if self.transport is not None:
                    self.transport.close()
                raise
            if not proxy or not proxy.valid:
                log.warning("proxy_header_invalid", extra={"peer": self.peer_ip})
                metrics.SESSIONS_REFUSED.labels(reason="proxy_invalid").inc()
                if self.transport is not None:
                    self.transport.close()
                return
            if proxy.src_addr is not None:
                self.client_ip = _ip_of((str(proxy.src_addr), 0))
                self.client_port = proxy.src_port
            self._proxy_timeout = None
            self._reset_timeout()
        if self.backend.draining:
            await self._refuse(replies.SHUTTING_DOWN, "draining")
            return
        refused = self.limits.acquire(
            self.client_ip or "unknown", server.max_sessions, server.max_sessions_per_ip
        )
        if refused is not None:
            reply = (
                replies.TOO_MANY_SESSIONS if refused == "max_sessions" else replies.TOO_MANY_FROM_IP
            )
            await self._refuse(reply, refused)
            return
        self._counted = True
        metrics.SESSIONS_ACTIVE.inc()
        if self._proxy_state == "awaiting_header":
            self._set_proxy_state("session")
        if self.client_ip is not None and not _is_loopback(self.client_ip):
            # Looked up while the client talks; awaited (bounded) only at DATA.
            self._rdns = asyncio.ensure_future(self.backend.client_name(self.client_ip))
        await super()._handle_client()

    async def _refuse(self, reply: Reply, reason: str) -> None:
        metrics.SESSIONS_REFUSED.labels(reason=reason).inc()
        log.info("session_refused", extra={"client_ip": self.client_ip, "reason": reason})
        try:
            await self.push(str(reply))
        finally:
            if self.transport is not None:
                self.transport.close()

    # -- replies ---------------------------------------------------------------

    def _staged(self, name: str, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        stage = _STAGES.get(name, "other")

        async def run(arg: Any) -> Any:
            self._stage = stage
            return await method(arg)

        return run

    def _count_reply(self, code: int) -> None:
        if self._stage != "other":
            metrics.REPLIES.labels(stage=self._stage, code=str(code)).inc()

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        # Never echo control characters (a client's bogus command name) back.
        text = "".join(c if c >= " " and c != "\x7f" else "?" for c in text)
        code_text, sep, rest = text[:3], text[3:4], text[4:]
        if code_text.isdigit() and sep in (" ", ""):
            code = int(code_text)
            self._count_reply(code)
            extended = self.session is not None and self.session.extended_smtp
            status_code = _DEFAULT_STATUS.get(code)
            if extended and status_code and not _ENHANCED.match(rest + " "):
                # RFC 2034 §3: every reply but the greeting carries a status code.
                text = f"{code} {status_code} {rest}".rstrip()
        await super().push(text)

    async def handle_exception(self, error: Exception) -> str:
        # Exception text is for the log only (STYLE habit 5), never for the peer.
        log.error(
            "smtp_session_error",
            exc_info=(type(error), error, error.__traceback__),
            extra={"client_ip": self.client_ip},
        )
        return str(replies.LOCAL_ERROR)

    # -- commands --------------------------------------------------------------

    async def smtp_HELO(self, hostname: str) -> None:
        self.forwarded = None
        await super().smtp_HELO(hostname)
        if self.session is not None and self.session.host_name:
            self.helo = self.session.host_name

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push(str(replies.EHLO_SYNTAX))
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        self.helo = hostname
        self.forwarded = None
        lines = [
            self.hostname,
            f"SIZE {self.settings.server.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self.settings.is_xforward_host(self.client_ip):
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        text = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        self._count_reply(250)
        await SMTP.push(self, text)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push(str(replies.TLS_ACTIVE))
            return
        if self.tls_context is not None and not arg and self._reader._buffer:  # type: ignore[attr-defined]
            # Bytes sent after STARTTLS before our 220 (RFC 2920 §3.1: STARTTLS ends a
            # pipeline group) would be read as commands of the TLS session: the
            # STARTTLS injection of CVE-2011-0411. Refuse and close.
            log.warning("starttls_pipelining_refused", extra={"client_ip": self.client_ip})
            await self.push(str(replies.PIPELINED_AFTER_STARTTLS))
            if self.transport is not None:
                self.transport.close()
            return
        try:
            async with asyncio.timeout(_TLS_HANDSHAKE_TIMEOUT):
                await super().smtp_STARTTLS(arg)
        except TimeoutError:
            raise TLSSetupException("TLS handshake timed out") from None
        original: Any = self._original_transport
        if self._tls_protocol is not None and (original is None or original.is_closing()):
            # The peer went away mid-handshake: the SSL layer wakes us as if it had
            # succeeded, and never reports the loss. Fail it so the session ends.
            raise TLSSetupException("connection lost during the TLS handshake")

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(str(replies.AUTH_NOT_SUPPORTED))

    async def smtp_PROXY(self, arg: str) -> None:
        # A PROXY header here is either from an untrusted source or out of place.
        log.warning("proxy_header_refused", extra={"client_ip": self.client_ip})
        metrics.SESSIONS_REFUSED.labels(reason="proxy_untrusted").inc()
        await self.push(str(replies.PROXY_NOT_TRUSTED))
        if self.transport is not None:
            self.transport.close()

    async def smtp_XFORWARD(self, arg: str) -> None:
        """Postfix XFORWARD_README: the client of the MTA in front, for the next transaction."""
        if not self.settings.is_xforward_host(self.client_ip):
            # It rewrites the audit trail (README "Security"): never from anyone else.
            log.warning("xforward_refused", extra={"client_ip": self.client_ip})
            await self.push(str(replies.XFORWARD_NOT_TRUSTED))
            return
        if await self.check_helo_needed():
            return
        if self.envelope is not None and self.envelope.mail_from:
            await self.push(str(replies.MAIL_IN_PROGRESS))
            return
        try:
            self.forwarded = parse_xforward(arg or "", self.forwarded)
        except XForwardError as exc:
            await self.push(str(replies.xforward_syntax(str(exc))))
            return
        await self.push(str(replies.OK))

    async def smtp_RSET(self, arg: str) -> None:
        self.forwarded = None  # the end of a transaction (README "Server operation")
        await super().smtp_RSET(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push(str(replies.NEED_MAIL))
            return
        rest = self._strip_command_keyword("TO:", arg or "")
        parts = _split_path(rest) if rest is not None else None
        if parts is None:
            await self.push(str(replies.RCPT_SYNTAX))
            return
        path, params = parts
        if params:
            await self.push(str(replies.RCPT_PARAMETERS))
            return
        problem = check_recipient(path, self.settings.server.accepted_domains)
        if problem is RecipientError.SYNTAX:
            await self.push(str(replies.BAD_RECIPIENT_SYNTAX))
            return
        if problem is RecipientError.NOT_ACCEPTED:
            log.info(
                "recipient_refused",
                extra={"client_ip": self.client_ip, "rcpt": path[:320], "reason": "relay_denied"},
            )
            await self.push(str(replies.RELAY_DENIED))
            return
        if path in self.envelope.rcpt_tos:
            await self.push(str(replies.RECIPIENT_DUPLICATE))
            return
        if len(self.envelope.rcpt_tos) >= self.settings.server.max_recipients:
            await self.push(str(replies.TOO_MANY_RECIPIENTS))
            return
        if self.settings.verify_recipients:
            mail_from = _mail_from(self.envelope.mail_from)
            refusal = await self.backend.verify_recipient(mail_from, path)
            if refusal is not None:
                await self.push(str(refusal))
                return
        self.envelope.rcpt_tos.append(path)
        await self.push(str(replies.RECIPIENT_OK))

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NEED_RCPT))
            return
        if arg:
            await self.push(str(replies.DATA_SYNTAX))
            return
        server = self.settings.server
        self.busy = True
        try:
            await self.push(str(replies.START_DATA))
            received_at = datetime.now(UTC)
            self._reset_timeout(server.data_timeout)
            try:
                raw, outcome = await self._read_data(server.max_message_size)
            except _ClientGone:
                return
            # Evaluation and hand-off are bounded by their own timeouts; keep the line open.
            self._reset_timeout(server.command_timeout + server.data_timeout)
            if outcome is DataOutcome.NO_MEMORY:
                log.warning(
                    "message_deferred_memory",
                    extra={"client_ip": self.client_ip, "max_data_memory": self.budget.limit},
                )
                await self.push(str(replies.NO_MEMORY))
                return
            if outcome is DataOutcome.TOO_BIG:
                metrics.MESSAGE_SIZE.observe(server.max_message_size)
                log.info(
                    "message_refused_size",
                    extra={"client_ip": self.client_ip, "limit": server.max_message_size},
                )
                await self.push(str(replies.MESSAGE_TOO_BIG))
                return
            if await smuggling.found(raw, smuggling.Rule.ANY_DOT):
                log.warning(
                    "message_refused_bare_newline",
                    extra={"client_ip": self.client_ip, "size": len(raw)},
                )
                await self.push(str(_SMUGGLING_REPLY))
                return
            # A client that hangs up now must not cancel a hand-off half done (a relay
            # mid-transaction, a quarantine write): it completes, the client never saw a
            # 2xx and retries -- at worst a duplicate, as RFC 5321 §6.1 accepts.
            tx = self._transaction(raw, received_at, await self._client_name())
            delivery = asyncio.ensure_future(self.backend.deliver(tx))
            # The delivery holds the message now: it gives the budget back when done.
            taken, self._taken = self._taken, 0
            delivery.add_done_callback(lambda _: self.budget.give(taken))
            reply = await asyncio.shield(delivery)
            await self.push(str(reply))
        finally:
            self.forwarded = None  # reset after DOT (README "Server operation")
            self.budget.give(self._taken)
            self._taken = 0
            self.busy = False
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            if self.transport is not None:
                self._reset_timeout()
            if self._closing and self.transport is not None:
                self._write_now(replies.SHUTTING_DOWN)
                self.transport.close()

    async def _client_name(self) -> str:
        if self._rdns is None:
            return ""
        try:
            return await asyncio.shield(self._rdns)
        except Exception:
            return ""

    def _transaction(self, raw: bytes, received_at: datetime, client_name: str) -> Transaction:
        assert self.envelope is not None
        tls = self._tls_info()
        utf8 = bool(self.envelope.smtp_utf8)
        extended = self.session is not None and self.session.extended_smtp
        protocol = ("UTF8SMTP" if utf8 else "ESMTP" if extended else "SMTP") + (
            "S" if tls is not None else ""
        )
        client_ip, helo, port = self.client_ip, self.helo, self.client_port
        source = "REMOTE"
        via: tuple[str, str | None] | None = None
        fwd = self.forwarded
        if fwd is not None:
            # README note 4: never mix this session's facts into the forwarded client's.
            # ADDR=[UNAVAILABLE] is a local submission up-stream: no client at all.
            via = (self.helo, self.client_ip)
            client_ip = fwd.addr
            local = fwd.addr is None
            helo = "" if local else fwd.helo or ""
            client_name = "" if local else fwd.name or ""
            tls = None  # what the up-stream client used is not ours to know
            protocol = fwd.proto or protocol
            port, source = fwd.port, fwd.source or source
        queue_id = new_queue_id()
        rcpts = tuple(self.envelope.rcpt_tos)
        envelope = Envelope(
            client_ip=client_ip,
            helo=helo,
            mail_from=_mail_from(self.envelope.mail_from),
            rcpt_to=rcpts,
            queue_id=queue_id,
            client_name=client_name,
            tls=tls,
            received_at=received_at,
        )
        received = received_field(
            helo=helo,
            client_ip=client_ip,
            client_name=client_name,
            hostname=self.settings.server.hostname,
            protocol=protocol,
            queue_id=queue_id,
            tls=tls,
            recipient=rcpts[0] if len(rcpts) == 1 else None,
            when=received_at.astimezone(),
            via=via,
        )
        return Transaction(
            envelope,
            raw,
            received,
            via[1] if via else None,
            fwd.ident if fwd is not None else None,
            Forwarded(
                name=client_name or None,
                addr=client_ip,
                port=port,
                proto=protocol,
                helo=helo or None,
                ident=queue_id,
                source=source,
            ),
        )

    def _tls_info(self) -> TLSInfo | None:
        if self._tls_protocol is None or self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return TLSInfo(version=obj.version() or "TLS", cipher=cipher[0] if cipher else "")

    async def _read_data(self, limit: int) -> tuple[bytes, DataOutcome]:
        """Read the message up to the strict CRLF.CRLF end.

        Reads large chunks instead of lines. The buffer always starts with the
        CRLF that ended the previous line (a virtual one before the first), so
        the end marker is ``CRLF . CRLF`` and transparency (RFC 5321 §4.5.2) is
        ``CRLF . -> CRLF`` on whole lines only. A bare LF or CR never ends a
        line here. Past ``limit`` (or when the shared budget is spent) the
        bytes are counted and discarded until the end marker, so memory stays
        bounded however much is sent, and the session stays in sync.
        """
        reader = self._reader
        buf = bytearray(b"\r\n")
        out = bytearray()
        first = True
        outcome = DataOutcome.OK
        scan = 0
        prefix = 2  # buf starts with a line's CRLF (2) or in the middle of a line (0)
        while True:
            if self.transport is None:
                raise _ClientGone
            try:
                chunk = await reader.read(_READ_CHUNK)
            except (ConnectionError, asyncio.IncompleteReadError):
                raise _ClientGone from None
            if not chunk:
                raise _ClientGone
            if outcome is DataOutcome.OK and not self._take(len(chunk)):
                outcome = DataOutcome.NO_MEMORY
                out = bytearray()
            buf += chunk
            end = smuggling.data_end(buf, scan)  # buf.find(b"\r\n.\r\n", scan), faster
            if end >= 0:
                leftover = bytes(buf[end + 5 :])
                if leftover:
                    # Pipelined commands after the end of data (RFC 2920) stay for the command loop.
                    reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
                if outcome is not DataOutcome.OK:
                    return b"", outcome
                segment = _unstuffed(bytes(buf[:end]))
                out += segment[2:] if first else segment
                if end > 0 or not first:
                    out += b"\r\n"
                if len(out) > limit:
                    return b"", DataOutcome.TOO_BIG
                return bytes(out), outcome
            if outcome is not DataOutcome.OK:
                del buf[:-4]
                scan = 0
                continue
            # Only the new bytes can hold a CRLF (everything before the last one is
            # consumed): searching the whole buffer was quadratic on one huge line.
            last = buf.rfind(b"\r\n", max(0, len(buf) - len(chunk) - 1))
            midline = False
            if last <= 0 and len(buf) > _LONG_LINE:
                # One very long line: hand most of it over now, so the last step stays
                # small. buf holds no CRLF past its start, so the cut splits none.
                last, midline = len(buf) - 4, True
            if last > 0:
                segment = _unstuffed(bytes(buf[:last]))
                out += segment[2:] if first else segment
                first = False
                del buf[:last]
                prefix = 0 if midline else 2
            scan = max(0, len(buf) - 4)
            if len(out) + len(buf) - prefix > limit:
                outcome = DataOutcome.TOO_BIG
                out = bytearray()
                del buf[:-4]
                scan = 0

    def _take(self, n: int) -> bool:
        if not self.budget.take(n):
            return False
        self._taken += n
        return True


class _NoHandler:
    """aiosmtpd wants a handler object; the subclass does all the work itself."""


def _unstuffed(segment: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency on whole lines: ``CRLF .`` -> ``CRLF``."""
    if smuggling.no_line_starts_with_dot(segment):
        return segment  # the common case: no three-byte search through it
    return segment.replace(b"\r\n.", b"\r\n")


def _ip_of(peer: Any) -> str | None:
    if isinstance(peer, tuple) and peer:
        host = str(peer[0])
        return host.removeprefix("::ffff:") if host.startswith("::ffff:") else host
    return None


def _port_of(peer: Any) -> int | None:
    if isinstance(peer, tuple) and len(peer) > 1 and isinstance(peer[1], int):
        return peer[1]
    return None


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _mail_from(value: str | None) -> str:
    """aiosmtpd keeps the null reverse-path as ``<>``; the gateway uses ``""``."""
    return "" if not value or value == "<>" else value
