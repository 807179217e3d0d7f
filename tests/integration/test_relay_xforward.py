"""The relay passes the client on to the downstream with XFORWARD (Postfix XFORWARD_README).

Behind the gateway, the downstream MTA would otherwise log and judge the
gateway's address. When its EHLO offers XFORWARD, every transaction starts
with the client's identity (only the attributes offered); a downstream that
refuses it still gets the message, and the message bytes never change.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import QuarantineConfig, RelayConfig
from gateway.quarantine import open_quarantine
from gateway.relay import Relay
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess, loopback_overrides
from gateway.testing.quarantine import held_item
from gateway.testing.sink import SinkServer
from gateway.xforward import (
    XFORWARD_ATTRIBUTES,
    XFORWARD_LINE_MAX,
    Forwarded,
    parse_xforward,
    xforward_arguments,
)

pytestmark = pytest.mark.timeout(60)

ALL = " ".join(XFORWARD_ATTRIBUTES)
MSG = (
    b"From: a@sender.test\r\nTo: bob@example.org\r\nSubject: x\r\n\r\n"
    b"Hello.\r\n.a dot line\r\nbare\rCR and bare\nLF\r\n"
)
CLIENT = Forwarded(
    name="mail.sender.test",
    addr="192.0.2.7",
    port=4711,
    proto="ESMTPS",
    helo="mail.sender.test",
    ident="4Zq7abc",
    source="REMOTE",
)


def parsed(arguments: list[bytes]) -> Forwarded:
    """What a receiving listener makes of the commands, in order."""
    current: Forwarded | None = None
    for args in arguments:
        current = parse_xforward(args.decode("ascii"), current)
    assert current is not None
    return current


# --- the commands (pure) --------------------------------------------------------


def test_all_offered_attributes_in_one_command_in_readme_order() -> None:
    assert xforward_arguments(CLIENT, ALL.lower()) == [
        b"NAME=mail.sender.test ADDR=192.0.2.7 PORT=4711 PROTO=ESMTPS"
        b" HELO=mail.sender.test IDENT=4Zq7abc SOURCE=REMOTE"
    ]


def test_only_the_attributes_the_downstream_offered() -> None:
    """Postfix before 2.5 offers no PORT/IDENT: sending them would get a 501."""
    assert xforward_arguments(CLIENT, "NAME ADDR PROTO HELO SOURCE") == [
        b"NAME=mail.sender.test ADDR=192.0.2.7 PROTO=ESMTPS HELO=mail.sender.test SOURCE=REMOTE"
    ]
    assert xforward_arguments(CLIENT, "") == []


def test_unknown_and_unfit_values_are_unavailable_and_plus_and_equals_are_xtext() -> None:
    client = Forwarded(addr="2001:db8::7", helo="a=b+c", name=None)
    (args,) = xforward_arguments(client, "NAME ADDR HELO")
    assert args == b"NAME=[UNAVAILABLE] ADDR=2001:db8::7 HELO=a+3Db+2Bc"
    for helo in ("two words", "caf\u00e9.test", "x" * 256, "=" * 100, "\r\n.", ""):
        (args,) = xforward_arguments(Forwarded(helo=helo), "HELO")
        assert args == b"HELO=[UNAVAILABLE]", helo


def test_long_values_are_split_over_commands_within_the_line_limit() -> None:
    name = ".".join(["n" * 63] * 4)[:255]
    long = Forwarded(name=name, addr="192.0.2.7", helo="h" * 255, ident="i" * 255)
    arguments = xforward_arguments(long, ALL)
    assert len(arguments) > 1
    assert all(len(b"XFORWARD " + a + b"\r\n") <= XFORWARD_LINE_MAX for a in arguments)
    assert replace(parsed(arguments), proto=None, source=None, port=None) == long


_value = st.text(
    st.one_of(st.sampled_from("+=["), st.characters(min_codepoint=0x21, max_codepoint=0x7E)),
    min_size=1,
    max_size=255,
)


@given(
    helo=_value,
    ident=_value,
    proto=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True),
)
def test_the_gateways_own_listener_reads_back_what_the_relay_sends(
    helo: str, ident: str, proto: str
) -> None:
    """Values too long once xtext-encoded go as [UNAVAILABLE], never as a 501."""

    def kept(value: str) -> str | None:
        encoded = len(value) + 2 * (value.count("+") + value.count("="))
        unavailable = value.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
        return value if encoded <= 255 and not unavailable else None

    client = replace(CLIENT, helo=helo, ident=ident, proto=proto)
    expected = replace(client, helo=kept(helo), ident=kept(ident))
    assert parsed(xforward_arguments(client, ALL)) == expected


# --- the relay against a recording downstream ----------------------------------


def relay_for(sink: SinkServer, **kw: Any) -> Relay:
    config = RelayConfig(host="127.0.0.1", port=sink.port, timeout=5.0, pool_size=2)
    return Relay(replace(config, **kw), "gateway.test")


@pytest.fixture
def downstream() -> Iterator[SinkServer]:
    with SinkServer() as sink:
        sink.xforward = ALL
        yield sink


@pytest.fixture
async def relay(downstream: SinkServer) -> AsyncIterator[Relay]:
    relay = relay_for(downstream)
    yield relay
    await relay.close()


async def test_every_transaction_on_a_pooled_connection_carries_its_own_client(
    downstream: SinkServer, relay: Relay
) -> None:
    second = replace(CLIENT, addr="198.51.100.9", ident="second")
    await relay.send("a@sender.test", ["bob@example.org"], MSG, client=CLIENT)
    await relay.send("a@sender.test", ["bob@example.org"], MSG, client=second)
    one, two = downstream.wait_for(2)
    assert parsed([a.encode() for a in one.xforward]) == CLIENT
    assert parsed([a.encode() for a in two.xforward]) == second
    assert one.data == two.data == MSG  # byte-exact: XFORWARD changes nothing in the message


async def test_nothing_is_sent_without_a_client_or_to_a_downstream_without_xforward(
    downstream: SinkServer, relay: Relay
) -> None:
    await relay.send("a@sender.test", ["bob@example.org"], MSG)
    downstream.xforward = None  # EHLO no longer offers it (a fresh connection)
    plain = relay_for(downstream)
    try:
        await plain.send("a@sender.test", ["bob@example.org"], MSG, client=CLIENT)
    finally:
        await plain.close()
    first, second = downstream.wait_for(2)
    assert first.xforward == second.xforward == ()
    assert second.data == MSG


async def test_relay_xforward_false_never_sends_it(downstream: SinkServer) -> None:
    relay = relay_for(downstream, xforward=False)
    try:
        await relay.send("a@sender.test", ["bob@example.org"], MSG, client=CLIENT)
    finally:
        await relay.close()
    (got,) = downstream.wait_for(1)
    assert got.xforward == () and got.data == MSG


async def test_a_downstream_that_refuses_xforward_still_gets_every_message(
    downstream: SinkServer, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    downstream.xforward_reply = "550 5.7.0 Error: insufficient authorization"
    caplog.set_level("DEBUG", logger="gateway.relay")
    for _ in range(3):
        result = await relay.send("a@sender.test", ["bob@example.org"], MSG, client=CLIENT)
        assert result.reply[0] == 250
    assert [m.data for m in downstream.wait_for(3)] == [MSG] * 3
    refusals = [r for r in caplog.records if r.getMessage() == "relay_xforward_refused"]
    # One refusal: the pooled connection does not ask again; a warning once.
    assert [r.levelname for r in refusals] == ["WARNING"]


# --- end to end: client -> gateway -> downstream --------------------------------


@pytest.fixture(scope="module")
def e2e_sink() -> Iterator[SinkServer]:
    with SinkServer() as sink:
        sink.xforward = ALL
        yield sink


@pytest.fixture(scope="module")
def gateway(e2e_sink: SinkServer, dns_server: DNSServer) -> Iterator[GatewayProcess]:
    with GatewayProcess(loopback_overrides(e2e_sink, dns_server)) as gw:
        yield gw


def test_downstream_sees_the_gateways_client_and_queue_id(
    e2e_sink: SinkServer, gateway: GatewayProcess
) -> None:
    e2e_sink.clear()
    with smtplib.SMTP(
        "127.0.0.1", gateway.smtp_port, timeout=10, source_address=("127.0.0.2", 0)
    ) as client:
        assert client.sock is not None
        port = client.sock.getsockname()[1]
        client.ehlo("client.sender.test")
        client.sendmail("a@sender.test", ["bob@example.org"], MSG)
    (got,) = e2e_sink.wait_for(1)
    event = gateway.wait_for_event("message_processed", match={"mail_from": "a@sender.test"})
    assert event is not None
    assert parsed([a.encode() for a in got.xforward]) == Forwarded(
        name=None,  # no reverse DNS for 127.0.0.2 in the test zones
        addr="127.0.0.2",
        port=port,
        proto="ESMTP",
        helo="client.sender.test",
        ident=event["queue_id"],
        source="REMOTE",
    )
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert got.data.endswith(MSG) and head.startswith(b"Received: from client.sender.test")
    assert f"id {event['queue_id']}".encode() in head


def test_behind_a_proxy_the_downstream_sees_the_proxied_client_and_port(
    downstream: SinkServer, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(downstream, {"server.proxy_protocol": True})
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10) as sock:
        replies = sock.makefile("rb")
        sock.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n")

        def reply() -> bytes:
            while (line := replies.readline())[3:4] == b"-":
                pass
            return line

        assert reply().startswith(b"220 ")
        for command in (
            b"EHLO proxied.sender.test",
            b"MAIL FROM:<a@sender.test>",
            b"RCPT TO:<bob@example.org>",
            b"DATA",
        ):
            sock.sendall(command + b"\r\n")
            assert reply()[:1] in (b"2", b"3"), command
        sock.sendall(MSG + b".\r\n")
        assert reply().startswith(b"250 "), "message not accepted"
    (got,) = downstream.wait_for(1)
    forwarded = parsed([a.encode() for a in got.xforward])
    assert (forwarded.addr, forwarded.port, forwarded.helo) == (
        "198.51.100.7",
        40000,
        "proxied.sender.test",
    )


def test_quarantine_release_passes_on_the_stored_client(tmp_path: Path) -> None:
    item = held_item(
        len(MSG),
        queue_id="4ZqREL",
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
        client_ip="192.0.2.1",
        mail_from="s@b.test",
    )

    async def put() -> None:
        store = open_quarantine(QuarantineConfig(path="quarantine"), tmp_path)
        await store.put(item, MSG)
        await store.close()

    asyncio.run(put())
    with SinkServer() as sink:
        sink.xforward = ALL
        config = tmp_path / "gateway.toml"
        config.write_text(
            '[server]\nlisten = "127.0.0.1:0"\nhostname = "mx.example.org"\n'
            'accepted_domains = ["example.org"]\n'
            f"[relay]\nport = {sink.port}\ntimeout = 5.0\n"
            '[quarantine]\npath = "quarantine"\n[state]\npath = "state.sqlite"\n'
            '[metrics]\nlisten = "127.0.0.1:0"\n'
        )
        config_args = ["--config", str(config)]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "quarantine", "release", item.id, *config_args],
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        (got,) = sink.wait_for(1)
    assert parsed([a.encode() for a in got.xforward]) == Forwarded(
        addr="192.0.2.1", helo="mx.b.test", ident="4ZqREL", source="REMOTE"
    )
    assert got.data == b"X-Spam-Flag: YES\r\n" + MSG
