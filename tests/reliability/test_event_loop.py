"""A 25 MB message never blocks the gateway's event loop for long.

The gateway runs in this process; a ticking task measures the longest gap
between its ticks while a client thread sends a 25 MB message (ordinary
lines, or one hostile dot-filled line with no line end at all) through the
whole path: DATA reader, smuggling check, evaluation, relay to the sink.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from rel_support import RCPT, SENDER, overrides, send_raw

from gateway.testing.dnsserver import DNSServer
from gateway.testing.faults import SinkProcess
from gateway.testing.harness import running_gateway

MAX_GAP = 0.1  # seconds of CPU one step may keep the loop from other sessions
SIZE = 25_000_000


def _lines() -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. a.b.c.d 0123456789\r\n"
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: big\r\n\r\n".encode()
    return head + line * (SIZE // len(line))


def _one_dotted_line() -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: dots\r\n\r\n".encode()
    return head + b"x" + b"." * SIZE


@pytest.mark.slow
@pytest.mark.parametrize("make", [_lines, _one_dotted_line], ids=["lines", "one_dotted_line"])
async def test_a_25mb_message_never_blocks_the_loop_over_100ms(
    make: object, dns: DNSServer
) -> None:
    payload = make()  # type: ignore[operator]
    with SinkProcess() as sink:
        async with running_gateway(overrides(sink.port, dns, {"relay.timeout": 30.0})) as gw:
            gaps: list[float] = []
            walls: list[float] = []
            stop = asyncio.Event()

            async def tick() -> None:
                # CPU time of this (the loop's) thread between two ticks: what one
                # callback kept the loop busy for, whatever else the machine runs.
                last, last_wall = time.thread_time(), time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.002)
                    now, now_wall = time.thread_time(), time.perf_counter()
                    gaps.append(now - last)
                    walls.append(now_wall - last_wall)
                    last, last_wall = now, now_wall

            ticker = asyncio.create_task(tick())
            result: list[bytes] = []
            sender = threading.Thread(target=send_raw, args=(gw.smtp_port, payload, result))
            sender.start()
            while sender.is_alive():
                await asyncio.sleep(0.05)
            stop.set()
            await ticker
            worst = max(gaps)
            print(
                f"{make.__name__}: reply={result[-1]!r} worst loop busy {worst * 1000:.1f} ms "  # type: ignore[attr-defined]
                f"(wall gap {max(walls) * 1000:.1f} ms)"
            )
            # A definite answer (the sink refuses the one 25 MB line: 500, passed back).
            assert result and result[-1][:1] in (b"2", b"5"), result
            assert worst < MAX_GAP, f"event loop blocked {worst * 1000:.0f} ms"
