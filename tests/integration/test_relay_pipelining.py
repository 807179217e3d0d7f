"""PIPELINING (RFC 2920) to the downstream: one write for the envelope, exact replies.

A scripted downstream offers PIPELINING and answers each command from a
table, recording for every command whether the rest of its group had already
arrived with it; the recording sink (aiosmtpd) and real TLS cover the rest.
Postfix, which offers PIPELINING, is the downstream of ``test_postfix_*.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gateway.config import RelayConfig
from gateway.relay import FailureReason, Relay, RelayError
from gateway.testing.sink import SinkServer
from gateway.xforward import Forwarded

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\n.hello\r\n"
CLIENT = Forwarded(name=None, addr="198.51.100.7", port=4000, proto="ESMTP", helo="c.test")


@dataclass
class Command:
    line: bytes
    batched: bool  # its DATA (the end of its group) had arrived together with it


@dataclass
class Pipeliner:
    """A downstream offering PIPELINING; ``replies`` maps a command prefix to its reply."""

    replies: dict[bytes, bytes] = field(default_factory=dict)
    trickle: bool = False  # write replies one byte at a time
    extra: bytes = b""  # written after the reply to DATA (a server out of step)
    closing_on: int = 0  # on this connection (1, 2, ...) the second MAIL gets a 421
    commands: list[Command] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    unfinished: int = 0  # sessions that ended inside DATA, before the final "."
    port: int = 0
    server: asyncio.Server | None = None

    def reply_to(self, line: bytes, connection: int, mails: int) -> bytes:
        if connection == self.closing_on and mails == 2:
            return b"421 4.4.2 pipeliner.test closing\r\n"
        for prefix, reply in self.replies.items():
            if line.upper().startswith(prefix.upper()):
                return reply
        verb = line.split()[0].upper()
        return {b"DATA": b"354 go ahead\r\n", b"QUIT": b"221 bye\r\n"}.get(
            verb, b"250 2.0.0 Ok\r\n"
        )

    async def _write(self, w: asyncio.StreamWriter, data: bytes) -> None:
        if not self.trickle:
            w.write(data)
            return
        for i in range(len(data)):
            w.write(data[i : i + 1])
            await w.drain()
            await asyncio.sleep(0)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, mails = self.connections, 0
        try:
            w.write(b"220 pipeliner.test ESMTP\r\n")
            while line := await r.readuntil(b"\r\n"):
                buffered = b"\r\n" + bytes(r._buffer)  # type: ignore[attr-defined]
                self.commands.append(
                    Command(line, b"\r\nDATA\r\n" in buffered or line == b"DATA\r\n")
                )
                if line.upper().startswith(b"EHLO"):
                    w.write(b"250-pipeliner.test\r\n250-PIPELINING\r\n250-XFORWARD NAME ADDR\r\n")
                    w.write(b"250 8BITMIME\r\n")
                    continue
                mails += line.upper().startswith(b"MAIL")
                reply = self.reply_to(line, connection, mails)
                await self._write(w, reply)
                if line.upper() == b"DATA\r\n" and reply.startswith(b"354"):
                    w.write(self.extra)
                    try:
                        body = await r.readuntil(b"\r\n.\r\n")
                    except asyncio.IncompleteReadError:
                        self.unfinished += 1
                        return
                    self.bodies.append(body)
                    await self._write(w, b"250 2.0.0 Ok: queued\r\n")
                if reply.startswith(b"421") or line.upper() == b"QUIT\r\n":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def __aenter__(self) -> Pipeliner:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def verbs(self) -> list[str]:
        return [c.line.split()[0].upper().decode() for c in self.commands]


def relay_for(port: int, **kw: object) -> Relay:
    return Relay(RelayConfig(host="127.0.0.1", port=port, timeout=5.0, **kw), "gateway.test")  # type: ignore[arg-type]


@pytest.fixture
async def relays() -> AsyncIterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for relay in made:
        await relay.close()


@pytest.fixture
async def pipeliner() -> AsyncIterator[Pipeliner]:
    async with Pipeliner() as p:
        yield p


def _relay(relays: list[Relay], port: int, **kw: object) -> Relay:
    relay = relay_for(port, **kw)
    relays.append(relay)
    return relay


async def test_xforward_mail_rcpts_and_data_go_in_one_write(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    relay = _relay(relays, pipeliner.port)
    result = await relay.send(
        "a@example.com", ["b@example.org", "c@example.org"], MESSAGE, client=CLIENT
    )
    assert result.accepted == ("b@example.org", "c@example.org")
    group = pipeliner.commands[1:]
    assert [c.line.split()[0] for c in group] == [b"XFORWARD", b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert all(c.batched for c in group), group
    assert pipeliner.bodies == [MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"]


async def test_replies_arriving_byte_by_byte_keep_their_order(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    pipeliner.trickle = True
    pipeliner.replies = {b"RCPT TO:<c@": b"250-first line\r\n250 2.1.5 second line\r\n"}
    relay = _relay(relays, pipeliner.port)
    result = await relay.send("a@example.com", ["b@example.org", "c@example.org"], MESSAGE)
    assert result.accepted == ("b@example.org", "c@example.org")
    assert result.reply == (250, "2.0.0 Ok: queued")


async def test_a_refused_recipient_after_a_354_delivers_nothing_and_drops_the_connection(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    """DATA got its 354 (one recipient was accepted): a "." would deliver an empty message
    to b@, so the connection is dropped; the exact refusal is a 451 for the whole message."""
    pipeliner.replies = {b"RCPT TO:<c@": b"550 5.1.1 <c@example.org>: no such user\r\n"}
    relay = _relay(relays, pipeliner.port)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org", "c@example.org"], MESSAGE)
    assert (info.value.code, info.value.reason) == (451, FailureReason.TEMPFAIL)
    assert "refused 1 of 2 recipients (c@example.org: 550 5.1.1" in info.value.text
    await asyncio.sleep(0.1)
    assert pipeliner.bodies == [] and pipeliner.unfinished == 1
    pipeliner.replies = {}
    await relay.send("a@example.com", ["b@example.org", "c@example.org"], MESSAGE)
    assert pipeliner.connections == 2 and len(pipeliner.bodies) == 1


async def test_every_recipient_refused_passes_the_verdict_on_and_keeps_the_connection(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    pipeliner.replies = {
        b"RCPT": b"550 5.1.1 no such user\r\n",
        b"DATA": b"554 5.5.1 Error: no valid recipients\r\n",
    }
    relay = _relay(relays, pipeliner.port)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org", "c@example.org"], MESSAGE)
    assert (info.value.code, info.value.text, info.value.permanent) == (
        550,
        "5.1.1 no such user",
        True,
    )
    pipeliner.replies = {
        b"RCPT TO:<c@": b"450 4.2.0 mailbox busy\r\n",
        b"RCPT": b"550 5.1.1 no\r\n",
    }
    pipeliner.replies[b"DATA"] = b"554 5.5.1 Error: no valid recipients\r\n"
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org", "c@example.org"], MESSAGE)
    assert (info.value.code, info.value.permanent) == (450, False)  # any 4xx: temporary
    assert pipeliner.connections == 1  # reset, not dropped: no DATA was in progress
    assert pipeliner.verbs().count("RSET") == 2


async def test_a_refused_sender_is_the_answer_not_the_503s_that_follow(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    pipeliner.replies = {
        b"MAIL": b"553 5.7.1 <a@example.com>: sender rejected\r\n",
        b"RCPT": b"503 5.5.1 Error: need MAIL command\r\n",
        b"DATA": b"503 5.5.1 Error: need RCPT command\r\n",
    }
    relay = _relay(relays, pipeliner.port)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert (info.value.code, info.value.text) == (553, "5.7.1 <a@example.com>: sender rejected")


async def test_a_421_in_the_group_on_a_pooled_connection_is_retried_on_a_fresh_one(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    """The downstream timed the idle connection out: its 421 comes as the first reply."""
    pipeliner.closing_on = 1
    relay = _relay(relays, pipeliner.port)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert pipeliner.connections == 2 and len(pipeliner.bodies) == 2


async def test_replies_nobody_asked_for_are_a_protocol_error(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    pipeliner.replies = {b"DATA": b"354 go ahead\r\n250 2.0.0 and a spare reply\r\n"}
    relay = _relay(relays, pipeliner.port)
    with pytest.raises(RelayError) as info:
        await relay.send("a@example.com", ["b@example.org"], MESSAGE)
    assert (info.value.code, info.value.reason) == (None, FailureReason.TEMPFAIL)
    assert pipeliner.bodies == []


async def test_verify_recipient_sends_mail_rcpt_and_rset_in_one_write(
    pipeliner: Pipeliner, relays: list[Relay]
) -> None:
    pipeliner.replies = {b"RCPT TO:<nobody@": b"550 5.1.1 <nobody@example.org>: unknown\r\n"}
    relay = _relay(relays, pipeliner.port)
    assert await relay.verify_recipient("a@example.com", "nobody@example.org") == (
        550,
        "5.1.1 <nobody@example.org>: unknown",
    )
    assert await relay.verify_recipient("a@example.com", "b@example.org") == (250, "2.0.0 Ok")
    probes = pipeliner.commands[1:]
    assert [c.line.split()[0] for c in probes] == [b"MAIL", b"RCPT", b"RSET"] * 2
    # No DATA in a probe: the group ends with RSET, all of it in one write.
    assert pipeliner.connections == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["offered", "not-offered"])
async def test_the_recording_sink_sees_one_group_only_when_pipelining_is_offered(
    pipelining: bool, relays: list[Relay]
) -> None:
    with SinkServer(tls=True) as sink:
        sink.pipelining = pipelining
        sink.xforward = "NAME ADDR PORT PROTO HELO"
        relay = _relay(relays, sink.port, tls="required", tls_verify=False)
        await relay.send("a@example.com", ["b@example.org"], MESSAGE, client=CLIENT)
        (got,) = sink.wait_for(1)
    assert got.data == MESSAGE and got.pipelined is pipelining
    assert got.xforward and "ADDR=198.51.100.7" in " ".join(got.xforward)
