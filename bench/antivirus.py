"""The antivirus policy's cost per message: the pipeline with a local clamd against without it.

    python -m bench.antivirus               # 300 messages of the bench mix
    python -m bench.antivirus --messages 600

Same mix, same DNS server, same shipped config.example.toml policies; the
second engine also has ``[policies.antivirus]`` enabled against a real clamd
(``gateway.testing.clamd``: its own config, a two-signature database, no
freshclam). Reports, per message, the gateway's CPU, wall time and clamd's
CPU (from /proc), and then the strategy question of the policy's design: one
``zINSTREAM`` of the raw message against one stream per decoded MIME part,
straight through the client. Bounded: a fixed count, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.mix import BenchMessage, build_mix, make_domain
from bench.pipeline import bench_records, envelope
from gateway.api import Services
from gateway.config import load_config
from gateway.dns import CachingResolver
from gateway.engine import Engine, parse_message
from gateway.state import open_state
from gateway.testing.clamd import ThrowawayClamd
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import write_config
from policies._clamd import ClamdClient, parse_address
from policies._mime_walk import walk_message

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def make_engine(dns: str, tmp: Path, overrides: dict[str, object]) -> Engine:
    cfg = write_config({"dns.nameservers": [dns], "server.listen": "127.0.0.1:0", **overrides}, tmp)
    config = load_config(cfg)
    services = Services(
        resolver=CachingResolver(config.dns),
        state=open_state(config.state, config.base_dir),
        hostname=config.server.hostname,
        config_dir=config.base_dir,
    )
    engine = Engine(config, Engine.make_plan(config), services)
    await engine.start()
    return engine


async def run_mix(engine: Engine, messages: list[BenchMessage]) -> tuple[float, float, list[float]]:
    """(process CPU s, wall s, wall per message) for one pass over ``messages``."""
    walls = []
    c0, t0 = time.process_time(), time.perf_counter()
    for i, msg in enumerate(messages):
        w0 = time.perf_counter()
        ev = await engine.evaluate(envelope(msg, i), msg.data)
        walls.append(time.perf_counter() - w0)
        assert not any(s.name.startswith("AV_") for s in ev.verdict.symbols), ev.verdict.symbols
    return time.process_time() - c0, time.perf_counter() - t0, walls


async def strategies(address: str, messages: list[BenchMessage], pid: int) -> None:
    client = ClamdClient(parse_address(address), connect_timeout=2, read_timeout=30, limit=10)
    parts = []
    for m in messages:
        walk = walk_message(parse_message(m.data), m.data, max_depth=20, max_parts=500)
        parts.append([p.content(full=True).data for p in walk.parts])
    for label in ("whole message", "one stream per part"):
        c0, t0, k0 = time.process_time(), time.perf_counter(), cpu_of(pid)
        streams = 0
        for m, decoded in zip(messages, parts, strict=True):
            if label == "whole message":
                await client.scan(m.data)
                streams += 1
            else:
                for data in decoded:
                    await client.scan(data)
                    streams += 1
        wall, cpu, clamd = time.perf_counter() - t0, time.process_time() - c0, cpu_of(pid) - k0
        n = len(messages)
        print(
            f"  {label:20} {1000 * wall / n:6.2f} ms wall/msg, client CPU {1000 * cpu / n:5.2f} "
            f"ms, clamd CPU {1000 * clamd / n:5.2f} ms, {streams / n:.2f} streams/msg"
        )


async def concurrent(engine: Engine, messages: list[BenchMessage], width: int) -> float:
    """Messages per second with ``width`` evaluations in flight (bounded by the list)."""
    queue = list(enumerate(messages))

    async def worker() -> None:
        while queue:
            i, msg = queue.pop()
            await engine.evaluate(envelope(msg, i), msg.data)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return len(messages) / (time.perf_counter() - t0)


async def amain(args: argparse.Namespace) -> None:
    domains = [make_domain(f"sender{i}.example") for i in range(4)]
    messages = build_mix(args.messages, domains)
    with (
        DNSServer(bench_records(domains), zones=["spamhaus.org", "example", "example.org"]) as dns,
        tempfile.TemporaryDirectory(prefix="gw-bench-av-") as tmp,
        ThrowawayClamd(Path(tmp) / "clamd") as clamd,
    ):
        assert clamd.proc is not None
        pid = clamd.proc.pid
        # clamd's first few hundred scans cost it ~5x more CPU (measured): warm it first.
        warm = ClamdClient(
            parse_address(clamd.address), connect_timeout=2, read_timeout=30, limit=1
        )
        for m in messages:
            await warm.scan(m.data)
        results = {}
        for label, overrides in (
            ("without antivirus", {}),
            (
                "with antivirus",
                {"policies.antivirus.enabled": True, "policies.antivirus.address": clamd.address},
            ),
        ):
            work = Path(tmp) / label.replace(" ", "-")
            work.mkdir()
            engine = await make_engine(dns.address, work, overrides)
            try:
                await run_mix(engine, messages[:60])  # warm-up: DNS cache, clamd's first scans
                k0 = cpu_of(pid)
                cpu, wall, walls = await run_mix(engine, messages)
                clamd_cpu = cpu_of(pid) - k0
                rate = await concurrent(engine, messages, args.width)
            finally:
                await engine.close()
            results[label] = (cpu, wall, walls, clamd_cpu, rate)
        n = len(messages)
        print(f"antivirus bench: {n} messages of the bench mix, clamd {clamd.address}")
        for label, (cpu, wall, walls, clamd_cpu, rate) in results.items():
            p50 = statistics.median(walls)
            p99 = sorted(walls)[int(0.99 * (len(walls) - 1))]
            print(
                f"  {label:18} gateway CPU {1000 * cpu / n:6.2f} ms/msg, "
                f"wall {1000 * wall / n:6.2f} ms/msg (p50 {1000 * p50:.2f}, p99 {1000 * p99:.2f}), "
                "clamd CPU "
                f"{1000 * clamd_cpu / n:5.2f} ms/msg; {rate:.0f} msg/s with {args.width} in flight"
            )
        base, av = results["without antivirus"], results["with antivirus"]
        print(
            f"  ratio with/without: gateway CPU {av[0] / base[0]:.2f}x, "
            f"wall {av[1] / base[1]:.2f}x, throughput {av[4] / base[4]:.2f}x"
        )
        print("scan strategy, client straight to clamd:")
        await strategies(clamd.address, messages, pid)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--width", type=int, default=10, help="evaluations in flight for msg/s")
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    main()
