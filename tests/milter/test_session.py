"""The milter session over a real socket, with a recording backend in place of the engine.

The MTA side is ``gateway.testing.milterclient`` (what Postfix sends, byte for
byte); the listener and session are the gateway's own. Postfix itself drives
the same code in ``tests/integration/test_postfix_milter.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import struct
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dkim
import pytest

from gateway import headers, metrics
from gateway.budget import DataBudget
from gateway.milter.message import header_edits
from gateway.milter.server import MilterListener
from gateway.milter.session import Decision, MilterLimits, MilterMessage
from gateway.testing.milterclient import ALL_PROTOCOL, MilterClient, apply_edits

FOLDED = (
    b"Received: from relay.sender.test (relay.sender.test [192.0.2.1])\r\n"
    b"\tby mx.sender.test with ESMTP id 1234;\r\n\tMon, 23 Nov 2026 05:00:00 +0000\r\n"
    b"From:   Alice  <alice@sender.test>\r\n"
    b"To: bob@example.org,\r\n    carol@example.org\r\n"
    b"Subject:\tfolded\r\n  over three\r\n\tlines   \r\n"
    b"X-Empty:\r\n"
    b"Date: Mon, 23 Nov 2026 05:00:00 +0000\r\n"
    b"Message-ID: <folded@sender.test>\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n\r\n  indented line\r\n\ttab line\r\n\r\n\r\n"
)


@dataclass
class Backend:
    """Records each message; answers with what ``decide`` returns (default: accept)."""

    budget: DataBudget = field(default_factory=lambda: DataBudget(10_000_000))
    max_message_size: int = 1_000_000
    idle_timeout: float = 30.0
    message_timeout: float = 30.0
    draining: bool = False
    messages: list[MilterMessage] = field(default_factory=list)
    decide: Callable[[MilterMessage], Decision] = lambda m: Decision("accept")

    def limits(self) -> MilterLimits:
        return MilterLimits(self.max_message_size, self.idle_timeout, self.message_timeout)

    def refusal(self, reason: Literal["too_big", "no_memory"]) -> str:
        return "552 5.3.4 too big" if reason == "too_big" else "452 4.3.1 no memory"

    async def judge(self, message: MilterMessage) -> Decision:
        self.messages.append(message)
        return self.decide(message)


@pytest.fixture
async def milter() -> AsyncIterator[tuple[MilterListener, Backend]]:
    backend = Backend()
    listener = MilterListener(backend, max_connections=10)
    await listener.start("127.0.0.1:0")
    yield listener, backend
    await listener.stop(1.0)


def client(listener: MilterListener) -> MilterClient:
    assert listener.port is not None
    return MilterClient(("127.0.0.1", listener.port), timeout=10)


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking client call off the loop that serves the milter."""
    return await asyncio.to_thread(fn, *args)


def auth_helpers() -> Any:
    """The DKIM test keys of tests/policies (one RSA key per test session)."""
    path = Path(__file__).parents[1] / "policies" / "auth_helpers.py"
    spec = importlib.util.spec_from_file_location("auth_helpers", path)
    assert spec is not None and spec.loader is not None
    if "auth_helpers" not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules["auth_helpers"] = module
        spec.loader.exec_module(module)
    return sys.modules["auth_helpers"]


def errors(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("gateway_milter_errors_total", {"reason": reason}) or 0


# --- negotiation and the envelope ---------------------------------------------------


async def test_negotiation_asks_for_no_replies_exact_headers_and_our_macros(milter: Any) -> None:
    listener, _ = milter
    with client(listener) as c:
        version, actions, protocol = await run(c.negotiate)
    assert version == 6
    assert actions == 0x001 | 0x010 | 0x100  # ADDHDRS, CHGHDRS, SETSYMLIST
    assert protocol & 0x100000  # HDR_LEADSPC
    for flag in (0x1000, 0x2000, 0x4000, 0x8000, 0x80, 0x40000, 0x80000):  # NR_*
        assert protocol & flag, hex(flag)
    assert not protocol & 0x000800  # RCPT_REJ: rejected recipients are not ours to see
    assert "{client_addr}" in c.macro_lists[0] and "j" in c.macro_lists[0].split()
    assert c.macro_lists[2].split()[0] == "i"


async def test_a_message_reaches_the_backend_byte_exact_with_its_envelope(milter: Any) -> None:
    listener, backend = milter

    def talk() -> Any:
        with client(listener) as c:
            c.negotiate()
            c.macros(b"C", {"j": "mx.example.org", "{daemon_name}": "smtpd"})
            c.connect("relay.sender.test", "192.0.2.1", 41000)
            c.macros(b"H", {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384"})
            c.helo("relay.sender.test")
            c.macros(b"M", {"{auth_authen}": "alice"})
            reply = c.message(FOLDED, rcpt_to=("bob@example.org", "carol@example.org"))
            c.quit()
            return reply

    reply = await run(talk)
    assert reply.final == b"a"
    (msg,) = backend.messages
    assert msg.raw == FOLDED
    assert (msg.client.address, msg.client.port, msg.client.hostname) == (  # type: ignore[union-attr]
        "192.0.2.1",
        41000,
        "relay.sender.test",
    )
    assert (msg.helo, msg.mail_from, msg.rcpt_to) == (
        "relay.sender.test",
        "alice@sender.test",
        ("bob@example.org", "carol@example.org"),
    )
    assert msg.macros["i"] == "4ABCDE1234"
    assert msg.macros["j"] == "mx.example.org" and msg.macros["daemon_name"] == "smtpd"
    assert msg.macros["tls_version"] == "TLSv1.3" and msg.macros["auth_authen"] == "alice"


async def test_without_leading_space_the_usual_single_space_is_put_back(milter: Any) -> None:
    listener, backend = milter
    raw = b"From: a@sender.test\r\nSubject: hi\r\nX-Tab:\tv\r\n\r\nbody\r\n"

    def talk() -> None:
        with client(listener) as c:
            c.negotiate(protocol=ALL_PROTOCOL & ~0x100000)
            c.connect()
            c.helo("h")
            c.message(raw)

    await run(talk)
    assert backend.messages[-1].raw == raw
    assert not backend.messages[-1].leading_space


@pytest.mark.parametrize(
    "canon", [(b"simple", b"simple"), (b"relaxed", b"simple"), (b"relaxed", b"relaxed")]
)
async def test_dkim_signed_folded_mail_is_rebuilt_so_the_signature_still_verifies(
    milter: Any, canon: tuple[bytes, bytes]
) -> None:
    listener, backend = milter
    key = auth_helpers().rsa_key()
    signed = (
        dkim.sign(
            FOLDED,
            b"s1",
            b"sender.test",
            key.private,
            canonicalize=canon,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"x-empty"],
        )
        + FOLDED
    )

    def talk() -> None:
        with client(listener) as c:
            c.negotiate()
            c.connect()
            c.helo("relay.sender.test")
            c.message(signed)

    await run(talk)
    raw = backend.messages[-1].raw
    assert raw == signed
    record = key.record.encode()
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: record)


async def test_several_messages_abort_and_a_new_session_on_one_connection(milter: Any) -> None:
    listener, backend = milter

    def talk() -> list[bytes]:
        finals = []
        with client(listener) as c:
            c.negotiate()
            c.connect()
            c.helo("one.test")
            finals.append(c.message(b"Subject: 1\r\n\r\none\r\n", queue_id="Q1").final)
            c.mail("x@sender.test")  # RSET after MAIL: Postfix aborts the transaction
            c.rcpt("bob@example.org")
            c.send(b"A")
            finals.append(c.message(b"Subject: 2\r\n\r\ntwo\r\n", queue_id="Q2").final)
            c.send(b"K")  # QUIT_NC: the next SMTP session reuses the socket
            c.connect("two.test", "192.0.2.20")
            c.helo("two.test")
            finals.append(c.message(b"Subject: 3\r\n\r\nthree\r\n", queue_id="Q3").final)
            c.quit()
            assert c.closed_by_peer()
        return finals

    assert await run(talk) == [b"a", b"a", b"a"]
    assert [m.macros["i"] for m in backend.messages] == ["Q1", "Q2", "Q3"]
    assert [m.helo for m in backend.messages] == ["one.test", "one.test", "two.test"]
    assert backend.messages[2].client.address == "192.0.2.20"  # type: ignore[union-attr]
    assert backend.budget.used == 0


async def test_edits_and_replies_are_encoded_as_the_mta_expects(milter: Any) -> None:
    listener, backend = milter
    raw = (
        b"Authentication-Results: mx.example.org; spf=pass (forged)\r\n"
        b"Authentication-Results: other.example; dkim=pass\r\n"
        b"X-Spam-Flag: YES\r\n"
        b"authentication-results: MX.example.org;\r\n\tdmarc=pass\r\n"
        b"Subject: hi\r\n\r\nbody\r\n"
    )
    ours = [
        "Authentication-Results: mx.example.org;\r\n\tspf=none smtp.mailfrom=sender.test",
        "X-Spam-Status: No, score=0.0 required=5.0 tests=NONE",
    ]

    def decide(m: MilterMessage) -> Decision:
        drop = headers.untrusted_field("mx.example.org")
        edits = header_edits(m.raw, drop, ours, leading_space=m.leading_space)
        return Decision("accept", edits=tuple(edits))

    backend.decide = decide

    def talk() -> Any:
        with client(listener) as c:
            c.negotiate()
            c.connect()
            c.helo("h")
            return c.message(raw)

    reply = await run(talk)
    assert [(e.kind, e.index, e.name) for e in reply.edits] == [
        ("change", 3, b"authentication-results"),
        ("change", 1, b"X-Spam-Flag"),
        ("change", 1, b"Authentication-Results"),
        ("insert", 0, b"X-Spam-Status"),
        ("insert", 0, b"Authentication-Results"),
    ]
    delivered = apply_edits(raw, reply.edits)
    expected = headers.prepend(
        headers.remove_fields(raw, headers.untrusted_field("mx.example.org")), ours
    )
    assert delivered == expected

    backend.decide = lambda m: Decision("reply", "550 5.7.1 Message rejected: 100% spam")

    def talk2() -> Any:
        with client(listener) as c:
            c.negotiate()
            c.connect()
            c.helo("h")
            return c.message(raw)

    reply = await run(talk2)
    assert (reply.final, reply.text) == (b"y", "550 5.7.1 Message rejected: 100%% spam")


# --- bounds ---------------------------------------------------------------------


async def test_a_message_over_the_size_limit_is_refused_and_its_bytes_freed(milter: Any) -> None:
    listener, backend = milter
    backend.max_message_size = 10_000
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * 2000

    def talk() -> Any:
        with client(listener) as c:
            c.negotiate()
            c.connect()
            c.helo("h")
            first = c.message(big)
            second = c.message(b"Subject: small\r\n\r\nok\r\n")
            return first, second

    first, second = await run(talk)
    assert (first.final, first.text) == (b"y", "552 5.3.4 too big")
    assert second.final == b"a"
    assert len(backend.messages) == 1 and backend.budget.used == 0


async def test_a_spent_memory_budget_is_a_temporary_refusal(milter: Any) -> None:
    listener, backend = milter
    backend.budget = DataBudget(1000)

    def talk() -> Any:
        with client(listener) as c:
            c.negotiate()
            c.connect()
            c.helo("h")
            return c.message(b"Subject: x\r\n\r\n" + b"z" * 5000 + b"\r\n")

    reply = await run(talk)
    assert (reply.final, reply.text) == (b"y", "452 4.3.1 no memory")
    assert backend.budget.used == 0


# --- hostile MTAs ------------------------------------------------------------------


def negotiated(listener: MilterListener) -> MilterClient:
    c = client(listener)
    c.negotiate()
    return c


HOSTILE: dict[str, tuple[str, Callable[[MilterClient], None]]] = {
    "length over the limit": (
        "oversized",
        lambda c: c.raw(struct.pack("!I", 0x7FFFFFFF) + b"B" + b"x" * 100),
    ),
    "length zero": ("malformed", lambda c: c.raw(b"\0\0\0\0")),
    "unknown command": ("unknown_command", lambda c: c.send(b"Z", b"??")),
    "header before MAIL": ("out_of_order", lambda c: (c.connect(), c.send(b"L", b"a\0b\0"))),
    "MAIL before CONNECT": ("out_of_order", lambda c: c.send(b"M", b"<a@b>\0")),
    "second CONNECT": ("out_of_order", lambda c: (c.connect(), c.send(b"C", b"h\x004\0\x01a\0"))),
    "header without value": (
        "malformed",
        lambda c: (c.connect(), c.mail("a@b.test"), c.send(b"L", b"Subject\0")),
    ),
    "header after end of header": (
        "out_of_order",
        lambda c: (c.connect(), c.mail("a@b.test"), c.send(b"N"), c.send(b"L", b"a\0b\0")),
    ),
    "connect with a bad family": ("malformed", lambda c: c.send(b"C", b"host\0X\0\0a\0")),
    "connect cut short": ("malformed", lambda c: c.send(b"C", b"host")),
    "macro without a value": ("malformed", lambda c: c.send(b"D", b"Cj\0")),
    "string without NUL": ("malformed", lambda c: (c.connect(), c.send(b"H", b"helo"))),
    "second negotiation": ("out_of_order", lambda c: c.send(b"O", b"\0\0\0\x06" + b"\0" * 8)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_garbage_closes_the_connection_with_a_log_line_and_a_counter(
    milter: Any, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    listener, _ = milter
    reason, attack = HOSTILE[case]
    before = errors(reason)

    def talk() -> bool:
        with negotiated(listener) as c:
            attack(c)
            return c.closed_by_peer()

    assert await run(talk)
    await asyncio.sleep(0.05)
    assert errors(reason) == before + 1
    assert any(
        r.getMessage() == "milter_protocol_error" and getattr(r, "reason", "") == reason
        for r in caplog.records
    )
    # The listener lives on: a well-behaved MTA is served next.
    fine = await run(negotiated, listener)
    assert fine.version == 6
    fine.close()


async def test_commands_before_negotiation_and_old_protocols_are_refused(milter: Any) -> None:
    listener, _ = milter
    before = errors("out_of_order"), errors("negotiation")

    def talk() -> tuple[bool, bool]:
        with client(listener) as c:
            c.send(b"C", b"h\x004\0\x01a\0")
            first = c.closed_by_peer()
        with client(listener) as c:
            c.send(b"O", struct.pack("!III", 2, 0x1FF, 0x7F))
            second = c.closed_by_peer()
        return first, second

    assert await run(talk) == (True, True)
    await asyncio.sleep(0.05)
    assert (errors("out_of_order"), errors("negotiation")) == (before[0] + 1, before[1] + 1)


async def test_a_packet_cut_short_by_the_peer_is_counted_as_truncated(milter: Any) -> None:
    listener, _ = milter
    before = errors("truncated")

    def talk() -> None:
        with negotiated(listener) as c:
            c.raw(struct.pack("!I", 500) + b"B" + b"x" * 10)

    await run(talk)
    for _ in range(50):
        if errors("truncated") == before + 1:
            break
        await asyncio.sleep(0.02)
    assert errors("truncated") == before + 1


async def test_a_silent_mta_is_timed_out_between_and_inside_messages(milter: Any) -> None:
    listener, backend = milter
    backend.idle_timeout = 0.3
    before = errors("timeout")

    def idle() -> bool:
        with negotiated(listener) as c:
            return c.closed_by_peer()

    assert await run(idle)
    backend.idle_timeout = 30.0
    backend.message_timeout = 0.3

    def slow_message() -> bool:
        with negotiated(listener) as c:
            c.connect()
            c.mail("a@sender.test")
            c.send(b"L", b"Subject\0 x\0")
            return c.closed_by_peer()  # no EOM within the message timeout

    assert await run(slow_message)
    await asyncio.sleep(0.05)
    assert errors("timeout") == before + 2
    assert backend.budget.used == 0


async def test_connections_past_the_limit_are_closed_and_counted(milter: Any) -> None:
    listener, _ = milter
    listener.max_connections = 2
    before = errors("max_connections")

    def talk() -> bool:
        a, b = negotiated(listener), negotiated(listener)
        try:
            with client(listener) as c:
                return c.closed_by_peer()
        finally:
            a.close()
            b.close()

    assert await run(talk)
    assert errors("max_connections") == before + 1


async def test_stop_closes_idle_connections_and_lets_a_message_finish(milter: Any) -> None:
    listener, backend = milter
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    judged = asyncio.Event()

    async def slow_judge(message: MilterMessage) -> Decision:
        loop.call_soon(judged.set)
        await release.wait()
        return Decision("accept")

    backend.judge = slow_judge  # type: ignore[method-assign]
    idle = await run(negotiated, listener)
    busy = await run(negotiated, listener)
    await run(busy.connect)
    await run(busy.helo, "h")
    reply = asyncio.ensure_future(run(busy.message, b"Subject: s\r\n\r\nb\r\n"))
    await judged.wait()
    backend.draining = True
    stopping = asyncio.ensure_future(listener.stop(5.0))
    assert await run(idle.closed_by_peer)
    release.set()
    assert (await reply).final == b"a"
    await stopping
    assert await run(busy.closed_by_peer)
    idle.close()
    busy.close()
