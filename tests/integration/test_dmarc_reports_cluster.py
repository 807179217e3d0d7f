"""DMARC reports in a cluster: two gateways on one Redis count into one report, sent once.

Both nodes run in this event loop (``running_gateway``), take mail over real
SMTP, resolve through the real test DNS server and relay to one sink. Their
schedules' senders (the objects ``gateway run`` starts) then race for the
same due interval: one takes the lease, the other is skipped with ``locked``,
and a single report counts the messages of both nodes.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import secrets
import smtplib
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from typing import Any

import pytest
import redis
from lxml import etree

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import RunningGatewayHandle, running_gateway
from gateway.testing.require import require
from gateway.testing.sink import SinkServer

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
ZONE = {
    "example.com": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.com")],
}


@pytest.fixture(scope="module")
def cluster_dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE, zones=["com", "org", "test"]) as server:
        yield server


def _send(port: int) -> int:
    raw = (
        "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@example.com>\r\n\r\nhi\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("mail.example.com")
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        return client.data(raw)[0]


async def _rows(node: RunningGatewayHandle, want: int) -> None:
    """Wait (bounded) until the cluster's store counts ``want`` messages."""
    assert node.running.reports is not None
    end = time.monotonic() + 15
    while time.monotonic() < end:
        reports = await node.running.reports.sender.reports("example.com")
        if sum(n for r, _ in reports for _, n in r.rows) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the store never counted {want} messages")


async def test_two_nodes_on_redis_count_into_one_report_that_one_node_sends(
    cluster_dns: DNSServer,
) -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except (redis.RedisError, OSError) as exc:
        require(False, f"Redis at {REDIS_URL} unreachable: {exc}")  # fails under CI=true
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    with SinkServer() as sink:
        overrides: dict[str, Any] = {
            "relay.host": sink.host,
            "relay.port": sink.port,
            "relay.verify_recipients": False,
            "dns.nameservers": [cluster_dns.address],
            "dns.timeout": 2.0,
            "policies": {"spf": {}, "dkim": {}, "dmarc": {}},
            "scores": {},
            "state.backend": "redis",
            "state.url": REDIS_URL,
            "state.key_prefix": prefix,
            "dmarc_reports.enabled": True,
            "dmarc_reports.org_name": "Example Org",
            "dmarc_reports.email": "dmarc-noreply@example.org",
        }
        try:
            async with running_gateway(overrides) as a, running_gateway(overrides) as b:
                for node, count in ((a, 2), (b, 3)):
                    for _ in range(count):
                        assert await asyncio.to_thread(_send, node.smtp_port) == 250
                await _rows(a, 5)
                sink.clear()
                tomorrow = time.time() + 86_400 + 3_600
                assert a.running.reports is not None and b.running.reports is not None
                first, second = await asyncio.gather(
                    a.running.reports.sender.send_due(tomorrow),
                    b.running.reports.sender.send_due(tomorrow),
                )
                outcomes = {(o.outcome, o.reason) for o in [*first, *second]}
                assert ("sent", "ok") in outcomes
                # the loser of the race either found the lease taken or the report settled
                assert ("skipped", "locked") in outcomes or [] in (first, second)
                (report,) = await asyncio.to_thread(sink.wait_for, 1)
                await asyncio.sleep(0.5)
                assert len(sink.messages) == 1
        finally:
            admin = redis.Redis.from_url(REDIS_URL)
            keys = list(admin.scan_iter(match=f"{prefix}*"))
            if keys:
                admin.delete(*keys)
    mail = message_from_bytes(report.data, policy=policy.default)
    (part,) = list(mail.iter_attachments())  # type: ignore[attr-defined]
    doc = etree.fromstring(gzip.decompress(part.get_content()))
    assert [int(c.text) for c in doc.iter("count")] == [5]
    assert doc.findtext("policy_published/p") == "reject"
