"""STARTTLS, HAProxy PROXY v1/v2 and session limits on the real gateway."""

from __future__ import annotations

import ipaddress
import os
import signal
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import ServerConfig
from gateway.smtp import tls_context
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer, make_self_signed

GatewayFactory = Callable[..., GatewayProcess]
Connect = Callable[..., smtplib.SMTP]
MSG = b"Subject: tls\r\n\r\nbody\r\n"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_self_signed(tmp_path, "mx.example.org")


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_starttls_is_offered_and_the_received_field_records_it(
    make_gateway: GatewayFactory, sink: SinkServer, cert: tuple[Path, Path], connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.tls_cert": str(cert[0]), "server.tls_key": str(cert[1])})
    with connect(gw.smtp_port) as client:
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=_client_tls())
        assert code == 220
        version = client.sock.version()  # type: ignore[union-attr]
        client.ehlo("client.sender.test")
        assert not client.has_extn("starttls")  # not twice
        assert client.docmd("STARTTLS")[0] == 503
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    (got,) = sink.wait_for(1)
    received = got.data.split(b"\r\n\t")
    assert b"with ESMTPS" in received[1]
    assert f"(using {version} with cipher ".encode() in got.data
    assert version in ("TLSv1.2", "TLSv1.3")


def test_starttls_context_requires_tls_1_2(cert: tuple[Path, Path]) -> None:
    server = ServerConfig(
        accepted_domains=("example.org",), tls_cert=str(cert[0]), tls_key=str(cert[1])
    )
    ctx = tls_context(server)
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_handshake_garbage_closes_only_that_session(
    make_gateway: GatewayFactory, sink: SinkServer, cert: tuple[Path, Path], connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.tls_cert": str(cert[0]), "server.tls_key": str(cert[1])})
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as sock:
        sock.recv(4096)
        sock.sendall(b"EHLO x.test\r\n")
        time.sleep(0.1)
        sock.recv(4096)
        sock.sendall(b"STARTTLS\r\n")
        assert sock.recv(4096).startswith(b"220")
        sock.sendall(b"\x16\x03\x01\x00\x05garbagegarbage" * 10)
        with pytest.raises((ConnectionError, TimeoutError)):
            while sock.recv(4096):
                pass
            raise ConnectionResetError
    with connect(gw.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    assert len(sink.wait_for(1)) == 1


# --- PROXY protocol -----------------------------------------------------------------


@pytest.fixture(scope="module")
def _proxy_pair(dns_server: DNSServer) -> Iterator[tuple[GatewayProcess, SinkServer]]:
    with SinkServer() as sink:
        overrides = {
            "relay.port": sink.port,
            "dns.nameservers": [dns_server.address],
            "policies": {},
            "scores": {},
            "server.proxy_protocol": True,
        }
        with GatewayProcess(overrides) as gw:
            yield gw, sink


@pytest.fixture
def proxy_gateway(
    _proxy_pair: tuple[GatewayProcess, SinkServer],
) -> tuple[GatewayProcess, SinkServer]:
    """A shared gateway with PROXY on (loopback trusted) and its emptied sink."""
    _proxy_pair[1].clear()
    return _proxy_pair


def proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A HAProxy PROXY v2 header (PROXY command, TCP over IPv4 or IPv6)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def _send_via_proxy(port: int, header: bytes) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header)
        f = sock.makefile("rb")
        replies = [f.readline()]
        for cmd in (
            b"EHLO relay.sender.test\r\n",
            b"MAIL FROM:<a@sender.test>\r\n",
            b"RCPT TO:<x@example.org>\r\n",
            b"DATA\r\n",
            MSG + b".\r\n",
            b"QUIT\r\n",
        ):
            sock.sendall(cmd)
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            replies.append(line)
        return replies


@pytest.mark.parametrize(
    ("header", "client_ip"),
    [
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n", "198.51.100.7"),
        (proxy_v2("203.0.113.9", "192.0.2.1", 40000, 25), "203.0.113.9"),
        (proxy_v2("2001:db8::7", "2001:db8::1", 40000, 25), "2001:db8::7"),
    ],
    ids=["v1", "v2-ipv4", "v2-ipv6"],
)
def test_proxy_header_from_trusted_network_sets_the_client_address(
    header: bytes, client_ip: str, proxy_gateway: tuple[GatewayProcess, SinkServer]
) -> None:
    gw, sink = proxy_gateway
    replies = _send_via_proxy(gw.smtp_port, header)
    assert replies[0].startswith(b"220 ")
    assert replies[5].startswith(b"250 "), replies
    (got,) = sink.wait_for(1)
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    assert f"(unknown [{literal}])".encode() in got.data.split(b"\r\n")[0]
    deadline = time.monotonic() + 10  # the log reader thread may lag behind the reply
    while not any(e["client_ip"] == client_ip for e in gw.events("message_processed")):
        assert time.monotonic() < deadline, "no message_processed event for the proxied client"
        time.sleep(0.05)


def test_proxy_from_trusted_network_without_header_is_dropped(
    proxy_gateway: tuple[GatewayProcess, SinkServer],
) -> None:
    gw, _ = proxy_gateway
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as sock:
        sock.sendall(b"EHLO no-proxy-header.test\r\n")
        assert sock.recv(4096) == b""


def test_proxy_header_from_untrusted_network_is_refused(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    """Only configured networks may claim another client address."""
    gw = make_gateway(
        sink, {"server.proxy_protocol": True, "server.proxy_trusted_networks": ["192.0.2.0/24"]}
    )
    for header in (
        b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n",
        proxy_v2("198.51.100.7", "192.0.2.1", 40000, 25),
    ):
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as sock:
            f = sock.makefile("rb")
            assert f.readline().startswith(b"220 ")  # an ordinary client to us
            sock.sendall(header + b"MAIL FROM:<a@sender.test>\r\n")
            rest = f.read()
        assert rest.startswith((b"554 5.7.0", b"500")) or rest == b"", rest
        assert b"250" not in rest
    assert sink.messages == []


def _pending(port: int, n: int) -> list[socket.socket]:
    """``n`` connections from the proxy's address that have not sent their PROXY header."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def test_connections_awaiting_their_header_never_count_against_the_announced_client(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    """Issue 14: 60 connections from the load balancer without a header yet must not use
    up the per-IP limit of the client the next header announces."""
    gw = make_gateway(sink, {"server.proxy_protocol": True, "server.max_sessions_per_ip": 20})
    held = _pending(gw.smtp_port, 60)
    try:
        time.sleep(0.2)
        replies = _send_via_proxy(gw.smtp_port, b"PROXY TCP4 198.51.100.7 192.0.2.1 1 25\r\n")
        assert replies[0].startswith(b"220 ") and replies[5].startswith(b"250 "), replies
        assert gw.metric("gateway_smtp_proxy_connections", state="awaiting_header") == 60
        assert gw.metric("gateway_smtp_proxy_connection_limit") == 1000  # the default budget
    finally:
        for s in held:
            s.close()
    assert len(sink.wait_for(1)) == 1


def test_a_proxy_over_its_connection_budget_gets_421_and_a_freed_slot_is_reused(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(
        sink,
        {
            "server.proxy_protocol": True,
            "server.max_sessions_per_ip": 2,
            "server.proxy_max_connections": 3,
        },
    )
    held = _pending(gw.smtp_port, 3)
    try:
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10) as extra:
            # Refused before any header: the budget is the proxy's, whoever is behind it.
            assert extra.recv(4096).startswith(b"421 4.7.0 Too many connections through this")
            assert extra.recv(4096) == b""
        held.pop().close()
        deadline = time.monotonic() + 10
        while gw.metric("gateway_smtp_proxy_connections", state="awaiting_header") != 2:
            assert time.monotonic() < deadline, "the closed connection's slot was not freed"
            time.sleep(0.05)
        replies = _send_via_proxy(gw.smtp_port, b"PROXY TCP4 198.51.100.9 192.0.2.1 1 25\r\n")
        assert replies[5].startswith(b"250 "), replies
    finally:
        for s in held:
            s.close()
    assert gw.metric("gateway_smtp_sessions_refused_total", reason="max_connections_per_proxy") == 1


def test_a_proxy_connection_without_its_header_is_closed_after_the_header_timeout(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink, {"server.proxy_protocol": True, "server.proxy_header_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=20) as silent:
        # Closed by proxy_header_timeout (0.5 s), long before command_timeout (300 s).
        assert silent.recv(4096).startswith(b"421 4.4.2")
        assert silent.recv(4096) == b""
    assert gw.metric("gateway_smtp_sessions_refused_total", reason="proxy_timeout") == 1
    assert gw.metric("gateway_smtp_proxy_connections", state="awaiting_header") == 0
    assert gw.metric("gateway_smtp_proxy_connections", state="session") == 0


# --- session limits -----------------------------------------------------------------


def test_sessions_per_ip_over_the_limit_get_421_and_others_still_work(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.max_sessions_per_ip": 2, "server.proxy_protocol": True})
    # Two sessions from 198.51.100.7 (through the trusted proxy) use its quota ...
    held = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5)
        sock.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n")
        assert sock.recv(4096).startswith(b"220 ")
        held.append(sock)
    try:
        sock = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5)
        sock.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40001 25\r\n")
        assert sock.recv(4096).startswith(b"421 4.7.0")
        assert sock.recv(4096) == b""
        sock.close()
        # ... while another address is still served.
        replies = _send_via_proxy(gw.smtp_port, b"PROXY TCP4 198.51.100.8 192.0.2.1 1 25\r\n")
        assert replies[5].startswith(b"250 ")
    finally:
        for s in held:
            s.close()
    # A released slot is usable again.
    time.sleep(0.2)
    replies = _send_via_proxy(gw.smtp_port, b"PROXY TCP4 198.51.100.7 192.0.2.1 2 25\r\n")
    assert replies[5].startswith(b"250 ")


def test_limits_hold_across_workers_and_a_dead_workers_sessions_are_freed(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    """With two workers a client still gets max_sessions_per_ip in all, whichever worker
    accepts; a worker killed mid-session does not leave its sessions counted."""
    gw = make_gateway(sink, {"server.workers": 2, "server.max_sessions_per_ip": 2})
    assert gw.wait_for_event("gateway_started", after=1) is not None  # both workers up
    held = [socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) for _ in range(2)]
    for s in held:
        assert s.recv(4096).startswith(b"220 ")
    for _ in range(8):  # accepts spread over both workers: each must refuse
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as extra:
            assert extra.recv(4096).startswith(b"421 4.7.0"), "a worker counted alone"
    pids = {e["pid"] for e in gw.events("gateway_started")}
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(gw.events("gateway_started")) < 4:  # both replaced
        assert time.monotonic() < deadline, "the workers were not replaced"
        time.sleep(0.1)
    for s in held:
        s.close()
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as again:
            assert again.recv(4096).startswith(b"220 "), "the dead workers' sessions leaked"


def test_total_sessions_over_the_limit_get_421(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink, {"server.max_sessions": 2})
    held = [socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) for _ in range(2)]
    try:
        for s in held:
            assert s.recv(4096).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as extra:
            assert extra.recv(4096).startswith(b"421 4.7.0")
    finally:
        for s in held:
            s.close()


def test_idle_client_is_timed_out_with_421(make_gateway: GatewayFactory, sink: SinkServer) -> None:
    gw = make_gateway(sink, {"server.command_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as sock:
        assert sock.recv(4096).startswith(b"220 ")
        started = time.monotonic()
        assert sock.recv(4096).startswith(b"421 4.4.2")
        assert time.monotonic() - started < 3


def test_slow_data_is_bounded_by_the_data_timeout(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink, {"server.data_timeout": 1.0})
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"HELO slow.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\n")
        for _ in range(3):
            f.readline()
        sock.sendall(b"DATA\r\n")
        assert f.readline().startswith(b"354")
        started = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(50):  # a byte every 0.1 s: slowloris
                sock.sendall(b"x")
                time.sleep(0.1)
        assert time.monotonic() - started < 4
    assert sink.messages == []


def test_ipv6_clients_are_limited_per_64_prefix(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    """Addresses of one /64 share the per-IP quota; another prefix does not."""
    gw = make_gateway(sink, {"server.max_sessions_per_ip": 1, "server.proxy_protocol": True})
    first = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5)
    try:
        first.sendall(proxy_v2("2001:db8:1:2::1", "2001:db8::25", 1, 25))
        assert first.recv(4096).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as same:
            same.sendall(proxy_v2("2001:db8:1:2:ffff::9", "2001:db8::25", 2, 25))
            assert same.recv(4096).startswith(b"421 4.7.0")
        with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=5) as other:
            other.sendall(proxy_v2("2001:db8:1:3::1", "2001:db8::25", 3, 25))
            assert other.recv(4096).startswith(b"220 ")
    finally:
        first.close()


def test_spent_data_memory_budget_gets_452_and_is_given_back(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    """Message data held across sessions is bounded; past it clients are told to retry."""
    gw = make_gateway(sink, {"server.max_message_size": 100_000, "server.max_data_memory": 150_000})
    holder = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10)
    hf = holder.makefile("rb")
    hf.readline()
    holder.sendall(
        b"HELO h.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
    )
    assert [hf.readline()[:3] for _ in range(4)][-1] == b"354"
    holder.sendall(b"Subject: holder\r\n\r\n" + (b"h" * 78 + b"\r\n") * 1000)  # ~80 kB held
    time.sleep(0.3)
    body = b"Subject: second\r\n\r\n" + (b"s" * 78 + b"\r\n") * 1000
    with connect(gw.smtp_port) as client:
        client.mail("a@sender.test")
        client.rcpt("x@example.org")
        code, text = client.data(body)
        assert (code, text[:5]) == (452, b"4.3.1")
        holder.sendall(b".\r\n")
        assert hf.readline().startswith(b"250 ")
        holder.close()
        client.mail("a@sender.test")  # the budget is back: the retry goes through
        client.rcpt("x@example.org")
        assert client.data(body)[0] == 250
    assert len(sink.wait_for(2)) == 2


def test_received_names_the_client_only_when_reverse_dns_is_forward_confirmed(
    proxy_gateway: tuple[GatewayProcess, SinkServer], dns_server: DNSServer
) -> None:
    gw, sink = proxy_gateway
    dns_server.set("9.100.51.198.in-addr.arpa", ("PTR", "mta.sender.test."))
    dns_server.set("mta.sender.test", ("A", "198.51.100.9"))
    dns_server.set("10.100.51.198.in-addr.arpa", ("PTR", "liar.sender.test."))
    dns_server.set("liar.sender.test", ("A", "192.0.2.77"))
    _send_via_proxy(gw.smtp_port, b"PROXY TCP4 198.51.100.9 192.0.2.1 1 25\r\n")
    _send_via_proxy(gw.smtp_port, b"PROXY TCP4 198.51.100.10 192.0.2.1 1 25\r\n")
    first, second = sink.wait_for(2)
    assert first.data.startswith(
        b"Received: from relay.sender.test (mta.sender.test [198.51.100.9])"
    )
    assert second.data.startswith(b"Received: from relay.sender.test (unknown [198.51.100.10])")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_hundreds_of_idle_and_slowloris_sessions_do_not_starve_a_real_client(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.max_sessions_per_ip": 400, "server.max_sessions": 400})
    before = _rss_kb(gw.pid)
    idle = [socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10) for _ in range(250)]
    slow = []
    try:
        for _ in range(25):  # in DATA, trickling
            s = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10)
            s.sendall(
                b"HELO s.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
            )
            slow.append(s)
        time.sleep(0.5)
        for s in slow:
            s.sendall(b"X-Trickle: 1\r\n")
        started = time.monotonic()
        with connect(gw.smtp_port) as client:
            client.sendmail("a@sender.test", ["x@example.org"], MSG)
        assert time.monotonic() - started < 2.0
        per_session = (_rss_kb(gw.pid) - before) / 275
        assert per_session < 200, f"{per_session:.0f} kB per idle session"
    finally:
        for s in idle + slow:
            s.close()
    assert len(sink.wait_for(1)) == 1
