"""Hostile SMTP: open-relay tricks and SMTP smuggling against the real gateway."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable

import pytest

from gateway.smtp import RecipientError, check_recipient
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer

Connect = Callable[..., smtplib.SMTP]
ACCEPTED = ("example.org", "lists.example.org")

RELAY_TRICKS = [
    "user@other.test",
    "user%other.test@example.org",
    "user!other.test@example.org",
    "other.test!user@example.org",
    "@hop.test:user@other.test",
    "@hop.test,@hop2.test:user@example.org",
    '"user@other.test"@example.org',
    '"user%other.test"@example.org',
    '"user\\"@other.test"@example.org',
    "user@other.test@example.org",
    "user@example.org@other.test",
    "user@example.org.other.test",
    "user@sub.example.org",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@exämple.org",
]


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_check_recipient_refuses_every_open_relay_trick(address: str) -> None:
    assert check_recipient(address, ACCEPTED) is RecipientError.NOT_ACCEPTED


@pytest.mark.parametrize(
    "address",
    [
        "user@example.org",
        "User.Name@EXAMPLE.ORG",
        "user+tag@Lists.Example.Org",
        '"quoted user"@example.org',
        "user@example.org.",
        "üser@example.org",
    ],
)
def test_check_recipient_accepts_plain_addresses_in_accepted_domains(address: str) -> None:
    assert check_recipient(address, ACCEPTED) is None


@pytest.mark.parametrize("address", ["", "postmaster", "user@", "user@exa mple.org", "a..b@"])
def test_check_recipient_calls_malformed_addresses_syntax_errors(address: str) -> None:
    assert check_recipient(address, ACCEPTED) is RecipientError.SYNTAX


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_gateway_refuses_relay_tricks_with_550_5_7_1_at_rcpt(
    address: str, module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        client.command_encoding = "utf-8"
        assert client.docmd("MAIL FROM:<a@sender.test>")[0] == 250
        code, text = client.docmd(f"RCPT TO:<{address}>")
        assert (code, text[:5]) == (550, b"5.7.1"), (address, code, text)
        # Nothing to relay: DATA has no recipient.
        assert client.docmd("DATA")[0] == 503
    assert fresh_sink.messages == []


def test_gateway_refuses_a_routed_recipient_even_when_its_final_domain_is_ours(
    module_gateway: GatewayProcess, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        client.docmd("MAIL FROM:<a@sender.test>")
        assert client.docmd("RCPT TO:<@other.test:user@example.org>")[0] == 550


# --- SMTP smuggling ---------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<evil@other.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
)

# (name, end-of-data imitation) - none of these is the real <CRLF>.<CRLF>.
VARIANTS = {
    "lf_dot_lf": b"\n.\n",
    "cr_dot_cr": b"\r.\r",
    "lf_dot_crlf": b"\n.\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "crlf_dot_cr": b"\r\n.\r",
    "cr_dot_crlf": b"\r.\r\n",
    "cr_dot_lf": b"\r.\n",
    "lf_dot_cr": b"\n.\r",
    "crlf_dot_nul_crlf": b"\r\n.\x00\r\n",
}


def _session(port: int, payload: bytes) -> list[bytes]:
    """Run one raw session; the reply lines (final lines only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(4096)
        sock.sendall(payload)
        out = b""
        while not out.endswith(b"221 2.0.0 Bye\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return [line for line in out.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_smuggling_variants_never_create_a_second_message(
    name: str, module_gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    """The gateway and the downstream always agree on one message boundary: the real one."""
    fake_end = VARIANTS[name]
    payload = (
        b"EHLO attacker.other.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\n"
        b"DATA\r\nSubject: innocent\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\nQUIT\r\n"
    )
    replies = _session(module_gateway.smtp_port, payload)
    codes = [r[:3] for r in replies]
    # EHLO, MAIL, RCPT, 354, one verdict for the one message, QUIT: nothing was executed
    # from inside the message.
    assert codes[:4] == [b"250", b"250", b"250", b"354"], replies
    assert codes[5:] == [b"221"], replies
    assert codes[4] in (b"250", b"550"), replies
    delivered = fresh_sink.wait_for(1, timeout=2 if codes[4] == b"250" else 0.3)
    assert len(delivered) == (1 if codes[4] == b"250" else 0)
    for message in delivered:
        assert message.mail_from == "a@sender.test"
        assert message.rcpt_tos == ("x@example.org",)
        assert b"smuggled" in message.data  # the fake commands stayed message content
        # The downstream saw no lone dot on any line however it splits lines.
        for sep in (b"\r\n", b"\n", b"\r"):
            assert b"." not in message.data.split(sep), sep


def test_bare_lf_before_a_dot_is_refused_with_a_reason(
    module_gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    replies = _session(
        module_gateway.smtp_port,
        b"EHLO c.sender.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\n"
        b"DATA\r\nSubject: x\r\n\r\nline\n.\nmore\r\n.\r\nQUIT\r\n",
    )
    assert replies[4].startswith(b"550 5.5.2 ")
    assert b"CRLF" in replies[4]


def test_bare_lf_elsewhere_is_relayed_unchanged(
    module_gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    """Bare LF or CR not in front of a dot cannot fake a boundary; the bytes stay as sent."""
    body = b"Subject: x\r\n\r\nunix\nline\rold mac\r\n"
    replies = _session(
        module_gateway.smtp_port,
        b"EHLO c.sender.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\n"
        b"DATA\r\n" + body + b".\r\nQUIT\r\n",
    )
    assert replies[4].startswith(b"250")
    (got,) = fresh_sink.wait_for(1)
    assert got.data.endswith(body)


def test_nul_bytes_and_garbage_commands_get_errors_not_crashes(
    module_gateway: GatewayProcess,
) -> None:
    replies = _session(
        module_gateway.smtp_port,
        b"EHLO c.sender.test\r\n\x00\x00\x00\r\nMAIL\x00FROM:<a@b>\r\n\xff\xfe\r\nNOOP\r\nQUIT\r\n",
    )
    assert [r[:1] for r in replies[1:4]] == [b"5", b"5", b"5"]
    assert replies[-2].startswith(b"250")


def test_commands_out_of_order_are_refused(
    module_gateway: GatewayProcess, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        assert client.docmd("RCPT TO:<x@example.org>")[0] == 503
        assert client.docmd("DATA")[0] == 503
        client.docmd("MAIL FROM:<a@sender.test>")
        assert client.docmd("MAIL FROM:<a@sender.test>")[0] == 503
        assert client.docmd("DATA")[0] == 503


def test_untrusted_proxy_header_is_refused(module_gateway: GatewayProcess) -> None:
    """PROXY is not enabled here: a client claiming another address is refused."""
    with socket.create_connection(("127.0.0.1", module_gateway.smtp_port), timeout=5) as sock:
        sock.recv(4096)
        sock.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 4444 25\r\n")
        reply = sock.recv(4096)
        assert reply.startswith(b"554 5.7.0")
        assert sock.recv(4096) == b""  # and the connection is closed
