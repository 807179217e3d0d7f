"""The pipeline alone: CPU per message per kind and per policy, in-process.

    python -m bench.pipeline                  # 600 messages of the bench mix
    python -m bench.pipeline --profile 30     # plus cProfile's top 30 by cumulative time
    python -m bench.pipeline --pyinstrument   # a pyinstrument tree (pip install pyinstrument)

Builds the bench mix, starts a local authoritative DNSServer serving its
records (as ``bench.run`` does), starts an Engine with the shipped
config.example.toml policies and evaluates every message once after a warm-up
pass (DNS cache warm, as on a busy gateway). No SMTP: this is the cost the
policies add on top of a relay. CPU time is the process's (``time.process_time``),
so other load on the machine does not inflate it much.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.mix import BenchMessage, build_mix, make_domain
from gateway import metrics
from gateway.api import Services
from gateway.config import load_config
from gateway.dns import CachingResolver
from gateway.engine import Engine, Envelope
from gateway.state import open_state
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import write_config

CLIENT_IP = "127.0.0.1"


def bench_records(domains: list) -> dict[str, list[tuple[str, str]]]:  # type: ignore[type-arg]
    records: dict[str, list[tuple[str, str]]] = {}
    for d in domains:
        records.update(d.dns_records(CLIENT_IP))
    records["2.0.0.127.zen.spamhaus.org"] = [("A", "127.0.0.2")]
    return records


async def make_engine(dns_address: str, tmp: Path) -> Engine:
    cfg = write_config({"dns.nameservers": [dns_address], "server.listen": "127.0.0.1:0"}, tmp)
    config = load_config(cfg)
    plan = Engine.make_plan(config)
    services = Services(
        resolver=CachingResolver(config.dns),
        state=open_state(config.state, config.base_dir),
        hostname=config.server.hostname,
        config_dir=config.base_dir,
    )
    engine = Engine(config, plan, services)
    await engine.start()
    return engine


def envelope(msg: BenchMessage, i: int) -> Envelope:
    return Envelope(
        client_ip=CLIENT_IP,
        helo=msg.mail_from.split("@")[1],
        mail_from=msg.mail_from,
        rcpt_to=(msg.rcpt_to,),
        queue_id=f"Q{i:06d}",
    )


async def measure(
    engine: Engine, messages: list[BenchMessage]
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, int]]:
    """CPU seconds per message by kind, wall seconds per policy, action counts."""
    per_kind: dict[str, list[float]] = defaultdict(list)
    per_policy: dict[str, float] = defaultdict(float)
    actions: dict[str, int] = defaultdict(int)
    for i, msg in enumerate(messages):
        c0 = time.process_time()
        ev = await engine.evaluate(envelope(msg, i), msg.data)
        per_kind[msg.kind].append(time.process_time() - c0)
        actions[ev.action.value] += 1
        for run in ev.run.runs:
            per_policy[run.name] += run.seconds
    return per_kind, per_policy, actions


async def amain(args: argparse.Namespace) -> None:
    domains = [make_domain(f"sender{i}.example") for i in range(4)]
    messages = build_mix(args.messages, domains)
    if args.kind:
        messages = [m for m in messages if m.kind == args.kind]
    with (
        DNSServer(bench_records(domains), zones=["spamhaus.org", "example", "example.org"]) as dns,
        tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp,
    ):
        engine = await make_engine(dns.address, Path(tmp))
        try:
            await measure(engine, messages[: min(60, len(messages))])  # warm-up
            prof: cProfile.Profile | None = None
            inst = None
            if args.profile:
                prof = cProfile.Profile(time.process_time)
                prof.enable()
            if args.pyinstrument:
                from pyinstrument import Profiler

                inst = Profiler(async_mode="disabled")
                inst.start()
            t0 = time.perf_counter()
            per_kind, per_policy, actions = await measure(engine, messages)
            wall = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
            if inst is not None:
                inst.stop()
        finally:
            await engine.close()
    n = len(messages)
    total = sum(sum(v) for v in per_kind.values())
    print(f"pipeline alone: {n} messages, {1000 * total / n:.2f} ms CPU/msg (mean over the mix)")
    print(f"  wall {wall:.1f} s, actions {dict(actions)}")
    print(f"  {'kind':8} {'n':>5} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7}")
    for kind, v in sorted(per_kind.items()):
        s = sorted(v)
        print(
            f"  {kind:8} {len(v):>5} {1000 * statistics.mean(v):>8.2f} "
            f"{1000 * s[len(s) // 2]:>7.2f} {1000 * s[min(len(s) - 1, int(0.99 * len(s)))]:>7.2f}"
        )
    dns = {
        r: int(metrics.REGISTRY.get_sample_value("gateway_dns_queries_total", {"result": r}) or 0)
        for r in ("hit", "miss", "nxdomain", "temperror")
    }
    print(f"  DNS lookups (warm-up included): {dns}")
    print("  per policy (wall ms/msg, concurrent policies overlap):")
    for name, secs in sorted(per_policy.items(), key=lambda kv: -kv[1]):
        print(f"    {name:12} {1000 * secs / n:7.2f}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    if inst is not None:
        print(inst.output_text(unicode=False, color=False, show_all=False))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=600)
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top N")
    ap.add_argument("--pyinstrument", action="store_true")
    ap.add_argument("--kind", help="only this kind of the mix (plain, html, pdf200k, att2m)")
    args = ap.parse_args()
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
