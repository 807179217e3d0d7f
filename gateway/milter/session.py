"""One milter connection from the MTA: negotiation, the envelope, the message, the verdict.

The state machine follows what Postfix and Sendmail send: OPTNEG once, then
per SMTP session CONNECT, HELO, and per message MAIL, RCPT..., HEADER...,
EOH, BODY..., EOM (or ABORT), and QUIT (QUIT_NC starts a new SMTP session on
the same socket). Every step but EOM is negotiated no-reply where the MTA
offers it (``SMFIP_NR_*``), so a message costs one round trip. Anything out of
that order, unknown, truncated or oversized closes the connection with a log
line and ``gateway_milter_errors_total{reason}``; the MTA then applies its
``milter_default_action`` (tempfail, so nothing is lost).

The session knows nothing of engines or quarantines: at end of message it
hands a :class:`MilterMessage` to its :class:`MilterBackend` and sends back
the :class:`Decision` (header edits and accept, discard, or an SMTP reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway import metrics
from gateway.milter import codec
from gateway.milter.codec import Connect, MilterProtocolError
from gateway.milter.message import Budget, HeaderEdit, MessageBuilder

__all__ = ["Decision", "MilterBackend", "MilterLimits", "MilterMessage", "MilterSession"]

log = logging.getLogger("gateway.milter")

VERSION = 6
MAX_PACKET = 1 << 20  # bytes; Postfix sends a header field whole (header_size_limit 100 KB)
MAX_RECIPIENTS = 10_000  # per message; Postfix's smtpd_recipient_limit is 1,000
_MACRO_VALUE_LIMIT = 1024  # characters kept of one macro value

# What we ask the MTA for: every step we read, no reply to any but end of message,
# header values with their leading space (exact bytes), no DATA or unknown-command steps.
_WANT_PROTOCOL = (
    codec.SMFIP_NOUNKNOWN
    | codec.SMFIP_NODATA
    | codec.SMFIP_NR_CONN
    | codec.SMFIP_NR_HELO
    | codec.SMFIP_NR_MAIL
    | codec.SMFIP_NR_RCPT
    | codec.SMFIP_NR_DATA
    | codec.SMFIP_NR_UNKN
    | codec.SMFIP_NR_HDR
    | codec.SMFIP_NR_EOH
    | codec.SMFIP_NR_BODY
    | codec.SMFIP_HDR_LEADSPC
)
_NEED_ACTIONS = codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS
_WANT_ACTIONS = _NEED_ACTIONS | codec.SMFIF_SETSYMLIST
# The macros we read, per stage (SMFIC_MACRO carries them before each step).
_MACRO_LISTS = {
    codec.SMFIM_CONNECT: "j {daemon_name} {client_addr} {client_name} {client_port}",
    codec.SMFIM_HELO: "{tls_version} {cipher}",
    codec.SMFIM_ENVFROM: "i {auth_type} {auth_authen}",
    codec.SMFIM_ENVRCPT: "i",
    codec.SMFIM_EOH: "i",
    codec.SMFIM_EOM: "i",
}
_KNOWN_MACROS = frozenset(
    {
        "j", "i", "v", "_", "daemon_name", "daemon_addr", "if_name", "if_addr",
        "client_addr", "client_name", "client_port", "client_ptr", "client_resolve",
        "tls_version", "cipher", "cipher_bits", "cert_subject", "cert_issuer",
        "auth_type", "auth_authen", "auth_author", "mail_addr", "rcpt_addr",
    }
)  # fmt: skip
_CONNECTION_STAGES = (codec.CONNECT, codec.HELO)
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _quickack_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    """The TCP socket to keep in quick-ACK mode; None for unix sockets or without Linux's option.

    Every step but end of message is no-reply, so Postfix writes MAIL, RCPT, each
    header and body chunk back to back as small packets. Its socket has Nagle on:
    each small write after the first waits for our ACK, and Linux delays that ACK
    up to 40 ms when it has nothing to send: measured 15 msg/s per session instead of
    ~50 (bench/milter.py). ACKing at once (re-armed after every read: the kernel
    leaves quick-ACK mode on its own) removes the stall.
    """
    sock = writer.get_extra_info("socket")
    if (
        _TCP_QUICKACK is None
        or sock is None
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
    ):
        return None
    return sock  # type: ignore[no-any-return]


# The no-reply flag of each step that otherwise wants a CONTINUE.
_NO_REPLY = {
    codec.CONNECT: codec.SMFIP_NR_CONN,
    codec.HELO: codec.SMFIP_NR_HELO,
    codec.MAIL: codec.SMFIP_NR_MAIL,
    codec.RCPT: codec.SMFIP_NR_RCPT,
    codec.DATA: codec.SMFIP_NR_DATA,
    codec.UNKNOWN: codec.SMFIP_NR_UNKN,
    codec.HEADER: codec.SMFIP_NR_HDR,
    codec.EOH: codec.SMFIP_NR_EOH,
    codec.BODY: codec.SMFIP_NR_BODY,
}
_CONTINUE = codec.encode(codec.CONTINUE)


@dataclass(frozen=True, slots=True)
class MilterLimits:
    """The bounds of one connection; read again for each message (a reload changes them)."""

    max_message_size: int
    idle_timeout: float  # seconds without a packet
    message_timeout: float  # seconds from the first header to end of message


@dataclass(frozen=True, slots=True)
class MilterMessage:
    """One message as the MTA described it: what the backend judges."""

    client: Connect | None
    helo: str
    mail_from: str  # without the angle brackets
    rcpt_to: tuple[str, ...]
    macros: Mapping[str, str]  # connection and message macros, names without braces
    raw: bytes
    leading_space: bool  # header values travel with their leading space (SMFIP_HDR_LEADSPC)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer at end of message: header edits, then accept, discard or an SMTP reply."""

    kind: Literal["accept", "discard", "reply"]
    reply: str = ""  # "550 5.7.1 text" for kind "reply"
    edits: tuple[HeaderEdit, ...] = field(default=())


class MilterBackend(Protocol):
    """What the sessions talk to."""

    budget: Budget

    @property
    def draining(self) -> bool: ...

    def limits(self) -> MilterLimits: ...

    def refusal(self, reason: Literal["too_big", "no_memory"]) -> str:
        """The SMTP reply for a message the session could not take whole."""
        ...

    async def judge(self, message: MilterMessage) -> Decision: ...


def _address(arg: bytes) -> str:
    text = arg.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


class MilterSession:
    """Serves one MTA connection until QUIT, end of stream, a protocol error or a timeout."""

    def __init__(
        self,
        backend: MilterBackend,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.backend = backend
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.protocol = 0  # negotiated SMFIP_* flags; 0 until OPTNEG
        self.negotiated = False
        self.idle = True  # between messages: safe to close when draining
        self._loop = asyncio.get_running_loop()
        self._quickack = _quickack_socket(writer)
        self._reset_connection()

    def _reset_connection(self) -> None:
        self.client: Connect | None = None
        self.helo = ""
        self.conn_macros: dict[str, str] = {}
        self._reset_message()

    def _reset_message(self) -> None:
        builder = getattr(self, "builder", None)
        if builder is not None:
            builder.release()
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.msg_macros: dict[str, str] = {}
        self.builder: MessageBuilder | None = None
        self.deadline: float | None = None
        self.idle = True

    # -- the loop -------------------------------------------------------------

    async def run(self) -> None:
        limits = self.backend.limits()
        try:
            while True:
                timeout = limits.idle_timeout
                if self.deadline is not None:
                    timeout = min(timeout, self.deadline - self._loop.time())
                try:
                    async with asyncio.timeout(max(timeout, 0.0)):
                        packet = await codec.read_packet(self.reader, MAX_PACKET)
                except TimeoutError:
                    stage = "message" if self.deadline is not None else "idle"
                    self._closed_for("timeout", f"no packet within the {stage} timeout")
                    return
                if packet is None:
                    if not self.idle:
                        log.info("milter_connection_lost", extra={"peer": self.peer})
                    return
                if self._quickack is not None:
                    self._ack_now(self._quickack)
                cmd, payload = packet
                if not await self._dispatch(cmd, payload):
                    return
                if self.idle:
                    if self.backend.draining:
                        return  # between messages: the MTA reconnects to a live gateway
                    limits = self.backend.limits()
        except MilterProtocolError as exc:
            self._closed_for(exc.reason, str(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("milter_connection_lost", extra={"peer": self.peer})
        finally:
            self._reset_message()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    @staticmethod
    def _ack_now(sock: socket.socket) -> None:
        if _TCP_QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def _closed_for(self, reason: str, detail: str) -> None:
        metrics.MILTER_ERRORS.labels(reason=reason).inc()
        log.warning(
            "milter_protocol_error",
            extra={"peer": self.peer, "reason": reason, "detail": detail},
        )

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.backend.limits().idle_timeout):
            await self.writer.drain()

    async def _step_done(self, cmd: bytes) -> None:
        if not self.protocol & _NO_REPLY[cmd]:
            await self._send(_CONTINUE)

    # -- the commands -----------------------------------------------------------

    async def _dispatch(self, cmd: bytes, payload: bytes) -> bool:
        """Handle one packet; False when the connection is to be closed."""
        if cmd == codec.OPTNEG:
            await self._negotiate(payload)
            return True
        if not self.negotiated:
            raise MilterProtocolError("out_of_order", f"command {cmd!r} before option negotiation")
        if cmd == codec.MACRO:
            self._macros(payload)
        elif cmd == codec.CONNECT:
            if self.client is not None:
                raise MilterProtocolError("out_of_order", "a second CONNECT on one connection")
            self.client = codec.decode_connect(payload)
            await self._step_done(cmd)
        elif cmd == codec.HELO:
            self._need_connect(cmd)
            if self.mail_from is not None:  # EHLO inside a transaction resets it (an ABORT follows)
                self._reset_message()
            helo = codec.decode_strings(payload, "helo")
            self.helo = helo[0].decode("utf-8", "replace")[:255]
            await self._step_done(cmd)
        elif cmd == codec.MAIL:
            self._need_connect(cmd)
            if self.mail_from is not None:
                raise MilterProtocolError("out_of_order", "MAIL inside a message")
            args = codec.decode_strings(payload, "mail")
            self.mail_from = _address(args[0])
            self.idle = False
            await self._step_done(cmd)
        elif cmd == codec.RCPT:
            self._need_mail(cmd)
            if self.builder is not None:
                raise MilterProtocolError("out_of_order", "RCPT after the message content began")
            if len(self.rcpt_to) >= MAX_RECIPIENTS:
                raise MilterProtocolError("malformed", f"more than {MAX_RECIPIENTS} recipients")
            args = codec.decode_strings(payload, "rcpt")
            self.rcpt_to.append(_address(args[0]))
            await self._step_done(cmd)
        elif cmd in (codec.DATA, codec.UNKNOWN):
            self._need_connect(cmd)
            await self._step_done(cmd)
        elif cmd == codec.HEADER:
            builder = self._content(cmd)
            if builder.in_body:
                raise MilterProtocolError("out_of_order", "HEADER after end of header")
            parts = codec.decode_strings(payload, "header")
            if len(parts) != 2 or not parts[0]:
                raise MilterProtocolError("malformed", "header: not a name and a value")
            builder.header(parts[0], parts[1])
            await self._step_done(cmd)
        elif cmd == codec.EOH:
            builder = self._content(cmd)
            if builder.in_body:
                raise MilterProtocolError("out_of_order", "a second end of header")
            builder.end_of_header()
            await self._step_done(cmd)
        elif cmd == codec.BODY:
            self._content(cmd).body(payload)
            await self._step_done(cmd)
        elif cmd == codec.BODYEOB:
            builder = self._content(cmd)
            if payload:  # libmilter allows the last chunk to ride on end of body
                builder.body(payload)
            await self._end_of_message(builder)
        elif cmd == codec.ABORT:
            self._reset_message()
        elif cmd == codec.QUIT:
            return False
        elif cmd == codec.QUIT_NC:
            self._reset_connection()
        else:
            raise MilterProtocolError("unknown_command", f"unknown command {cmd!r}")
        return True

    async def _negotiate(self, payload: bytes) -> None:
        if self.negotiated:
            raise MilterProtocolError("out_of_order", "a second option negotiation")
        version, actions, protocol = codec.decode_optneg(payload)
        if version < VERSION:
            raise MilterProtocolError(
                "negotiation",
                f"the MTA speaks milter protocol {version}; the gateway needs {VERSION} "
                f"(Postfix: milter_protocol = {VERSION})",
            )
        if actions & _NEED_ACTIONS != _NEED_ACTIONS:
            raise MilterProtocolError(
                "negotiation", f"the MTA does not allow header changes (actions 0x{actions:x})"
            )
        self.protocol = protocol & _WANT_PROTOCOL
        if not self.protocol & codec.SMFIP_HDR_LEADSPC:
            log.warning(
                "milter_no_leading_space",
                extra={
                    "peer": self.peer,
                    "detail": "the MTA strips the space after each header colon; header "
                    "bytes are rebuilt with one (DKIM with simple header canonicalization "
                    "may fail on unusual spacing)",
                },
            )
        granted = actions & _WANT_ACTIONS
        macros = _MACRO_LISTS if granted & codec.SMFIF_SETSYMLIST else {}
        self.negotiated = True
        await self._send(codec.encode_optneg(VERSION, granted, self.protocol, macros))

    def _macros(self, payload: bytes) -> None:
        stage, values = codec.decode_macros(payload)
        target = self.conn_macros if stage in _CONNECTION_STAGES else self.msg_macros
        for name, value in values.items():
            if name in _KNOWN_MACROS:
                target[name] = value[:_MACRO_VALUE_LIMIT]

    def _need_connect(self, cmd: bytes) -> None:
        if self.client is None:
            raise MilterProtocolError("out_of_order", f"command {cmd!r} before CONNECT")

    def _need_mail(self, cmd: bytes) -> None:
        self._need_connect(cmd)
        if self.mail_from is None:
            raise MilterProtocolError("out_of_order", f"command {cmd!r} before MAIL")

    def _content(self, cmd: bytes) -> MessageBuilder:
        """The message being built; the first content packet starts it and its deadline."""
        self._need_mail(cmd)
        if self.builder is None:
            limits = self.backend.limits()
            self.builder = MessageBuilder(
                limits.max_message_size,
                self.backend.budget,
                leading_space=bool(self.protocol & codec.SMFIP_HDR_LEADSPC),
            )
            self.deadline = self._loop.time() + limits.message_timeout
        return self.builder

    async def _end_of_message(self, builder: MessageBuilder) -> None:
        if builder.failed:
            reason: Literal["too_big", "no_memory"] = "too_big" if builder.too_big else "no_memory"
            reply = self.backend.refusal(reason)
            log.info(
                "milter_message_refused",
                extra={
                    "peer": self.peer,
                    "reason": reason,
                    "size": builder.size,
                    "upstream_queue_id": self.msg_macros.get("i"),
                    "reply": reply,
                },
            )
            decision = Decision("reply", reply)
        else:
            assert self.mail_from is not None  # _content checked
            message = MilterMessage(
                client=self.client,
                helo=self.helo,
                mail_from=self.mail_from,
                rcpt_to=tuple(self.rcpt_to),
                macros={**self.conn_macros, **self.msg_macros},
                raw=builder.finish(),
                leading_space=builder.leading_space,
            )
            decision = await self.backend.judge(message)
        self._reset_message()  # the bytes go back to the budget before we answer
        await self._send(_encode_decision(decision))


def _encode_decision(decision: Decision) -> bytes:
    out = [
        codec.encode_chgheader(e.index, e.name, b"")
        if e.delete
        else codec.encode_insheader(e.index, e.name, e.value)
        for e in decision.edits
    ]
    if decision.kind == "accept":
        out.append(codec.encode(codec.ACCEPT))
    elif decision.kind == "discard":
        out.append(codec.encode(codec.DISCARD))
    else:
        out.append(codec.encode_replycode(decision.reply))
    return b"".join(out)
