"""Postfix in front, after-queue: content_filter -> gateway -> Postfix's reinjection smtpd.

``deploy/postfix/after-queue/`` verbatim (ports swapped). Postfix queues the
message first, its queue manager hands it to the gateway, the gateway relays
it back to the reinjection smtpd, Postfix delivers. A gateway rejection turns
into a bounce; a gateway that is down leaves the mail queued until it is back.
Skips (fails under CI=true) without Postfix or root.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    overrides: dict[str, Any]
    public_port: int
    gateway_port: int


def _gateway(stack: Stack) -> GatewayProcess:
    """A gateway on the fixed port Postfix's content_filter points at."""
    overrides = {**stack.overrides, "server.listen": f"127.0.0.1:{stack.gateway_port}"}
    return GatewayProcess(overrides)


@pytest.fixture(scope="module")
def stack(dns_server: DNSServer) -> Iterator[Stack]:
    require_tool("postfix", "apt-get install postfix")
    require_root("starting a Postfix master needs root (it drops to the postfix user)")
    public, gateway_port, back = free_port(), free_port(), free_port()
    ports = {"public": public, "gateway": gateway_port, "back": back}
    with PostfixInstance(
        main_cf=snippet("after-queue", "main.cf", **ports),
        master_cf=f"127.0.0.1:{public} inet n - n - - smtpd\n"
        + snippet("after-queue", "master.cf", **ports),
    ) as postfix:
        overrides = {
            "relay.port": back,
            "dns.nameservers": [dns_server.address],
            "policies.rules": {},
        }
        yield Stack(postfix, overrides, public, gateway_port)


def send(
    stack: Stack,
    subject: str,
    body: bytes,
    *,
    mail_from: str = "alice@sender.test",
    source: str = "127.0.0.1",
) -> None:
    """One message into Postfix's public smtpd, from client address ``source``."""
    with smtplib.SMTP(
        "127.0.0.1", stack.public_port, timeout=30, source_address=(source, 0)
    ) as client:
        client.ehlo("client.sender.test")
        client.sendmail(mail_from, ["bob@example.org"], message(subject, body))


def test_queued_mail_is_filtered_and_reinjected(stack: Stack) -> None:
    with _gateway(stack):
        send(stack, "clean", b"Hi Bob.\r\n")
        (stored,) = stack.postfix.wait_for_mail(1)
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert msg["X-Spam-Status"].startswith("No, score=")
    assert msg["Authentication-Results"].startswith("mx.example.org;")
    log = stack.postfix.log()
    assert "postfix/gateway-filter/smtp" in log and "postfix/gateway-return/smtpd" in log
    assert stored.endswith(b"\n\nHi Bob.\n")


def test_body_lines_over_1000_octets_are_filtered_and_reinjected_unchanged(
    stack: Stack,
) -> None:
    """Issue 17: a queued message with long lines goes to the gateway and back whole."""
    body = long_lines_body(999, 1001, 2_049, 5_000, 100_000)
    before = len(stack.postfix.mailbox())
    with _gateway(stack):
        send(stack, "long lines", body)
        stored = stack.postfix.wait_for_mail(before + 1)[-1]
    assert stored.endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))


def test_gateway_judges_the_client_that_postfix_queued_the_mail_from(
    stack: Stack, dns_server: DNSServer
) -> None:
    """smtp_send_xforward_command=yes on the filter transport: SPF, HELO and the log see
    the queued mail's client (127.0.0.2, its HELO), not Postfix's smtp client."""
    dns_server.set("aq-xforward.other.test", ("TXT", "v=spf1 ip4:127.0.0.2 -all"))
    before = len(stack.postfix.mailbox())
    with _gateway(stack) as gw:
        send(
            stack, "xfwd", b"Hi.\r\n", mail_from="alice@aq-xforward.other.test", source="127.0.0.2"
        )
        stored = stack.postfix.wait_for_mail(before + 1)[-1]
        event = gw.wait_for_event("message_processed")
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    results = " ".join(msg["Authentication-Results"].split())
    assert "spf=pass smtp.mailfrom=aq-xforward.other.test" in results, results
    assert "smtp.helo=client.sender.test" in results, results
    assert event is not None
    assert (event["client_ip"], event["helo"]) == ("127.0.0.2", "client.sender.test")
    # XFORWARD IDENT: Postfix's queue id, so the two logs can be joined.
    assert event["upstream_queue_id"], event
    assert f"{event['upstream_queue_id']}: " in stack.postfix.log()


def test_reinjection_smtpd_logs_the_original_client_and_the_gateways_queue_id(
    stack: Stack,
) -> None:
    """The gateway passes the client on with XFORWARD (smtpd_authorized_xforward_hosts on
    the reinjection smtpd): Postfix's log names it, not the gateway's 127.0.0.1, and the
    gateway's queue id joins the two logs; permit_mynetworks still sees the gateway."""
    before = len(stack.postfix.mailbox())
    with _gateway(stack) as gw:
        send(stack, "xfwd-out", b"Hi.\r\n", source="127.0.0.2")
        stack.postfix.wait_for_mail(before + 1)
        event = gw.wait_for_event("message_processed", match={"client_ip": "127.0.0.2"})
    assert event is not None
    stack.postfix.wait_for_log(
        r"gateway-return/smtpd\[\d+\]: \w+: client=localhost\[127\.0\.0\.1\], "
        rf"orig_queue_id={event['queue_id']}, orig_client=unknown\[127\.0\.0\.2\]"
    )


def test_gateway_rejection_becomes_a_bounce_with_the_reason(stack: Stack) -> None:
    with _gateway(stack):
        send(stack, "gtube", GTUBE + b"\r\n")
        line = stack.postfix.wait_for_log(
            r"status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\]"
            r" said: 550 5\.7\.1 [^\n]*"
        )
    assert "GTUBE" in line.group(0)


def test_gateway_down_keeps_mail_queued_until_it_is_back(stack: Stack) -> None:
    """Never lose a message: Postfix defers while the gateway is down, delivers once it is up."""
    before = len(stack.postfix.mailbox())
    send(stack, "while down", b"Deferred, then delivered.\r\n")
    stack.postfix.wait_for_log(r"relay=none, [^\n]*status=deferred \(connect to 127\.0\.0\.1")
    assert len(stack.postfix.mailbox()) == before
    with _gateway(stack):
        messages = stack.postfix.wait_for_mail(before + 1, timeout=30)
    assert messages[-1].endswith(b"\n\nDeferred, then delivered.\n")
