"""STARTTLS abuse: no command injection, no leaked session slots, no hang.

- Bytes pipelined after STARTTLS (before our 220) would be read as commands
  of the TLS session (CVE-2011-0411): refused with 554 and closed.
- A handshake that fails (garbage, a half ClientHello, the client leaving)
  ends the session and gives its slot back: with max_sessions_per_ip = 3,
  ten failed handshakes from one address leave it free to connect.
- SIGTERM is not held up by a session stuck in a handshake.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from rel_support import GatewayFactory, overrides

from gateway.testing.dnsserver import DNSServer
from gateway.testing.sink import SinkServer, make_self_signed


def _start_tls(port: int, after: bytes, *, pipelined: bool) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.recv(4096)
    s.sendall(b"EHLO a.test\r\n")
    while not re.search(rb"^250 ", s.recv(4096), re.M):
        pass
    if pipelined:
        s.sendall(b"STARTTLS\r\n" + after)
        return s, s.recv(4096)
    s.sendall(b"STARTTLS\r\n")
    reply = s.recv(4096)
    if after:
        s.sendall(after)
    return s, reply


def _closed(s: socket.socket) -> bool:
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _active(port: int | None) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^gateway_smtp_sessions_active (\S+)$", text, re.M)
    assert m is not None
    return float(m.group(1))


@pytest.fixture
def tls_gateway(make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    cert, key = make_self_signed(tmp_path)
    with SinkServer() as sink:
        yield make_gateway(
            overrides(
                sink.port,
                dns,
                {
                    "server.tls_cert": str(cert),
                    "server.tls_key": str(key),
                    "server.max_sessions_per_ip": 3,
                    "server.drain_timeout": 20.0,
                },
            )
        )


@pytest.mark.parametrize(
    "after", [b"NOOP\r\nMAIL FROM:<injected@sender.test>\r\n", b"\x16\x03\x01\x00\x05garbage"]
)
def test_bytes_pipelined_after_starttls_are_refused_not_executed(tls_gateway, after: bytes) -> None:  # type: ignore[no-untyped-def]
    s, reply = _start_tls(tls_gateway.smtp_port, after, pipelined=True)
    assert reply.startswith(b"554 5.5.1"), reply
    assert _closed(s)
    s.close()


def test_failed_handshakes_give_their_session_slots_back(tls_gateway) -> None:  # type: ignore[no-untyped-def]
    port = tls_gateway.smtp_port
    for i in range(10):
        kind = i % 4
        if kind == 0:  # garbage instead of a ClientHello
            s, reply = _start_tls(port, bytes(range(256)) * 4, pipelined=False)
        elif kind == 1:  # half a ClientHello, then gone
            s, reply = _start_tls(port, b"\x16\x03\x01\x02\x00\x01", pipelined=False)
        elif kind == 2:  # gone right after our 220
            s, reply = _start_tls(port, b"", pipelined=False)
        else:  # pipelined garbage
            s, reply = _start_tls(port, b"\x00" * 64, pipelined=True)
        assert reply[:3] in (b"220", b"554"), reply
        s.close()
    deadline = time.monotonic() + 10
    while _active(tls_gateway.metrics_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _active(tls_gateway.metrics_port) == 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(4096).startswith(b"220")  # the per-IP limit (3) is not used up


def test_sigterm_is_not_held_up_by_a_stalled_handshake(tls_gateway) -> None:  # type: ignore[no-untyped-def]
    s, reply = _start_tls(tls_gateway.smtp_port, b"\x16\x03\x01\x02\x00\x01", pipelined=False)
    assert reply.startswith(b"220")
    started = time.monotonic()
    assert tls_gateway.stop(timeout=30) == 0
    took = time.monotonic() - started
    s.close()
    assert took < 20.0  # drain_timeout at most; no hang beyond it
