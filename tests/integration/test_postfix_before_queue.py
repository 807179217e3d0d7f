"""Postfix in front, before-queue: smtpd_proxy_filter -> gateway -> Postfix's second smtpd.

The Postfix config is ``deploy/postfix/before-queue/`` verbatim, only its ports
swapped for free ones: what the docs tell admins to install is what runs here.
Skips (fails under CI=true) without Postfix or root.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.postfix import PostfixInstance, free_port, snippet
from gateway.testing.require import require_root, require_tool
from gateway.testing.smtpdata import long_lines_body

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(subject: str, body: bytes) -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\nTo: bob@example.org\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@sender.test>\r\n"
        b"\r\n" + body
    )


@dataclass
class Stack:
    postfix: PostfixInstance
    gateway: GatewayProcess
    public_port: int


@pytest.fixture(scope="module")
def stack(dns_server: DNSServer) -> Iterator[Stack]:
    require_tool("postfix", "apt-get install postfix")
    require_root("starting a Postfix master needs root (it drops to the postfix user)")
    back, public = free_port(), free_port()
    overrides = {
        "relay.port": back,
        "dns.nameservers": [dns_server.address],
        "policies.rules": {},
    }
    with GatewayProcess(overrides) as gw:
        ports = {"public": public, "gateway": gw.smtp_port, "back": back}
        with PostfixInstance(
            main_cf=snippet("before-queue", "main.cf", **ports),
            master_cf=snippet("before-queue", "master.cf", **ports),
        ) as postfix:
            yield Stack(postfix, gw, public)


def test_clean_mail_passes_through_the_gateway_and_is_delivered(stack: Stack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.public_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        client.sendmail("alice@sender.test", ["bob@example.org"], message("clean", b"Hi Bob.\r\n"))
    (stored,) = stack.postfix.wait_for_mail(1)
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert msg["X-Spam-Status"].startswith("No, score=")
    assert msg["Authentication-Results"].startswith("mx.example.org;")
    # Postfix (public) -> gateway -> Postfix (return smtpd on the relay port).
    assert "postfix/gateway-return/smtpd" in stack.postfix.log()
    assert stored.endswith(b"\n\nHi Bob.\n")


def test_body_lines_over_1000_octets_pass_through_postfix_and_the_gateway(stack: Stack) -> None:
    """Issue 17: Postfix takes long lines, hands them to the gateway whole (its 2,048-octet
    records joined again), and the gateway relays them unchanged."""
    body = long_lines_body(999, 1001, 2_049, 5_000, 100_000)
    before = len(stack.postfix.mailbox())
    with smtplib.SMTP("127.0.0.1", stack.public_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        client.sendmail("alice@sender.test", ["bob@example.org"], message("long lines", body))
    stored = stack.postfix.wait_for_mail(before + 1)[-1]
    assert stored.endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))


def test_policy_rejection_reaches_the_sending_client_through_postfix(stack: Stack) -> None:
    """GTUBE: the gateway's 550 5.7.1 and its reason are what Postfix answers the client."""
    before = len(stack.postfix.mailbox())
    with smtplib.SMTP("127.0.0.1", stack.public_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        with pytest.raises(smtplib.SMTPDataError) as rejected:
            client.sendmail(
                "alice@sender.test", ["bob@example.org"], message("gtube", GTUBE + b"\r\n")
            )
    assert rejected.value.smtp_code == 550
    reply = rejected.value.smtp_error.decode()
    assert reply.startswith("5.7.1 ") and "GTUBE" in reply, reply
    stack.postfix.wait_for_log(r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 .*GTUBE")
    assert len(stack.postfix.mailbox()) == before, "a rejected message must not be delivered"


def test_gateway_judges_the_real_client_that_postfix_forwards(
    stack: Stack, dns_server: DNSServer
) -> None:
    """Postfix passes the client on with XFORWARD (XFORWARD_README): SPF, HELO and the
    log see 127.0.0.2 and its HELO, not Postfix's own 127.0.0.1 and postfix.test."""
    dns_server.set("bq-xforward.other.test", ("TXT", "v=spf1 ip4:127.0.0.2 -all"))
    before = len(stack.postfix.mailbox())
    with smtplib.SMTP(
        "127.0.0.1", stack.public_port, timeout=30, source_address=("127.0.0.2", 0)
    ) as client:
        client.ehlo("client.sender.test")
        client.sendmail(
            "alice@bq-xforward.other.test", ["bob@example.org"], message("xforward", b"Hi.\r\n")
        )
    stored = stack.postfix.wait_for_mail(before + 1)[-1]
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    results = " ".join(msg["Authentication-Results"].split())
    assert "spf=pass smtp.mailfrom=bq-xforward.other.test" in results, results
    assert "smtp.helo=client.sender.test" in results, results
    ours = next(" ".join(r.split()) for r in msg.get_all("Received") if "(gateway)" in r)
    assert ours.startswith("from client.sender.test ("), ours
    assert "[127.0.0.2]) (via XFORWARD from postfix.test [127.0.0.1]) by " in ours, ours
    event = stack.gateway.wait_for_event(
        "message_processed", match={"mail_from": "alice@bq-xforward.other.test"}
    )
    assert event is not None
    assert (event["client_ip"], event["helo"], event["via"]) == (
        "127.0.0.2",
        "client.sender.test",
        "127.0.0.1",
    )


def test_gateway_down_means_a_temporary_failure_never_a_loss(stack: Stack) -> None:
    """With the gateway stopped Postfix answers 4xx: the sender keeps the message and retries."""
    stack.gateway.stop()  # last test of the module: the fixture only cleans up after it
    with smtplib.SMTP("127.0.0.1", stack.public_port, timeout=30) as client:
        client.ehlo("client.sender.test")
        with pytest.raises(smtplib.SMTPResponseException) as deferred:
            client.sendmail("alice@sender.test", ["bob@example.org"], message("down", b"later\r\n"))
    assert 400 <= deferred.value.smtp_code < 500
