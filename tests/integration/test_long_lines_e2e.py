"""Body lines over 1,000 octets are relayed byte-exact; only long command lines are refused.

Real mail has such lines and Postfix takes them (issue 17), so no part of the
SMTP path may refuse a message for one: the listener reads DATA in chunks,
the relay writes the body itself, and the downstreams the project ships for
tests and benchmarks take long lines like an MTA. The downstream decides.
The Postfix paths (downstream, before- and after-queue) have their own tests
in the ``test_postfix_*`` modules.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.services import free_port, wait_for_port
from gateway.testing.sink import SinkServer
from gateway.testing.smtpdata import long_lines_body

HEAD = (
    b"From: Alice <alice@sender.test>\r\nTo: bob@example.org\r\n"
    b"Subject: a newsletter with long lines\r\n"
    b"Date: Tue, 20 Aug 2002 10:00:00 +0000\r\n"
    b"Message-ID: <long-lines@sender.test>\r\n"
    b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
)
# 2.2 MB is past the listener's _LONG_LINE (1 MiB), where a line is moved on in pieces.
MESSAGE = HEAD + long_lines_body(999, 1000, 1001, 5_000, 100_000, 2_200_000)


def shipped(port: int, dns: DNSServer) -> dict[str, object]:
    """config.example.toml with every shipped policy, relaying to ``port``, test DNS."""
    return {"relay.port": port, "dns.nameservers": [dns.address], "dns.timeout": 2.0}


@pytest.fixture
def bench_sink() -> Iterator[int]:
    """The benchmark's discarding downstream (``bench.sink``) in its own process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port", str(port)])
    try:
        wait_for_port(port, proc, "bench.sink")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def send(port: int, *, long_command_first: bool = False) -> tuple[int, bytes]:
    """MESSAGE over one SMTP session; the reply to its DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.sender.test")
        if long_command_first:
            # A command line over server.max_command_length is still refused ...
            code, _ = client.docmd("MAIL FROM:<" + "a" * 3000 + "@sender.test>")
            assert code == 500
        # ... and the same session then delivers a message with long body lines.
        client.mail("alice@sender.test")
        client.rcpt("bob@example.org")
        return client.data(MESSAGE)


def test_long_body_lines_are_relayed_byte_exact_with_the_shipped_config(
    sink: SinkServer, dns_server: DNSServer
) -> None:
    with GatewayProcess(shipped(sink.port, dns_server)) as gw:
        code, text = send(gw.smtp_port, long_command_first=True)
    assert code == 250, text
    (got,) = sink.wait_for(1)
    assert got.data.endswith(MESSAGE)  # every received byte, after our prepended fields


def test_the_benchmark_downstream_takes_long_lines(bench_sink: int, dns_server: DNSServer) -> None:
    """The one component that answered "500 5.0.0 Line too long": aiosmtpd's default 1,000."""
    with GatewayProcess(shipped(bench_sink, dns_server)) as gw:
        code, text = send(gw.smtp_port)
    assert code == 250, text


def test_a_downstream_that_refuses_long_lines_decides(
    sink: SinkServer, dns_server: DNSServer
) -> None:
    """The gateway passes the downstream's own verdict on; it adds no refusal of its own."""
    sink.data_reply = "554 5.6.0 Line too long for this MTA"
    with GatewayProcess(shipped(sink.port, dns_server)) as gw:
        assert send(gw.smtp_port) == (554, b"5.6.0 Line too long for this MTA")
