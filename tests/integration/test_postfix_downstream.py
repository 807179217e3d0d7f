"""Postfix as the downstream MTA: the gateway relays into Debian's Postfix, which delivers.

A real ``postfix`` master runs from a throwaway config directory on a loopback
port; the test reads the message from Postfix's Maildir. Skips (fails under
CI=true) when Postfix is not installed or the test does not run as root.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.postfix import PostfixInstance, free_port
from gateway.testing.require import require_root, require_tool
from gateway.testing.smtpdata import long_lines_body

BODY = (
    b"Caf\xc3\xa9 au lait, 8-bit.\r\n"
    b".a line that starts with a dot (dot-stuffed on the wire)\r\n"
    b"..two dots\r\n" + b"x" * 998 + b"\r\n"
    b"last line\r\n"
)
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: to Postfix\r\n"
    b"Message-ID: <pf-down-1@sender.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + BODY
)


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    require_tool("postfix", "apt-get install postfix")
    require_root("starting a Postfix master needs root (it drops to the postfix user)")
    port = free_port()
    with PostfixInstance(
        main_cf="message_size_limit = 40000\n",
        master_cf=f"127.0.0.1:{port} inet n - n - - smtpd\n",
    ) as instance:
        instance.port = port  # type: ignore[attr-defined]
        yield instance


@pytest.fixture(scope="module")
def gateway(postfix: PostfixInstance, dns_server: DNSServer) -> Iterator[GatewayProcess]:
    overrides = {
        "relay.port": postfix.port,  # type: ignore[attr-defined]
        "dns.nameservers": [dns_server.address],
    }
    with GatewayProcess(overrides) as gw:
        yield gw


def test_gateway_relays_into_postfix_which_delivers_the_message_intact(
    postfix: PostfixInstance, gateway: GatewayProcess
) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        refused = client.sendmail("alice@sender.test", ["bob@example.org"], MESSAGE)
    assert refused == {}
    (stored,) = postfix.wait_for_mail(1)
    # Postfix's Maildir stores LF line ends; everything else is as the client sent it.
    assert stored.endswith(BODY.replace(b"\r\n", b"\n"))
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert msg["Delivered-To"] == "bob@example.org"
    assert msg["Return-Path"] == "<alice@sender.test>"
    assert msg["X-Spam-Status"].startswith("No, score=")
    auth = msg["Authentication-Results"]
    assert auth.startswith("mx.example.org;") and "spf=" in auth
    assert msg["Message-ID"] == "<pf-down-1@sender.test>"
    # The gateway's own Received: field sits right below Postfix's.
    received = msg.get_all("Received")
    assert len(received) >= 2 and "by mx.example.org" in received[1]
    assert "status=sent (delivered to maildir)" in postfix.log()


def test_body_lines_over_1000_octets_reach_postfix_unchanged(
    postfix: PostfixInstance, gateway: GatewayProcess
) -> None:
    """Issue 17: long lines (past Postfix's own 2,048-octet record size too) are relayed
    byte-exact and Postfix, the downstream, takes them."""
    body = long_lines_body(999, 1001, 2_049, 5_000, 12_000)
    long = MESSAGE.replace(BODY, body).replace(b"pf-down-1@", b"pf-down-long@")
    before = len(postfix.mailbox())
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        assert client.sendmail("alice@sender.test", ["bob@example.org"], long) == {}
    stored = postfix.wait_for_mail(before + 1)[-1]
    assert stored.endswith(body.replace(b"\r\n", b"\n"))


def test_postfix_refusing_the_message_is_passed_back_as_a_permanent_error(
    postfix: PostfixInstance, gateway: GatewayProcess
) -> None:
    """Postfix's 552 (over message_size_limit) reaches the client as a 5xx; nothing queued."""
    big = MESSAGE.replace(b"last line\r\n", (b"y" * 76 + b"\r\n") * 700)  # ~54 kB
    before = len(postfix.mailbox())
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@sender.test", ["bob@example.org"], big)
    assert 500 <= refused.value.smtp_code < 600
    postfix.wait_for_log(r"message size \d+ exceeds size limit|Message size exceeds")
    assert len(postfix.mailbox()) == before
