"""The relay against real SMTP servers on loopback.

Downstreams are aiosmtpd servers on the test's own event loop (so the tests
can count connections, slow replies down and drop sessions), plus a tiny
scripted server for failures aiosmtpd cannot produce (a session dropped in
the middle of DATA, a connection that dies after RSET).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from gateway import metrics
from gateway.config import RelayConfig
from gateway.relay import FailureReason, Relay, RelayError, RelayResult
from gateway.testing.sink import SinkServer, make_self_signed

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


# -- downstreams -------------------------------------------------------------


@dataclass
class Got:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    tls: bool
    tls_version: str | None


@dataclass
class Handler:
    messages: list[Got] = field(default_factory=list)
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    data_delay: float = 0.0

    async def handle_MAIL(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        ssl_obj = session.ssl and server.transport.get_extra_info("ssl_object")
        self.messages.append(
            Got(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                mail_options=tuple(envelope.mail_options),
                tls=session.ssl is not None,
                tls_version=ssl_obj.version() if ssl_obj else None,
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"


class Downstream:
    """An aiosmtpd downstream on this loop that counts its connections."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, smtputf8: bool = True) -> None:
        self.handler = Handler()
        self.tls = tls
        self.smtputf8 = smtputf8
        self.connections = 0
        self.sessions: list[SMTPServer] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _factory(self) -> SMTPServer:
        self.connections += 1
        smtp = SMTPServer(
            self.handler,
            hostname="downstream.test",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.tls,
            require_starttls=False,
        )
        self.sessions.append(smtp)
        return smtp

    async def __aenter__(self) -> Downstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()
        await self.server.wait_closed()

    def drop_sessions(self) -> None:
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A raw TCP server running ``script(reader, writer, connection_number)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


async def smtp_until(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stop: Callable[[bytes], bool],
) -> bytes:
    """Answer a plain ESMTP dialogue with 250s until ``stop(command)``; return that command."""
    writer.write(b"220 scripted.test ESMTP\r\n")
    while True:
        line = await reader.readuntil(b"\r\n")
        if stop(line):
            return line
        if line.upper().startswith(b"EHLO"):
            writer.write(b"250-scripted.test\r\n250 8BITMIME\r\n")
        elif line.upper().startswith(b"DATA"):
            writer.write(b"354 go ahead\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            writer.write(b"250 2.0.0 Ok: queued\r\n")
        elif line.upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            return line
        else:
            writer.write(b"250 Ok\r\n")


def make_tls_context(tmp: Path, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    cert_path, key_path = make_self_signed(tmp, "downstream.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    if max_version is not None:
        with warnings.catch_warnings():  # an outdated server is the point of the test
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL really offer TLS 1.1
    return ctx


@pytest.fixture(scope="module")
def tls_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return make_tls_context(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def down() -> AsyncIterator[Downstream]:
    async with Downstream() as d:
        yield d


def relay_for(port: int, **kw: Any) -> Relay:
    base = RelayConfig(host="127.0.0.1", port=port, timeout=5.0, pool_size=4)
    return Relay(replace(base, **kw), "gateway.test")


@pytest.fixture
async def closing() -> AsyncIterator[list[Relay]]:
    relays: list[Relay] = []
    yield relays
    for r in relays:
        await r.close()


def failures(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("gateway_relay_failures_total", {"reason": reason})
    return value or 0.0


def closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


# -- delivery and byte exactness ------------------------------------------------


BYTES_UNDER_TEST = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: =?utf-8?q?t=C3=A9st?=\r\n\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"  # a lone dot line: must not end DATA
    + b"x"
    * 998
    + b"\r\n"  # the longest line RFC 5321 §4.5.3.1.6 allows
    b"8-bit: \xc3\xa9\xff\xfe\x80\r\n"
    b"bare LF\nin the middle and bare CR\rtoo\r\n"
    b"tab\tand trailing space \r\n"
    b"last line without CRLF"
)


async def test_relay_delivers_every_byte_unchanged(down: Downstream, closing: list[Relay]) -> None:
    """Dot lines, a lone '.', 998-octet lines, 8-bit and bare CR/LF arrive exactly;
    a body not ending in CRLF gets the CRLF that RFC 5321 §4.1.1.4 requires."""
    relay = relay_for(down.port)
    closing.append(relay)
    result = await relay.send("a@example.com", ["b@example.org", "c@example.org"], BYTES_UNDER_TEST)
    assert result == RelayResult(
        accepted=("b@example.org", "c@example.org"), reply=(250, "2.0.0 Ok: queued as Q1")
    )
    [got] = down.handler.messages
    assert got.data == BYTES_UNDER_TEST + b"\r\n"
    assert got.mail_from == "a@example.com"
    assert got.rcpt_tos == ("b@example.org", "c@example.org")
    assert "BODY=8BITMIME" in got.mail_options
    assert f"SIZE={len(got.data)}" in got.mail_options  # RFC 1870: the size as delivered


async def test_relay_is_byte_exact_against_the_shared_sink(closing: list[Relay]) -> None:
    """The same bytes through the project's recording SinkServer (its own thread)."""
    data = BYTES_UNDER_TEST + b"\r\n"
    with SinkServer() as sink:
        relay = relay_for(sink.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], data)
        [delivered] = await asyncio.to_thread(sink.wait_for, 1)
    assert delivered.data == data
    assert delivered.rcpt_tos == ("b@example.org",)


async def test_null_sender_and_7bit_message_send_no_8bitmime(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port)
    closing.append(relay)
    await relay.send("", ["b@example.org"], MESSAGE)
    [got] = down.handler.messages
    assert got.mail_from == "<>"
    assert "BODY=8BITMIME" not in got.mail_options


async def test_non_ascii_envelope_uses_smtputf8(down: Downstream, closing: list[Relay]) -> None:
    relay = relay_for(down.port)
    closing.append(relay)
    await relay.send("j\u00f6rg@example.com", ["\u00fc@example.org"], MESSAGE)
    [got] = down.handler.messages
    assert "SMTPUTF8" in got.mail_options
    assert got.rcpt_tos == ("\u00fc@example.org",)


async def test_non_ascii_envelope_to_a_downstream_without_smtputf8_is_a_permanent_550(
    closing: list[Relay],
) -> None:
    """RFC 6531 §3.2: no downgrade; the sender gets 550 5.6.7 and nothing is sent."""
    async with Downstream(smtputf8=False) as d:
        relay = relay_for(d.port)
        closing.append(relay)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["\u00fc@example.org"], MESSAGE)
        assert (info.value.code, info.value.permanent) == (550, True)
        assert info.value.text.startswith("5.6.7")
        assert d.handler.messages == []
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)  # connection still fine
        assert d.connections == 1


async def test_smuggling_pattern_is_refused_before_connecting(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port)
    closing.append(relay)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], b"x\r\n\r\nhi\n.\r\nRSET\r\n")
    assert info.value.code == 550
    assert down.connections == 0


# -- per-recipient and per-stage replies -------------------------------------------


async def test_some_recipients_refused_means_451_and_nothing_delivered(
    down: Downstream, closing: list[Relay]
) -> None:
    """Never a silent partial delivery: RSET before DATA, 451 so the client retries."""
    down.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
    relay = relay_for(down.port)
    closing.append(relay)
    before = failures("tempfail")
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["good@example.org", "bad@example.org"], MESSAGE)
    err = info.value
    assert (err.code, err.permanent, err.reason) == (451, False, FailureReason.TEMPFAIL)
    assert "bad@example.org: 550 5.1.1 no such user" in err.text
    assert down.handler.messages == []
    assert failures("tempfail") == before + 1
    # the connection was RSET and stays usable
    await relay.send("a@example.com", ["good@example.org"], MESSAGE)
    assert down.connections == 1
    assert len(down.handler.messages) == 1


async def test_all_recipients_refused_permanently_passes_the_5xx_on(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.rcpt_replies.update(
        {"x@example.org": "550 5.1.1 no such user", "y@example.org": "553 5.1.3 bad"}
    )
    relay = relay_for(down.port)
    closing.append(relay)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["x@example.org", "y@example.org"], MESSAGE)
    assert (info.value.code, info.value.text, info.value.permanent) == (
        550,
        "5.1.1 no such user",
        True,
    )
    assert info.value.reason is FailureReason.PERMFAIL


async def test_all_recipients_refused_with_any_4xx_is_temporary(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.rcpt_replies.update(
        {"x@example.org": "550 5.1.1 no such user", "y@example.org": "452 4.2.2 mailbox full"}
    )
    relay = relay_for(down.port)
    closing.append(relay)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["x@example.org", "y@example.org"], MESSAGE)
    assert (info.value.code, info.value.text, info.value.permanent) == (
        452,
        "4.2.2 mailbox full",
        False,
    )


@pytest.mark.parametrize(
    ("reply", "code", "permanent"),
    [("451 4.3.0 try later", 451, False), ("554 5.6.0 content refused", 554, True)],
)
async def test_reply_to_the_message_is_passed_back(
    down: Downstream, closing: list[Relay], reply: str, code: int, permanent: bool
) -> None:
    down.handler.data_reply = reply
    relay = relay_for(down.port)
    closing.append(relay)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert (info.value.code, info.value.text, info.value.permanent) == (
        code,
        reply[4:],
        permanent,
    )
    down.handler.data_reply = None
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert down.connections == 1


async def test_refused_sender_is_passed_back_on_one_line(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.mail_reply = "553-5.7.1 sender\r\n553 5.7.1 rejected"  # multi-line
    relay = relay_for(down.port)
    closing.append(relay)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert (info.value.code, info.value.permanent) == (553, True)
    assert info.value.text == "5.7.1 sender 5.7.1 rejected"


# -- failures of the downstream ---------------------------------------------------


async def test_downstream_down_is_unreachable_with_no_code(closing: list[Relay]) -> None:
    relay = relay_for(closed_port())
    closing.append(relay)
    before = failures("unreachable")
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert (info.value.code, info.value.permanent) == (None, False)
    assert info.value.reason is FailureReason.UNREACHABLE
    assert failures("unreachable") == before + 1
    assert not await relay.check()
    with pytest.raises(RelayError):
        await relay.verify_recipient("a@example.com", "b@example.org")


async def test_slow_reply_to_the_message_times_out_within_relay_timeout(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.data_delay = 3.0
    relay = relay_for(down.port, timeout=0.3)
    closing.append(relay)
    before = failures("timeout")
    started = time.monotonic()
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert time.monotonic() - started < 1.5
    assert (info.value.code, info.value.reason) == (None, FailureReason.TIMEOUT)
    assert failures("timeout") == before + 1


async def test_silent_greeting_times_out(closing: list[Relay]) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()

    async with Scripted(mute) as s:
        relay = relay_for(s.port, timeout=0.3)
        closing.append(relay)
        started = time.monotonic()
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert time.monotonic() - started < 1.5
        assert info.value.reason is FailureReason.TIMEOUT
        assert not await relay.check()


async def test_greeting_554_is_unavailable_never_a_bounce(closing: list[Relay]) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"554 5.3.2 no service for you\r\n")
        await reader.read()

    async with Scripted(refuse) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert (info.value.code, info.value.permanent) == (None, False)
        assert "554 5.3.2 no service for you" in info.value.text


async def test_connection_dropped_mid_data_fails_and_is_never_retried(
    closing: list[Relay],
) -> None:
    """After the body went out the downstream may have the message: no retry, ever."""

    async def drop_in_data(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await smtp_until(r, w, lambda line: line.upper().startswith(b"DATA"))
        w.write(b"354 go ahead\r\n")
        await r.readexactly(10)

    async with Scripted(drop_in_data) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE * 100)
        assert (info.value.code, info.value.reason) == (None, FailureReason.UNREACHABLE)
        assert s.connections == 1


async def test_reused_connection_dropped_after_data_is_not_retried(
    closing: list[Relay],
) -> None:
    """Even on a pooled connection, a lost reply to the message is not retried."""

    async def second_message_lost(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"220 scripted.test ESMTP\r\n")
        delivered = 0
        while True:
            line = await r.readuntil(b"\r\n")
            if line.upper().startswith(b"EHLO"):
                w.write(b"250-scripted.test\r\n250 8BITMIME\r\n")
            elif line.upper().startswith(b"DATA"):
                w.write(b"354 go ahead\r\n")
                await r.readuntil(b"\r\n.\r\n")
                delivered += 1
                if delivered == 2:
                    return  # close without replying
                w.write(b"250 2.0.0 Ok\r\n")
            else:
                w.write(b"250 Ok\r\n")

    async with Scripted(second_message_lost) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert info.value.code is None
        assert s.connections == 1


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(
    closing: list[Relay],
) -> None:
    """A pooled connection that dies before DATA costs nothing: one fresh retry."""

    async def dies_at_second_mail(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            mails = 0

            def stop(line: bytes) -> bool:
                nonlocal mails
                mails += line.upper().startswith(b"MAIL")
                return mails == 2

            await smtp_until(r, w, stop)
            return  # drop the connection instead of answering the second MAIL
        await smtp_until(r, w, lambda line: False)

    async with Scripted(dies_at_second_mail) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        result = await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert result.reply[0] == 250
        assert s.connections == 2


async def test_fresh_connection_dying_before_data_is_not_retried(
    closing: list[Relay],
) -> None:
    """The one retry is for stale pooled connections only, not for a failing downstream."""

    async def dies_at_mail(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await smtp_until(r, w, lambda line: line.upper().startswith(b"MAIL"))

    async with Scripted(dies_at_mail) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        with pytest.raises(RelayError):
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert s.connections == 1


async def test_pooled_connections_closed_by_the_downstream_are_replaced(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port)
    closing.append(relay)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    down.drop_sessions()
    await asyncio.sleep(0.05)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert len(down.handler.messages) == 2
    assert down.connections == 2


async def test_downstream_down_then_up_again(closing: list[Relay]) -> None:
    with SinkServer() as sink:
        relay = relay_for(sink.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        await asyncio.to_thread(sink.stop)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert info.value.code is None
        await asyncio.to_thread(sink.start)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert len(await asyncio.to_thread(sink.wait_for, 2)) == 2


# -- connection reuse ----------------------------------------------------------------


async def test_sequential_messages_reuse_one_connection(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port)
    closing.append(relay)
    for _ in range(10):
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert len(down.handler.messages) == 10
    assert down.connections == 1


async def test_concurrent_messages_open_parallel_connections_and_keep_pool_size(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.data_delay = 0.05
    relay = relay_for(down.port, pool_size=2)
    closing.append(relay)
    await asyncio.gather(
        *(relay.send("a@example.com", ["b@example.org"], MESSAGE) for _ in range(5))
    )
    assert down.connections == 5
    assert len(relay._idle) == 2  # only pool_size idle connections are kept
    await asyncio.gather(
        *(relay.send("a@example.com", ["b@example.org"], MESSAGE) for _ in range(2))
    )
    assert down.connections == 5
    assert len(down.handler.messages) == 7


async def test_a_burst_waits_for_max_connections_instead_of_opening_more(
    down: Downstream, closing: list[Relay]
) -> None:
    """300 sessions verifying recipients at once must not open 300 connections."""
    down.handler.data_delay = 0.05
    relay = relay_for(down.port, pool_size=3, max_connections=3)
    closing.append(relay)
    await asyncio.gather(
        *(relay.send("a@example.com", ["b@example.org"], MESSAGE) for _ in range(12)),
        *(relay.verify_recipient("a@example.com", "b@example.org") for _ in range(12)),
    )
    assert down.connections <= 3
    assert len(down.handler.messages) == 12


async def test_no_free_connection_within_the_timeout_is_a_temporary_failure(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port, pool_size=1, max_connections=1, timeout=0.3)
    closing.append(relay)
    await relay._slots.acquire()  # the one connection is busy with a long transaction
    with pytest.raises(RelayError) as info:
        await relay.verify_recipient("a@example.com", "b@example.org")
    assert info.value.code is None and not info.value.permanent
    assert "busy" in info.value.text
    relay._slots.release()
    assert (await relay.verify_recipient("a@example.com", "b@example.org"))[0] == 250


async def test_close_quits_idle_connections(down: Downstream) -> None:
    relay = relay_for(down.port)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    await relay.close()
    await asyncio.sleep(0.05)
    assert all(s.transport is None for s in down.sessions)


# -- STARTTLS ------------------------------------------------------------------------


async def test_tls_off_stays_plain_even_when_offered(
    tls_ctx: ssl.SSLContext, closing: list[Relay]
) -> None:
    async with Downstream(tls=tls_ctx) as d:
        relay = relay_for(d.port, tls="off")
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert d.handler.messages[0].tls is False


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
async def test_starttls_is_used_when_offered(
    tls_ctx: ssl.SSLContext, closing: list[Relay], mode: str
) -> None:
    async with Downstream(tls=tls_ctx) as d:
        relay = relay_for(d.port, tls=mode, tls_verify=False)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], BYTES_UNDER_TEST)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        first, second = d.handler.messages
        assert first.tls and second.tls
        assert first.tls_version in {"TLSv1.2", "TLSv1.3"}
        assert first.data == BYTES_UNDER_TEST + b"\r\n"
        assert d.connections == 1


async def test_opportunistic_goes_plain_when_not_offered(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port, tls="opportunistic")
    closing.append(relay)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert down.handler.messages[0].tls is False


async def test_opportunistic_falls_back_to_plain_after_a_failed_handshake(
    tls_ctx: ssl.SSLContext, closing: list[Relay]
) -> None:
    """The self-signed certificate fails verification; the message still goes, in clear."""
    async with Downstream(tls=tls_ctx) as d:
        relay = relay_for(d.port, tls="opportunistic", tls_verify=True)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert d.handler.messages[0].tls is False
        assert d.connections == 2


async def test_required_without_starttls_fails_with_reason_tls(
    down: Downstream, closing: list[Relay]
) -> None:
    relay = relay_for(down.port, tls="required")
    closing.append(relay)
    before = failures("tls")
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert (info.value.code, info.value.reason) == (None, FailureReason.TLS)
    assert failures("tls") == before + 1
    assert down.handler.messages == []
    assert not await relay.check()


async def test_required_with_an_unverifiable_certificate_fails(
    tls_ctx: ssl.SSLContext, closing: list[Relay]
) -> None:
    async with Downstream(tls=tls_ctx) as d:
        relay = relay_for(d.port, tls="required", tls_verify=True)
        closing.append(relay)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert (info.value.code, info.value.reason) == (None, FailureReason.TLS)
        assert d.handler.messages == []


async def test_required_refuses_a_downstream_offering_only_tls_1_1(
    tmp_path: Path, closing: list[Relay]
) -> None:
    old = make_tls_context(tmp_path, max_version=ssl.TLSVersion.TLSv1_1)
    async with Downstream(tls=old) as d:
        relay = relay_for(d.port, tls="required", tls_verify=False)
        closing.append(relay)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert info.value.reason is FailureReason.TLS
        assert d.handler.messages == []


# -- verification and readiness ------------------------------------------------------------


async def test_verify_recipient_returns_the_rcpt_reply_and_sends_nothing(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.rcpt_replies["gone@example.org"] = "550 5.1.1 <gone@example.org>: no such user"
    relay = relay_for(down.port)
    closing.append(relay)
    assert await relay.verify_recipient("a@example.com", "b@example.org") == (250, "2.1.5 Ok")
    assert await relay.verify_recipient("a@example.com", "gone@example.org") == (
        550,
        "5.1.1 <gone@example.org>: no such user",
    )
    assert down.handler.messages == []
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert down.connections == 1


async def test_check_reports_readiness(down: Downstream, closing: list[Relay]) -> None:
    relay = relay_for(down.port)
    closing.append(relay)
    assert await relay.check()
    assert await relay.check()
    assert down.connections == 1


async def test_send_duration_is_observed(down: Downstream, closing: list[Relay]) -> None:
    count = metrics.REGISTRY.get_sample_value("gateway_relay_duration_seconds_count") or 0.0
    relay = relay_for(down.port)
    closing.append(relay)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert metrics.REGISTRY.get_sample_value("gateway_relay_duration_seconds_count") == count + 1


# -- protocol oddities and cancellation -----------------------------------------------


async def test_a_non_failure_reply_to_rcpt_is_a_protocol_error_not_a_reply_to_pass_on(
    closing: list[Relay],
) -> None:
    async def odd(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await smtp_until(r, w, lambda line: line.upper().startswith(b"RCPT"))
        w.write(b"354 what?\r\n")
        await r.read()

    async with Scripted(odd) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        with pytest.raises(RelayError) as info:
            await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert (info.value.code, info.value.reason) == (None, FailureReason.TEMPFAIL)
        assert "invalid reply (354) to RCPT" in info.value.text


async def test_421_on_a_pooled_connection_before_data_is_retried_on_a_fresh_one(
    closing: list[Relay],
) -> None:
    async def closing_at_second_mail(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        mails = 0

        def stop(line: bytes) -> bool:
            nonlocal mails
            mails += line.upper().startswith(b"MAIL")
            return n == 1 and mails == 2

        await smtp_until(r, w, stop)
        w.write(b"421 4.4.2 idle too long, closing\r\n")

    async with Scripted(closing_at_second_mail) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert s.connections == 2


async def test_verify_recipient_answers_553_style_refusal_for_utf8_without_smtputf8(
    closing: list[Relay],
) -> None:
    async with Downstream(smtputf8=False) as d:
        relay = relay_for(d.port)
        closing.append(relay)
        code, text = await relay.verify_recipient("a@example.com", "\u00fc@example.org")
        assert code == 550 and text.startswith("5.6.7")


async def test_cancelled_send_leaves_no_half_used_connection_in_the_pool(
    down: Downstream, closing: list[Relay]
) -> None:
    down.handler.data_delay = 5.0
    relay = relay_for(down.port)
    closing.append(relay)
    task = asyncio.create_task(relay.send("a@example.com", ["b@example.org"], MESSAGE))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(relay._idle) == 0
    down.handler.data_delay = 0.0
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert down.connections == 2


async def test_relay_still_delivers_after_close_without_pooling(
    down: Downstream,
) -> None:
    """In-flight sessions during a reload may still send through a closed Relay."""
    relay = relay_for(down.port)
    await relay.close()
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert len(relay._idle) == 0
    assert len(down.handler.messages) == 1


def test_helo_must_be_an_ascii_host_name() -> None:
    with pytest.raises(ValueError, match=r"relay\.helo"):
        Relay(RelayConfig(helo="bad name"), "gw.test")
    with pytest.raises(ValueError, match=r"relay\.helo"):
        Relay(RelayConfig(), "m\u00fcller.example")
    assert Relay(RelayConfig(), "gw.test").helo == "gw.test"


class Recording:
    """A scripted downstream that records command verbs; RCPT to bad@ is refused."""

    def __init__(self) -> None:
        self.verbs: list[str] = []

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"220 recording.test ESMTP\r\n")
        while True:
            line = await r.readuntil(b"\r\n")
            verb = line.split()[0].upper().decode()
            self.verbs.append(verb)
            if verb == "EHLO":
                w.write(b"250-recording.test\r\n250 8BITMIME\r\n")
            elif verb == "DATA":
                w.write(b"354 go ahead\r\n")
                await r.readuntil(b"\r\n.\r\n")
                w.write(b"250 2.0.0 Ok\r\n")
            elif verb == "RCPT" and b"bad@" in line:
                w.write(b"550 5.1.1 no such user\r\n")
            elif verb == "QUIT":
                w.write(b"221 bye\r\n")
                return
            else:
                w.write(b"250 Ok\r\n")


async def test_back_to_back_transactions_skip_the_rset_probe(closing: list[Relay]) -> None:
    rec = Recording()
    async with Scripted(rec) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert rec.verbs[:7] == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"]


async def test_idle_pooled_connection_is_probed_with_rset_before_reuse(
    closing: list[Relay], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.relay.FRESH_REUSE", 0.0)
    rec = Recording()
    async with Scripted(rec) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert rec.verbs[:8] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]


async def test_refused_recipient_resets_before_anything_else(closing: list[Relay]) -> None:
    rec = Recording()
    async with Scripted(rec) as s:
        relay = relay_for(s.port)
        closing.append(relay)
        with pytest.raises(RelayError):
            await relay.send("a@example.com", ["b@example.org", "bad@example.org"], MESSAGE)
        assert await relay.verify_recipient("a@example.com", "bad@example.org") == (
            550,
            "5.1.1 no such user",
        )
    assert rec.verbs == [
        "EHLO",
        *("MAIL", "RCPT", "RCPT", "RSET"),  # no DATA after a partial refusal
        *("MAIL", "RCPT", "RSET"),  # verify_recipient
    ]


async def test_opportunistic_remembers_a_failed_handshake_for_new_connections(
    tls_ctx: ssl.SSLContext, closing: list[Relay]
) -> None:
    """One failed handshake, then plain connections: no failing handshake per message."""
    async with Downstream(tls=tls_ctx) as d:
        relay = relay_for(d.port, tls="opportunistic", tls_verify=True)
        closing.append(relay)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert d.connections == 2  # the failed TLS attempt, then plain
        d.drop_sessions()
        await asyncio.sleep(0.05)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
        assert d.connections == 3
        assert [m.tls for m in d.handler.messages] == [False, False]
