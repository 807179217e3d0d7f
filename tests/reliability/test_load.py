"""Load: hundreds of sessions, slow clients, connection limits, memory with big messages.

All on loopback against a gateway subprocess. Clients come from several
loopback addresses (127.0.0.0/8 is all local on Linux) so the per-IP limit
is exercised the way many senders would.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import aiosmtplib
import pytest
from rel_support import RCPT, SENDER, GatewayFactory, overrides, send_raw

from gateway.testing.dnsserver import DNSServer
from gateway.testing.faults import SinkProcess, numbered_message
from gateway.testing.sink import SinkServer


async def _one_message(
    port: int,
    ident: str,
    source: str,
    hold: asyncio.Event | None = None,
    connected: list[str] | None = None,
) -> float:
    """Connect from ``source``, say EHLO, wait for ``hold``, send one message; seconds taken."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        timeout=60,
        source_address=(source, 0),
        local_hostname="load.sender.test",
        start_tls=False,
    )
    await client.connect()
    await client.ehlo()
    if connected is not None:
        connected.append(ident)
    if hold is not None:
        await hold.wait()
    started = time.monotonic()
    await client.sendmail(SENDER, [RCPT], numbered_message(ident, sender=SENDER, rcpt=RCPT))
    took = time.monotonic() - started
    await client.quit()
    return took


def _source(i: int, spread: int) -> str:
    return f"127.0.{1 + i % spread // 250}.{2 + i % spread % 250}"


@pytest.mark.slow
async def test_300_concurrent_sessions_are_all_served(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    """300 sessions open at once (15 per client address, 20 addresses), then all send."""
    with SinkServer() as sink:
        gw = make_gateway(overrides(sink.port, dns))
        hold = asyncio.Event()
        connected: list[str] = []
        tasks = [
            asyncio.create_task(
                _one_message(gw.smtp_port, f"c{i:03d}", _source(i, 20), hold, connected)
            )
            for i in range(300)
        ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(connected) < 300:
            await asyncio.sleep(0.05)
        failed = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
        assert len(connected) == 300, (len(connected), failed[:5])  # all open at once
        started = time.monotonic()
        hold.set()
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.monotonic() - started
        errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        assert errors == [], (len(errors), errors[:5])
        took = [o for o in outcomes if isinstance(o, float)]
        print(f"300 sessions: all sent in {wall:.2f}s, slowest {max(took):.2f}s")
        assert len(sink.wait_for(300, timeout=10)) == 300


async def _slowloris(port: int, source: str, stop: asyncio.Event, phase: str) -> None:
    """Hold a session by dribbling one byte every 2 s (in a command, or inside DATA)."""
    with contextlib.suppress(OSError, TimeoutError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        await reader.readline()
        if phase == "data":
            mail, rcpt = f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{RCPT}>".encode()
            for cmd in (b"EHLO slow.test", mail, rcpt, b"DATA"):
                writer.write(cmd + b"\r\n")
                while (await reader.readline())[3:4] == b"-":
                    pass
        payload = b"EHLO slowly-but-surely.test\r\n" if phase == "command" else b"Subject: s" * 1000
        for i in range(10**6):
            if stop.is_set():
                break
            writer.write(payload[i % len(payload) : i % len(payload) + 1])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
        writer.close()


@pytest.mark.slow
async def test_slow_and_idle_clients_do_not_starve_others(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    """100 clients dribbling a byte every 2 s (commands and DATA) and 50 idle ones:
    40 ordinary messages still complete, each within 5 s."""
    with SinkServer() as sink:
        gw = make_gateway(overrides(sink.port, dns))
        stop = asyncio.Event()
        idle: list[socket.socket] = []
        for i in range(50):
            idle.append(
                socket.create_connection(
                    ("127.0.0.1", gw.smtp_port), source_address=(f"127.0.5.{1 + i % 10}", 0)
                )
            )
        slow = [
            asyncio.create_task(
                _slowloris(gw.smtp_port, _source(i, 10), stop, "command" if i % 2 else "data")
            )
            for i in range(100)
        ]
        await asyncio.sleep(2.0)
        try:
            async with asyncio.timeout(60):
                took = await asyncio.gather(
                    *(
                        _one_message(gw.smtp_port, f"n{i:02d}", f"127.0.9.{i + 1}", None)
                        for i in range(40)
                    )
                )
        finally:
            stop.set()
            for s in idle:
                s.close()
            await asyncio.gather(*slow)
        print(f"with 150 slow/idle sessions: 40 messages, slowest {max(took):.2f}s")
        assert max(took) < 5.0
        assert len(sink.wait_for(40, timeout=10)) == 40


def _greeting(port: int, source: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s, s.recv(512)


def test_per_ip_and_total_limits_answer_421_then_recover(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    """Past max_sessions_per_ip (5) one address gets 421 and a close, others are still
    served up to max_sessions (12); when sessions end, the same address is served again."""
    with SinkServer() as sink:
        gw = make_gateway(
            overrides(sink.port, dns, {"server.max_sessions_per_ip": 5, "server.max_sessions": 12})
        )
        held = [_greeting(gw.smtp_port, "127.0.3.1") for _ in range(8)]
        codes = [g[:3] for _, g in held]
        assert codes.count(b"220") == 5 and codes.count(b"421") == 3, codes
        for s, g in held:
            if g.startswith(b"421"):
                assert s.recv(512) == b""  # closed cleanly after the 421
        others = [_greeting(gw.smtp_port, f"127.0.4.{i + 1}") for i in range(9)]
        codes = [g[:3] for _, g in others]
        assert codes.count(b"220") == 7 and codes.count(b"421") == 2, codes  # 5 + 7 = 12
        for s, _ in held + others:
            s.close()
        time.sleep(0.5)
        again, greeting = _greeting(gw.smtp_port, "127.0.3.1")
        assert greeting.startswith(b"220")
        again.close()
        metrics = _scrape(gw.metrics_port)
        assert re.search(
            r'gateway_smtp_sessions_refused_total\{reason="max_sessions_per_ip"\} 3', metrics
        )
        assert re.search(r'gateway_smtp_sessions_refused_total\{reason="max_sessions"\} 2', metrics)


def _scrape(port: int | None) -> str:
    import urllib.request

    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


MEMORY_BOUND_MB = 480  # see docs/guarantees.md: peak RSS with 4 concurrent 20 MB messages


@pytest.mark.slow
def test_memory_stays_bounded_with_four_concurrent_20mb_messages(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    with SinkProcess() as sink:
        gw = make_gateway(overrides(sink.port, dns, {"relay.timeout": 60.0}))
        before = _vm_hwm_mb(gw.pid)
        line = b"z" * 76 + b"\r\n"
        body = line * (20_000_000 // len(line))
        results: list[list[bytes]] = [[] for _ in range(4)]

        def send(i: int) -> None:
            msg = numbered_message(f"big{i}", sender=SENDER, rcpt=RCPT, body=body)
            send_raw(gw.smtp_port, msg, results[i])  # no line starts with "." (no stuffing)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        peak = _vm_hwm_mb(gw.pid)
        print(f"gateway VmHWM: {before:.0f} MB idle, {peak:.0f} MB after 4 x 20 MB concurrently")
        assert all(r and r[-1].startswith(b"250") for r in results), [r[-1:] for r in results]
        assert peak < MEMORY_BOUND_MB
