"""Async relay to the downstream MTA: pooled connections, STARTTLS, byte-exact DATA.

aiosmtplib speaks the protocol (connect, EHLO, STARTTLS, commands), with three
deliberate exceptions:

* The message body is written through its protocol's ``write`` and
  ``read_response`` rather than ``SMTP.data()``, because ``data()`` rewrites
  every bare CR and bare LF into CRLF. We do the dot-stuffing ourselves
  (RFC 5321 §4.5.2, lines are delimited by CRLF only) so the downstream reads
  back exactly the bytes we were given.
* Commands go through ``SMTP.execute_command`` so that every reply, accepted
  or refused, comes back as ``(code, text)`` and per-recipient replies can be
  collected.
* PIPELINING (RFC 2920), when the downstream's EHLO offers it: XFORWARD,
  MAIL, every RCPT and DATA go in one write (DATA ends the group, §3.1; the
  group Postfix's own client sends), and a recipient probe's MAIL, RCPT and
  RSET likewise, so a message costs two round trips instead of five and a
  probe one instead of three. aiosmtplib keeps one reply at a time and drops
  bytes that arrive while a reply waits to be read, so for the group the
  transport is handed to :class:`_ReplyReader`, which reads every reply in
  order, and back to aiosmtplib for the body. Each reply is matched to its
  command, so each recipient's outcome is what the one-by-one dialogue gives.
  When DATA got its 354 although MAIL or a recipient was refused, the server
  waits for a message that must not be sent (a "." would deliver an empty one
  to the accepted recipients): the connection is dropped, which aborts the
  transaction. Without PIPELINING the commands go one round trip each.

Delivery rules (the "never lose, never duplicate" contract):

* A refused recipient never turns into a silent partial delivery: when some
  but not all recipients are refused, no message is sent -- the transaction
  is reset before DATA (pipelined, after a 354, the connection is dropped) --
  and the caller gets a 451, so the client retries the whole message.
* A pooled connection that turns out to be dead is replaced by a fresh one and
  the transaction is retried once -- only while nothing can have been
  delivered, i.e. before any byte of the message body was handed to the
  transport. Once the body (with its terminating ``.``) was written, a lost
  reply is reported as a failure (the client retries later) and never retried
  here: a retry could deliver the message twice.
* Every network wait (connect, greeting, TLS handshake, each reply) is bounded
  by ``relay.timeout``; probing an idle pooled connection is bounded by
  ``min(relay.timeout, 5 s)`` so a half-open socket cannot stall a delivery.

Pooling: up to ``relay.pool_size`` idle connections are kept (LIFO); each is
probed with RSET before reuse (RFC 5321 §4.1.1.5), which also resets any
leftover state. Connections that errored, got a 421, are older than 5 minutes,
idle for 30 s or served 100 transactions are closed instead. Concurrent
sends are not capped here: each one holds its own connection, so the
downstream sees at most as many sessions as the gateway has in DATA.

STARTTLS (RFC 3207), ``relay.tls``: "off" never; "opportunistic" when
advertised, and after a failed handshake a new plain connection (remembered
for 5 minutes so each message does not pay for a failing handshake);
"required" fails with RelayError(code None, reason tls) when STARTTLS is not
offered or the handshake fails. TLS 1.2 minimum; ``relay.tls_verify``
toggles certificate and host name checks against ``relay.host``.

Message bytes are passed as received. ESMTP parameters on MAIL FROM:
``SIZE`` (RFC 1870) and ``BODY=8BITMIME`` for 8-bit data (RFC 6152) when the
downstream advertises them -- 8-bit data goes unchanged even when it does
not, since rewriting it would break signatures; ``SMTPUTF8`` (RFC 6531) when
the envelope or the header section is not ASCII and the downstream offers it.
A non-ASCII envelope to a downstream without SMTPUTF8 is refused with a
permanent 550 5.6.7 (RFC 6531 §3.2 forbids a silent downgrade).

XFORWARD (Postfix ``XFORWARD_README``), ``relay.xforward``: when the
downstream's EHLO offers it, every transaction starts with the client's
identity (``send(client=...)``), only the attributes offered, so the
downstream logs and judges the real client instead of the gateway. A refusal
is logged and the connection goes on without it: XFORWARD never costs a
delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar, cast

from aiosmtplib import (
    SMTP,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from gateway import metrics, smuggling
from gateway.config import RelayConfig
from gateway.xforward import Forwarded, xforward_arguments

__all__ = [
    "FailureReason",
    "Relay",
    "RelayError",
    "RelayResult",
    "sanitize_reply_text",
    "wire_data",
]

log = logging.getLogger("gateway.relay")

_T = TypeVar("_T")

# A pooled connection older than this, or idle longer than this, is closed
# rather than reused (Postfix: smtp_connection_reuse_time_limit = 300s; most
# MTAs drop idle clients well before their 5-minute RFC 5321 §4.5.3.2.7 limit).
MAX_CONNECTION_AGE = 300.0
MAX_IDLE = 30.0
# A connection whose last transaction ended cleanly (2xx to the message, or a
# 250 to RSET) less than this long ago is reused without an RSET probe; if it
# died meanwhile, the retry-once rule covers it.
FRESH_REUSE = 2.0
MAX_TRANSACTIONS = 100
PROBE_TIMEOUT = 5.0
# Reply texts go back to our own SMTP clients: one printable line, bounded.
MAX_REPLY_TEXT = 300
MAX_REPLY_LINE = 8192  # octets of a reply line read in a pipelined group (as aiosmtplib)
# After an opportunistic STARTTLS handshake failed, go plain for this long
# instead of paying a failed handshake plus a reconnect for every message.
TLS_FALLBACK_MEMORY = 300.0
# Large messages are checked and written in slices of about this size (each
# ending in CRLF), yielding to the event loop in between: bytes operations on
# a whole 25 MB message would hold the loop for ~0.2 s.
SLICE = 1 << 20
# XFORWARD_README: a value is at most 255 characters; a command line at most
# 512 octets with its CRLF (RFC 5321 §4.5.3.1.4), so several commands if needed.


class FailureReason(StrEnum):
    """Label values of ``gateway_relay_failures_total{reason}``."""

    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    TEMPFAIL = "tempfail"
    PERMFAIL = "permfail"
    TLS = "tls"


metrics.zero(metrics.RELAY_FAILURES, reason=[r.value for r in FailureReason])


@dataclass(frozen=True, slots=True)
class RelayResult:
    """The downstream accepted the message for ``accepted``."""

    accepted: tuple[str, ...]
    reply: tuple[int, str]  # the downstream's reply to the end of DATA


class RelayError(Exception):
    """The hand-off failed; nothing was delivered by this attempt.

    ``code`` is the downstream's SMTP code (4xx/5xx) or None when it could not
    be reached, timed out, or TLS could not be established. ``text`` is safe to
    put in a reply to our own client. ``permanent`` is True only for a 5xx.
    """

    code: int | None
    text: str
    permanent: bool
    reason: FailureReason

    def __init__(
        self,
        code: int | None,
        text: str,
        *,
        reason: FailureReason | None = None,
        permanent: bool | None = None,
    ) -> None:
        self.code = code
        self.text = sanitize_reply_text(text)
        self.permanent = (
            (code is not None and 500 <= code < 600) if permanent is None else permanent
        )
        if reason is None:
            if code is None:
                reason = FailureReason.UNREACHABLE
            else:
                reason = FailureReason.PERMFAIL if self.permanent else FailureReason.TEMPFAIL
        self.reason = reason
        super().__init__(f"{code} {self.text}" if code is not None else self.text)


def sanitize_reply_text(text: str, limit: int = MAX_REPLY_TEXT) -> str:
    """One line of printable ASCII, at most ``limit`` characters.

    Downstream texts are passed back to clients; a multi-line or binary reply
    must not inject lines into our own replies (RFC 5321 §4.2).
    """
    one_line = " ".join(text.split())
    return "".join(c if " " <= c <= "~" else "?" for c in one_line)[:limit]


def wire_data(data: bytes) -> bytes:
    """The whole DATA payload as sent, terminator included (for tests and tools)."""
    data = _terminated(data)
    _refuse_smuggling(data)
    return _stuff(data) + b".\r\n"


def _terminated(data: bytes) -> bytes:
    """``data`` whose last line ends in CRLF.

    RFC 5321 §4.1.1.4: the first CRLF of ``CRLF.CRLF`` ends the last line, so
    the last line must end; a message without a final CRLF gets one, the only
    byte ever added.
    """
    return data + b"\r\n" if data and not data.endswith(b"\r\n") else data


def _refuse_smuggling(data: bytes) -> None:
    """RelayError 550 if a bare CR or LF is followed by "." and CR or LF.

    Bare CR and bare LF are otherwise relayed unchanged (lines are delimited
    by CRLF only, RFC 5321 §2.3.8). But that sequence is an end of data to a
    downstream that (wrongly) accepts bare line endings -- the SMTP smuggling
    vector (CVE-2023-51764 and kin): relayed unchanged it would let a client
    smuggle a second, unfiltered message past the gateway.
    """
    if _bare_line_end_dot(data):
        raise RelayError(
            550,
            "5.6.0 Message contains a bare CR or LF followed by a lone '.'; "
            "send it with CRLF line endings (RFC 5321 §2.3.8)",
            reason=FailureReason.PERMFAIL,
        )


async def _prepared(data: bytes) -> bytes:
    """``_terminated(data)`` after ``_refuse_smuggling``, window by window, yielding between."""
    data = _terminated(data)
    # Window by window (also through one huge line, which has no CRLF to slice at).
    if await smuggling.found(data, smuggling.Rule.DOT_LINE):
        _refuse_smuggling(data)
    return data


def _slices(data: bytes) -> Iterator[bytes]:
    """CRLF-terminated ``data`` in pieces of about SLICE bytes, each ending in CRLF.

    Every piece starts at a line start, so stuffing and the smuggling check
    work piece by piece (no 3-byte sequence they look for spans a CRLF
    boundary), and the event loop is never blocked for a whole large message.
    """
    start, size = 0, len(data)
    while start < size:
        cut = data.find(b"\r\n", start + SLICE)
        end = size if cut < 0 else cut + 2
        yield data[start:end]
        start = end


def _stuff(piece: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line (delimited by CRLF) that starts with "." gets one more."""
    if smuggling.no_line_starts_with_dot(piece):
        return piece  # the common case (no "." in base64): no three-byte search, no copy
    stuffed = piece.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def _bare_line_end_dot(data: bytes) -> bool:
    """True if a bare CR or bare LF is followed by "." and then CR or LF."""
    return smuggling.found_sync(data, smuggling.Rule.DOT_LINE)


def _accepted(
    conn: _Connection, rcpts: Sequence[tuple[str, bytes]], replies: Sequence[tuple[int, str]]
) -> list[str]:
    """The recipients whose RCPT got a 2xx; RelayError unless that is every one of them.

    A refused recipient never turns into a silent partial delivery: some refused
    is a 451 for the whole message (the client retries it), all refused passes
    the downstream's verdict on, permanent only when every refusal was.
    """
    accepted: list[str] = []
    refused: list[tuple[str, int, str]] = []
    for (address, _), (code, text) in zip(rcpts, replies, strict=False):
        if 200 <= code < 300:  # RFC 5321 §4.1.1.3: 250 or 251
            accepted.append(address)
            continue
        conn.expect_failure(code, "RCPT")
        if code == 421:
            raise RelayError(code, text)
        refused.append((address, code, text))
    if len(replies) < len(rcpts):
        raise RelayError(None, "4.4.1 Connection to the downstream lost")
    if not refused:
        return accepted
    if not accepted:
        temporary = [r for r in refused if r[1] < 500]
        _, code, text = (temporary or refused)[0]
        raise RelayError(code, text)
    address, code, text = refused[0]
    raise RelayError(
        451,
        f"4.3.0 Downstream refused {len(refused)} of {len(rcpts)} recipients "
        f"({address}: {code} {sanitize_reply_text(text, 120)}); try again later",
        reason=FailureReason.TEMPFAIL,
    )


def _check_address(address: str, what: str) -> bytes:
    """The address as it goes between angle brackets; injection-safe."""
    if any(ord(c) < 32 or ord(c) == 127 for c in address) or len(address) > 1000:
        status = "5.1.7" if what == "sender" else "5.1.3"
        raise RelayError(553, f"{status} Invalid {what} address syntax")
    return address.encode("utf-8")


def _tls_context(verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _ReplyReader(asyncio.Protocol):
    """The replies to one pipelined group (RFC 2920), in order, however the bytes arrive.

    aiosmtplib's protocol holds one parsed reply at a time and drops bytes that
    arrive while a reply waits to be picked up, so a group's replies would be
    lost (or wait forever in its buffer). For the group the transport is handed
    to this reader, then back to aiosmtplib's protocol for the message body.
    Bounded like aiosmtplib: a line of at most 8,192 octets.
    """

    def __init__(self) -> None:
        self.replies: list[tuple[int, str]] = []
        self.closed = False
        self.error = ""
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._changed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self.error = "malformed reply line"
                break
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                self.replies.append((int(code), "\n".join(self._lines)))
                self._lines = []
            if len(self._lines) > 100:
                self.error = "reply of more than 100 lines"
                break
        if len(self._buffer) > MAX_REPLY_LINE:
            self.error = "reply line too long"
        self._changed.set()

    def eof_received(self) -> bool:
        self.closed = True
        self._changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._changed.set()

    async def wait_for(self, count: int, patience: float) -> list[tuple[int, str]]:
        """The first ``count`` replies; each may take up to ``patience`` seconds to arrive.

        Returns early after a 421 (the server closes the channel, RFC 5321 §3.8).
        """
        while True:
            if self.error:
                raise SMTPResponseException(-1, self.error)
            if len(self.replies) >= count or any(code == 421 for code, _ in self.replies):
                return self.replies
            if self.closed:
                raise SMTPServerDisconnected("connection closed in a pipelined group")
            self._changed.clear()
            async with asyncio.timeout(patience):
                await self._changed.wait()

    @property
    def unasked(self) -> bool:
        """Bytes beyond the replies to the group: the dialogue is out of step."""
        return bool(self._buffer or self._lines)


class _Connection:
    """One SMTP session to the downstream, EHLO'd (and STARTTLS'd if so configured)."""

    __slots__ = (
        "body_sent",
        "broken",
        "clean",
        "created",
        "last_used",
        "smtp",
        "timeout",
        "transactions",
        "xforward_refused",
    )

    def __init__(self, smtp: SMTP, timeout: float) -> None:
        self.smtp = smtp
        self.timeout = timeout
        self.created = self.last_used = time.monotonic()
        self.transactions = 0
        self.broken = False
        self.body_sent = False
        self.clean = True  # no transaction open on the server side (RFC 5321 §4.1.4)
        self.xforward_refused = False  # the downstream refused XFORWARD once: not again

    @property
    def tls(self) -> bool:
        try:
            return self.smtp.get_transport_info("sslcontext") is not None
        except SMTPException:
            return False

    def supports(self, extension: str) -> bool:
        return self.smtp.supports_extension(extension)

    def reusable(self, now: float) -> bool:
        return (
            not self.broken
            and self.smtp.is_connected
            and now - self.created < MAX_CONNECTION_AGE
            and now - self.last_used < MAX_IDLE
            and self.transactions < MAX_TRANSACTIONS
        )

    async def command(self, *args: bytes, limit: float | None = None) -> tuple[int, str]:
        """Send one command; return the reply. Network trouble -> RelayError(None)."""
        with self._failures():
            reply = await self.smtp.execute_command(*args, timeout=limit or self.timeout)
        return self._checked(reply.code, reply.message)

    async def pipeline(self, commands: Sequence[bytes]) -> list[tuple[int, str]]:
        """Send ``commands`` in one write (RFC 2920) and return their replies, in order.

        Fewer replies than commands only after a 421, which is then the last
        (the connection is closed). Network trouble -> RelayError(None).
        """
        protocol = self.smtp.protocol
        transport = cast(
            "asyncio.WriteTransport | None", protocol.transport if protocol is not None else None
        )
        if transport is None or transport.is_closing():
            self.close()
            raise RelayError(None, "4.4.1 Connection to the downstream lost")
        reader = _ReplyReader()
        aiosmtplib_protocol = transport.get_protocol()
        transport.set_protocol(reader)
        try:
            with self._failures():
                transport.write(b"".join(command + b"\r\n" for command in commands))
                replies = await reader.wait_for(len(commands), self.timeout)
        finally:
            transport.set_protocol(aiosmtplib_protocol)
        if len(replies) > len(commands) or reader.unasked:
            self.close()
            raise RelayError(
                None,
                "4.4.0 Downstream sent replies to commands it was not given",
                reason=FailureReason.TEMPFAIL,
            )
        return [self._checked(code, text) for code, text in replies]

    async def send_body(self, data: bytes) -> tuple[int, str]:
        """Write the message dot-stuffed, then the terminator; return the final reply.

        ``data`` comes from ``_prepared`` (CRLF-terminated, checked).
        """
        protocol = self.smtp.protocol
        if protocol is None:
            self.broken = True
            raise RelayError(None, "4.4.1 Connection to the downstream lost")
        with self._failures():
            for i, piece in enumerate(_slices(data)):
                if i:
                    await asyncio.sleep(0)
                    # Flow control: while the downstream lags, wait for the transport
                    # buffer to drain instead of queueing the whole message in memory.
                    async with asyncio.timeout(self.timeout):
                        await protocol._drain_helper()
                protocol.write(_stuff(piece))
                # From the first byte on, never retry this transaction: once
                # the terminator is out the downstream may have the message,
                # and a retry could deliver it twice.
                self.body_sent = True
            protocol.write(b".\r\n")  # RFC 5321 §4.1.1.4
            self.body_sent = True
            reply = await protocol.read_response(timeout=self.timeout)
        return self._checked(reply.code, reply.message)

    async def reset(self) -> None:
        """RSET (RFC 5321 §4.1.1.5); a connection that cannot reset is not reused."""
        with contextlib.suppress(RelayError):
            code, _ = await self.command(b"RSET")
            if code == 250:
                self.clean = True
                return
        self.broken = True

    async def quit(self) -> None:
        with contextlib.suppress(RelayError):
            await self.command(b"QUIT", limit=min(self.timeout, PROBE_TIMEOUT))
        self.close()

    def close(self) -> None:
        self.broken = True
        self.smtp.close()

    def expect_failure(self, code: int, stage: str) -> None:
        """A reply that is not a success must be a 4xx/5xx; anything else is a protocol error."""
        if code < 400:
            self.close()
            raise RelayError(
                None,
                f"4.4.0 Downstream sent an invalid reply ({code}) to {stage}",
                reason=FailureReason.TEMPFAIL,
            )

    def _checked(self, code: int, text: str) -> tuple[int, str]:
        if not 200 <= code <= 599:
            self.close()
            raise RelayError(
                None, "4.4.0 Downstream sent an invalid reply", reason=FailureReason.TEMPFAIL
            )
        if code == 421:  # RFC 5321 §3.8: the server is closing the channel
            self.close()
        return code, text

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        try:
            yield
        except (SMTPTimeoutError, TimeoutError):
            self.close()
            raise RelayError(
                None, "4.4.2 Downstream did not answer in time", reason=FailureReason.TIMEOUT
            ) from None
        except (SMTPServerDisconnected, ConnectionError, OSError):
            self.close()
            raise RelayError(
                None, "4.4.1 Connection to the downstream lost", reason=FailureReason.UNREACHABLE
            ) from None
        except SMTPException:
            self.close()
            raise RelayError(
                None, "4.4.0 Downstream protocol error", reason=FailureReason.TEMPFAIL
            ) from None


class Relay:
    """Hands messages to the downstream MTA of ``[relay]`` over pooled connections.

    Safe to share between concurrent SMTP sessions: a connection is used by
    one transaction at a time; up to ``pool_size`` idle ones are kept.
    """

    def __init__(self, config: RelayConfig, local_hostname: str) -> None:
        self.config = config
        self.helo = (config.helo or local_hostname).strip()
        if (
            not self.helo
            or not self.helo.isascii()
            or not self.helo.isprintable()
            or " " in self.helo
        ):
            # RFC 5321 §4.1.1.1: EHLO takes a domain (A-labels) or an address literal.
            raise ValueError(
                f'relay.helo: must be a host name in ASCII (A-labels), got "{self.helo}"'
            )
        self._idle: deque[_Connection] = deque()
        # At most max_connections to the downstream at once: a burst of sessions
        # queues here instead of opening hundreds of connections to the MTA.
        self._slots = asyncio.Semaphore(config.max_connections)
        self._tls_ctx: ssl.SSLContext | None = None
        self._tls_fallback_until = 0.0
        self._closed = False
        self._xforward_refusal_logged = False

    # -- public API -------------------------------------------------------

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        *,
        client: Forwarded | None = None,
    ) -> RelayResult:
        """Relay ``data`` unchanged for the envelope; RelayError when not delivered.

        ``client`` is who sent the message, passed on with XFORWARD when the
        downstream offers it and ``relay.xforward`` is on.
        """
        if not rcpt_to:
            raise ValueError("send() needs at least one recipient")
        started = time.monotonic()
        try:
            sender = _check_address(mail_from, "sender")
            rcpts = [(r, _check_address(r, "recipient")) for r in rcpt_to]
            data = await _prepared(data)

            async def transaction(conn: _Connection) -> RelayResult:
                return await self._transaction(conn, sender, rcpts, data, client)

            result = await self._with_connection(transaction)
        except RelayError as exc:
            metrics.RELAY_FAILURES.labels(reason=exc.reason.value).inc()
            log.info(
                "relay_failed",
                extra={"code": exc.code, "reply": exc.text, "reason": exc.reason.value},
            )
            raise
        metrics.RELAY_DURATION.observe(time.monotonic() - started)
        return result

    async def verify_recipient(self, mail_from: str, rcpt: str) -> tuple[int, str]:
        """The downstream's reply to ``RCPT TO:<rcpt>`` (MAIL, RCPT, RSET; nothing sent).

        A refused MAIL FROM is returned as the answer. Unreachable -> RelayError.
        With PIPELINING the three commands go in one write: one round trip.
        """
        sender = _check_address(mail_from, "sender")
        recipient = _check_address(rcpt, "recipient")

        async def probe(conn: _Connection) -> tuple[int, str]:
            utf8 = not (sender.isascii() and recipient.isascii())
            try:
                mail = self._mail_command(conn, sender, utf8, b"")
            except RelayError as exc:
                return exc.code or 550, exc.text  # no SMTPUTF8 downstream: an answer
            rcpt_command = b"RCPT TO:<" + recipient + b">"
            conn.clean = False
            if conn.supports("pipelining"):
                replies = await conn.pipeline([mail, rcpt_command, b"RSET"])
                code, text = replies[0]
                if 200 <= code < 300 and len(replies) > 1:
                    code, text = replies[1]
                reset = replies[2] if len(replies) > 2 else (421, "")
            else:
                code, text = await conn.command(mail)
                if 200 <= code < 300:
                    code, text = await conn.command(rcpt_command)
                reset = None
            if not 200 <= code < 300:
                conn.expect_failure(code, "RCPT")
            if code == 421:
                raise RelayError(code, text)
            if reset is None:
                await conn.reset()
            elif reset[0] == 250:
                conn.clean = True
            else:
                conn.broken = True
            return code, sanitize_reply_text(text)

        return await self._with_connection(probe)

    async def check(self) -> bool:
        """Readiness: the downstream answers (connect + EHLO, or RSET on a pooled one)."""
        try:
            conn, _ = await self._acquire()
        except RelayError:
            return False
        self._release(conn)
        return True

    async def close(self) -> None:
        """QUIT every idle connection; connections in use are closed when released."""
        self._closed = True
        idle = list(self._idle)
        self._idle.clear()
        await asyncio.gather(*(conn.quit() for conn in idle))

    # -- transactions -----------------------------------------------------

    async def _transaction(
        self,
        conn: _Connection,
        sender: bytes,
        rcpts: Sequence[tuple[str, bytes]],
        data: bytes,
        client: Forwarded | None = None,
    ) -> RelayResult:
        utf8 = not (sender.isascii() and all(raw.isascii() for _, raw in rcpts))
        mail = self._mail_command(conn, sender, utf8, data)
        rcpt_commands = [b"RCPT TO:<" + raw + b">" for _, raw in rcpts]
        xforward = self._xforward_commands(conn, client)
        conn.clean = False
        if conn.supports("pipelining"):
            accepted = await self._pipelined_envelope(conn, xforward, mail, rcpt_commands, rcpts)
        else:
            accepted = await self._envelope(conn, xforward, mail, rcpt_commands, rcpts)
        code, text = await conn.send_body(data)
        conn.transactions += 1
        conn.clean = True  # RFC 5321 §4.1.1.4: the reply to the message ends the transaction
        if 200 <= code < 300:
            return RelayResult(accepted=tuple(accepted), reply=(code, sanitize_reply_text(text)))
        conn.expect_failure(code, "the message")
        raise RelayError(code, text)

    async def _envelope(
        self,
        conn: _Connection,
        xforward: Sequence[bytes],
        mail: bytes,
        rcpt_commands: Sequence[bytes],
        rcpts: Sequence[tuple[str, bytes]],
    ) -> list[str]:
        """XFORWARD, MAIL, RCPT..., DATA one round trip each; the accepted recipients."""
        replies = []
        for command in xforward:
            replies.append(await conn.command(command))
            if not 200 <= replies[-1][0] < 300:
                break  # refused: the rest would be too; the transaction goes on without
        self._xforward_replies(conn, replies)
        try:
            code, text = await conn.command(mail)
            if not 200 <= code < 300:
                conn.expect_failure(code, "MAIL")
                raise RelayError(code, text)
            rcpt_replies = []
            for command in rcpt_commands:
                rcpt_replies.append(await conn.command(command))
                if rcpt_replies[-1][0] == 421:
                    break
            accepted = _accepted(conn, rcpts, rcpt_replies)
            code, text = await conn.command(b"DATA")
            if code != 354:
                conn.expect_failure(code, "DATA")
                raise RelayError(code, text)
        except RelayError:
            if not conn.broken:
                await conn.reset()
            raise
        return accepted

    async def _pipelined_envelope(
        self,
        conn: _Connection,
        xforward: Sequence[bytes],
        mail: bytes,
        rcpt_commands: Sequence[bytes],
        rcpts: Sequence[tuple[str, bytes]],
    ) -> list[str]:
        """XFORWARD, MAIL, RCPT... and DATA in one write (RFC 2920 §3.1: DATA ends the
        group), as Postfix's own client sends them; the accepted recipients.

        Each reply is matched to its command, so the outcome per recipient is the
        one the sequential dialogue gives. Should DATA get its 354 although the
        transaction cannot go on (MAIL or some recipient refused), the server
        waits for a message: a "." would deliver an empty one to the accepted
        recipients, so the connection is dropped instead, which aborts the
        transaction (RFC 5321 §3.8) and delivers nothing.
        """
        commands = [*xforward, mail, *rcpt_commands, b"DATA"]
        replies = await conn.pipeline(commands)
        if replies[-1][0] == 421:  # closing: the last reply read (the connection is closed)
            raise RelayError(*replies[-1])
        n = len(xforward)
        self._xforward_replies(conn, replies[:n])
        (code, text), rcpt_replies, (data_code, data_text) = (
            replies[n],
            replies[n + 1 : -1],
            replies[-1],
        )
        try:
            if not 200 <= code < 300:
                conn.expect_failure(code, "MAIL")
                raise RelayError(code, text)
            accepted = _accepted(conn, rcpts, rcpt_replies)
            if data_code != 354:
                conn.expect_failure(data_code, "DATA")
                raise RelayError(data_code, data_text)
        except RelayError:
            if data_code == 354:
                conn.close()
            elif not conn.broken:
                await conn.reset()
            raise
        return accepted

    def _xforward_commands(self, conn: _Connection, client: Forwarded | None) -> list[bytes]:
        """XFORWARD before MAIL (XFORWARD_README), if offered and ``relay.xforward`` is on.

        The downstream forgets the attributes at the end of each transaction,
        so a pooled connection gets them again every time.
        """
        offered = conn.smtp.esmtp_extensions.get("xforward")
        if client is None or not self.config.xforward or offered is None or conn.xforward_refused:
            return []
        return [b"XFORWARD " + args for args in xforward_arguments(client, offered)]

    def _xforward_replies(self, conn: _Connection, replies: Sequence[tuple[int, str]]) -> None:
        """A refused XFORWARD is logged and not sent again on this connection; not a failure."""
        for code, text in replies:
            if 200 <= code < 300:
                continue
            conn.expect_failure(code, "XFORWARD")
            if code == 421:
                raise RelayError(code, text)
            conn.xforward_refused = True
            # Once per relay: every new connection to the same downstream would say it again.
            level = logging.DEBUG if self._xforward_refusal_logged else logging.WARNING
            self._xforward_refusal_logged = True
            log.log(
                level,
                "relay_xforward_refused",
                extra={"code": code, "reply": sanitize_reply_text(text)},
            )
            return

    def _mail_command(
        self, conn: _Connection, sender: bytes, needs_utf8: bool, data: bytes
    ) -> bytes:
        """MAIL FROM with the ESMTP parameters the message and downstream call for."""
        params: list[bytes] = []
        if needs_utf8 and not conn.supports("smtputf8"):
            # RFC 6531 §3.2: do not downgrade; the sender gets a bounce it can act on.
            raise RelayError(
                550,
                "5.6.7 Downstream does not support SMTPUTF8 for a non-ASCII address",
                reason=FailureReason.PERMFAIL,
            )
        if data:
            if conn.supports("size"):  # RFC 1870
                params.append(b"SIZE=%d" % len(data))
            if not data.isascii() and conn.supports("8bitmime"):  # RFC 6152
                params.append(b"BODY=8BITMIME")
        end = data.find(b"\r\n\r\n")
        head = data[:end] if end >= 0 else data
        if (needs_utf8 or not head.isascii()) and conn.supports("smtputf8"):  # RFC 6531 §3.4
            params.append(b"SMTPUTF8")
        return b" ".join([b"MAIL FROM:<" + sender + b">", *params])

    # -- connections ------------------------------------------------------

    async def _with_connection(self, work: Callable[[_Connection], Awaitable[_T]]) -> _T:
        """Run ``work`` on a pooled or fresh connection, within the connection limit."""
        try:
            async with asyncio.timeout(self.config.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise RelayError(
                None,
                "4.4.1 All downstream connections busy",
                reason=FailureReason.TIMEOUT,
            ) from None
        try:
            return await self._with_slot(work)
        finally:
            self._slots.release()

    async def _with_slot(self, work: Callable[[_Connection], Awaitable[_T]]) -> _T:
        """Run ``work``, retrying once on a dead pooled connection."""
        for attempt in (1, 2):
            conn, reused = await self._acquire()
            try:
                result = await work(conn)
            except RelayError as exc:
                stale = (
                    reused
                    and attempt == 1
                    and not conn.body_sent
                    and (exc.reason is FailureReason.UNREACHABLE or exc.code == 421)
                )
                self._release(conn)
                if stale:
                    log.debug("relay_stale_connection_retried")
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self) -> tuple[_Connection, bool]:
        """An idle pooled connection that answers RSET, else a new one."""
        while self._idle:
            conn = self._idle.pop()
            now = time.monotonic()
            if not conn.reusable(now):
                conn.close()
                continue
            if conn.clean and now - conn.last_used < FRESH_REUSE:
                return conn, True
            try:
                code, _ = await conn.command(b"RSET", limit=min(self.config.timeout, PROBE_TIMEOUT))
            except RelayError:
                continue
            except BaseException:  # cancelled mid-probe: its state is unknown
                conn.close()
                raise
            if code == 250:
                conn.body_sent = False
                return conn, True
            conn.close()
        return await self._open(), False

    def _release(self, conn: _Connection) -> None:
        conn.last_used = time.monotonic()
        conn.body_sent = False
        if (
            self._closed
            or len(self._idle) >= self.config.pool_size
            or not conn.reusable(conn.last_used)
        ):
            conn.close()
        else:
            self._idle.append(conn)

    async def _open(self) -> _Connection:
        cfg = self.config
        want_tls = cfg.tls == "required" or (
            cfg.tls == "opportunistic" and time.monotonic() >= self._tls_fallback_until
        )
        conn = await self._connect()
        try:
            conn = await self._secure(conn, want_tls)
        except BaseException:
            conn.close()
            raise
        log.debug("relay_connected", extra={"host": cfg.host, "port": cfg.port, "tls": conn.tls})
        return conn

    async def _secure(self, conn: _Connection, want_tls: bool) -> _Connection:
        """Apply ``relay.tls`` to a fresh connection (RFC 3207)."""
        cfg = self.config
        if not want_tls:
            return conn
        if not conn.supports("starttls"):
            if cfg.tls == "required":
                conn.close()
                raise RelayError(
                    None, "4.7.5 Downstream does not offer STARTTLS", reason=FailureReason.TLS
                )
            return conn
        try:
            await self._starttls(conn)
        except RelayError:
            conn.close()
            if cfg.tls == "required":
                raise
            self._tls_fallback_until = time.monotonic() + TLS_FALLBACK_MEMORY
            log.warning("relay_tls_failed_falling_back", extra={"host": cfg.host})
            return await self._connect()
        return conn

    async def _connect(self) -> _Connection:
        cfg = self.config
        smtp = SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            local_hostname=self.helo,
            start_tls=False,
        )
        conn = _Connection(smtp, cfg.timeout)
        try:
            await self._greet(conn)
        except BaseException:  # including cancellation half-way through
            smtp.close()
            raise
        return conn

    async def _greet(self, conn: _Connection) -> None:
        """Connect, read the greeting, EHLO (or HELO)."""
        smtp = conn.smtp
        with conn._failures():
            try:
                await smtp.connect()
            except SMTPResponseException as exc:
                # A greeting other than 220 (RFC 5321 §3.1) says nothing about
                # this message: report the downstream unavailable, never a 5xx.
                smtp.close()
                raise RelayError(
                    None,
                    f"4.4.1 Downstream refused the session: {exc.code} {exc.message}",
                    reason=FailureReason.UNREACHABLE,
                ) from None
            try:
                await smtp.ehlo()
            except SMTPHeloError:
                try:
                    await smtp.helo()  # RFC 5321 §3.2: fall back to HELO
                except SMTPHeloError as exc:
                    smtp.close()
                    raise RelayError(
                        None,
                        f"4.4.1 Downstream refused HELO: {exc.code} {exc.message}",
                        reason=FailureReason.UNREACHABLE,
                    ) from None

    async def _starttls(self, conn: _Connection) -> None:
        """STARTTLS (RFC 3207) and a fresh EHLO; any failure -> RelayError(reason tls)."""
        if self._tls_ctx is None:
            self._tls_ctx = await asyncio.to_thread(_tls_context, self.config.tls_verify)
        try:
            with conn._failures():
                await conn.smtp.starttls(
                    server_hostname=self.config.host, tls_context=self._tls_ctx
                )
                await conn.smtp.ehlo()  # RFC 3207 §4.2: forget what was learned before TLS
        except RelayError as exc:
            raise RelayError(
                None,
                "4.7.5 TLS with the downstream could not be established",
                reason=FailureReason.TLS,
            ) from exc
