"""DMARC aggregate reports end to end: real SMTP in, the real gateway, real DNS, real SMTP out.

Mail from a domain with a DMARC record is recorded by the running gateway;
``gateway dmarc-report preview`` shows its rows; ``gateway dmarc-report send``
(as if the day were over) delivers the gzip'd report to the sink, and skips
the external destination that publishes no verification record. Both stores:
SQLite (one gateway) and Redis (a cluster's).
"""

from __future__ import annotations

import gzip
import os
import secrets
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
import redis

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.require import require
from gateway.testing.sink import SinkServer

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
ZONE = {
    "example.com": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "_dmarc.example.com": [
        ("TXT", "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.com,mailto:agg@outside.test")
    ],
    "_dmarc.outside.test": [("TXT", "v=DMARC1; p=none")],
}


@pytest.fixture(scope="module")
def report_dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE, zones=["com", "test", "org"]) as server:
        yield server


def _state(backend: str) -> dict[str, Any]:
    if backend == "local":
        return {}
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except (redis.RedisError, OSError) as exc:
        require(False, f"Redis at {REDIS_URL} unreachable: {exc}")  # fails under CI=true
    return {
        "state.backend": "redis",
        "state.url": REDIS_URL,
        "state.key_prefix": f"gwtest:{secrets.token_hex(6)}:",
    }


def _send(gw: GatewayProcess, mail_from: str, from_header: str) -> int:
    raw = (
        f"From: {from_header}\r\nTo: bob@example.org\r\nSubject: hello\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@example.com>\r\n\r\nhello\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=15) as client:
        client.ehlo("mail.example.com")
        client.mail(mail_from)
        client.rcpt("bob@example.org")
        code, _ = client.data(raw)
        return code


def _cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "dmarc-report", *args, "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _wait_metric(gw: GatewayProcess, value: float, **labels: str) -> None:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if gw.metric("gateway_dmarc_report_records_total", **labels) == value:
            return
        time.sleep(0.1)
    raise AssertionError(f"records {labels} never reached {value}")


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_recorded_mail_is_previewed_and_sent_as_a_gzip_report(
    backend: str, report_dns: DNSServer
) -> None:
    with SinkServer() as sink:
        overrides = {
            "server.hostname": "mx.example.org",
            "relay.host": sink.host,
            "relay.port": sink.port,
            "relay.verify_recipients": False,
            "dns.nameservers": [report_dns.address],
            "dns.timeout": 2.0,
            "policies": {"spf": {}, "dkim": {}, "dmarc": {}},
            "scores": {},
            "dmarc_reports.enabled": True,
            "dmarc_reports.org_name": "Example Org",
            "dmarc_reports.email": "dmarc-noreply@example.org",
            **_state(backend),
        }
        with GatewayProcess(overrides) as gw:
            assert _send(gw, "alice@example.com", "Alice <alice@example.com>") == 250
            assert _send(gw, "alice@example.com", "Alice <alice@example.com>") == 250
            assert _send(gw, "spoof@other.test", "Boss <boss@example.com>") == 250  # quarantined
            _wait_metric(gw, 3, outcome="stored")

            preview = _cli(gw, "preview", "--domain", "example.com")
            assert preview.returncode == 0, preview.stderr
            xml = preview.stdout
            assert "<domain>example.com</domain>" in xml
            assert "<count>2</count>" in xml and "<count>1</count>" in xml
            assert "<disposition>quarantine</disposition>" in xml

            sink.clear()
            tomorrow = str(time.time() + 86_400 + 3_600)
            sent = _cli(gw, "send", "--now", tomorrow)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "sent ok example.com mailto:dmarc@example.com" in sent.stdout
            assert "skipped unverified example.com mailto:agg@outside.test" in sent.stdout
            (report,) = sink.wait_for(1)
            assert report.rcpt_tos == ("dmarc@example.com",)
            assert report.mail_from == "dmarc-noreply@example.org"
            again = _cli(gw, "send", "--now", tomorrow)
            assert "nothing due" in again.stdout  # settled, never sent twice

    mail = message_from_bytes(report.data, policy=policy.default)
    (part,) = list(mail.iter_attachments())  # type: ignore[attr-defined]
    assert part.get_content_type() == "application/gzip"
    document = gzip.decompress(part.get_content()).decode()
    assert document == xml  # what preview showed is what was sent
    parsed: Any = parsedmarc.parse_report_email(
        report.data, offline=True, always_use_local_files=True
    )
    records = parsed["report"]["records"]
    assert sorted(r["count"] for r in records) == [1, 2]
    spoofed = next(r for r in records if r["count"] == 1)
    assert spoofed["policy_evaluated"]["disposition"] == "quarantine"
    assert spoofed["auth_results"]["spf"][0]["domain"] == "other.test"
    assert spoofed["source"]["ip_address"] == "127.0.0.1"
