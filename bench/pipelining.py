"""PIPELINING to the downstream: what it saves on a link with an added round trip.

    python -m bench.pipelining                         # RTT 0, 2, 10, 40 ms; conc. 1 and 10
    python -m bench.pipelining --rtt 10 --seconds 5    # one link, shorter rounds

Two stacks run side by side, identical but for one thing. Gateway A relays
to a discarding sink that offers PIPELINING (RFC 2920), gateway B to one
that does not; both sinks offer XFORWARD and sit behind a TCP proxy on
loopback that holds every chunk RTT/2 in each direction
(``gateway.testing.tcpproxy.TCPProxy(delay=...)``). Both gateways run
``config.example.toml`` (the full shipped pipeline, recipients verified at
RCPT time as shipped; ``--no-verify`` turns that off), one worker each, with
DNS answered locally as in ``bench.run``. Rounds alternate A and B on the same
messages; the load generator is ``bench.run``'s (closed loop: a session sends
its next message when the last one was answered).

Per link and concurrency it prints messages/s, the client's latency p50/p99
per message (MAIL to the reply after the final dot), the p50 saved by
PIPELINING and that saving in round trips of the link: with one recipient,
verifying it costs MAIL, RCPT, RSET (3 round trips, 1 pipelined) and relaying
XFORWARD, MAIL, RCPT, DATA and the body (5, 2 pipelined), so about 5 round
trips per message are expected to go. Nothing here is a timed assertion; the
sink is Postfix's ``smtp-sink`` when installed, else ``bench/sink.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.mix import build_mix, make_domain
from bench.run import (
    DNS_ZONES,
    ROOT,
    RoundResult,
    Wire,
    dns_records,
    free_port,
    pct,
    run_round,
    start_gateway,
    stop,
    wait_port,
)
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import write_config
from gateway.testing.tcpproxy import TCPProxy


def start_sink(port: int, pipelining: bool) -> subprocess.Popen[bytes]:
    smtp_sink = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
    )
    if smtp_sink:  # offers PIPELINING and XFORWARD; -p: no PIPELINING
        cmd = [smtp_sink, "-c", "-u", "nobody", *([] if pipelining else ["-p"])]
        cmd += [f"127.0.0.1:{port}", "512"]
    else:
        cmd = [sys.executable, "-m", "bench.sink", "--port", str(port)]
        cmd += ["--pipelining"] if pipelining else []
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def config(tmp: Path, port: int, relay_port: int, dns: str, verify: bool) -> Path:
    return write_config(
        {
            "server.listen": f"127.0.0.1:{port}",
            "server.workers": 1,
            "server.max_sessions_per_ip": 1000,
            "relay.port": relay_port,
            "relay.verify_recipients": verify,
            "dns.nameservers": [dns],
            "metrics.listen": "127.0.0.1:0",
            "log.level": "warning",
        },
        tmp,
    )


@dataclass
class Stack:
    """A sink, the delaying proxy in front of it and a gateway relaying through it."""

    name: str
    sink: subprocess.Popen[bytes]
    proxy: TCPProxy
    gateway: subprocess.Popen[bytes]
    port: int

    def close(self) -> None:
        stop(self.gateway)
        self.proxy.close()
        stop(self.sink)


def start_stack(
    name: str, tmp: Path, pipelining: bool, rtt: float, dns: str, verify: bool
) -> Stack:
    sink_port, gw_port = free_port(), free_port()
    sink = start_sink(sink_port, pipelining)
    wait_port(sink_port, sink)
    proxy = TCPProxy("127.0.0.1", sink_port, delay=rtt / 2).up()
    gateway = start_gateway(config(tmp / name, gw_port, proxy.port, dns, verify))
    wait_port(gw_port, gateway)
    return Stack(name, sink, proxy, gateway, gw_port)


def report(rtt: float, conc: int, rounds: list[tuple[RoundResult, RoundResult]]) -> None:
    a_rate = [a.rate for a, _ in rounds]
    b_rate = [b.rate for _, b in rounds]
    lat_a: dict[str, list[float]] = defaultdict(list)
    lat_b: dict[str, list[float]] = defaultdict(list)
    for a, b in rounds:
        for kind, values in a.latencies.items():
            lat_a[kind].extend(values)
        for kind, values in b.latencies.items():
            lat_b[kind].extend(values)
    every_a = [v for values in lat_a.values() for v in values]
    every_b = [v for values in lat_b.values() for v in values]
    saved = pct(every_b, 0.5) - pct(every_a, 0.5)
    trips = f"{saved / (1000 * rtt):.1f}" if rtt else "-"
    print(
        f"{1000 * rtt:5.0f} {conc:4d} {statistics.mean(a_rate):8.1f} {statistics.mean(b_rate):8.1f}"
        f" {statistics.mean(a_rate) / statistics.mean(b_rate):6.2f}x"
        f" {pct(every_a, 0.5):7.1f}/{pct(every_a, 0.99):7.1f}"
        f" {pct(every_b, 0.5):7.1f}/{pct(every_b, 0.99):7.1f}"
        f" {saved:+8.1f} {trips:>6}"
        f"  others {max(r.others for pair in rounds for r in pair):.2f}"
        f"  failed {sum(a.failed + b.failed for a, b in rounds)}"
    )
    for kind in sorted(lat_a):
        print(
            f"{'':10} {kind:8} p50 {pct(lat_a[kind], 0.5):7.1f} (pipelined)"
            f" vs {pct(lat_b[kind], 0.5):7.1f} ms"
        )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rtt", type=float, nargs="+", default=[0.0, 2.0, 10.0, 40.0], help="ms")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seconds", type=float, default=8.0, help="per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating (A, B) pairs per level")
    ap.add_argument("--messages", type=int, default=600, help="size of the seeded mix")
    ap.add_argument(
        "--no-verify", action="store_true", help="relay.verify_recipients = false in both"
    )
    args = ap.parse_args()
    domains = [make_domain(f"sender{i}.example") for i in range(4)]
    wires = [Wire.of(m) for m in build_mix(args.messages, domains)]
    records = dns_records(domains)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-pipelining-"))
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
        f"verify_recipients={'off' if args.no_verify else 'on'}; A offers PIPELINING, B does not"
    )
    print(
        "rtt ms conc   A msg/s  B msg/s    A/B   A p50/p99 ms     B p50/p99 ms   saved p50  trips"
    )
    try:
        with DNSServer(records, zones=DNS_ZONES) as dns:
            for rtt_ms in args.rtt:
                rtt = rtt_ms / 1000
                stacks = [
                    start_stack(name, tmp, pipelining, rtt, dns.address, not args.no_verify)
                    for name, pipelining in (("A", True), ("B", False))
                ]
                try:
                    for s in stacks:  # imports, DNS cache, pools
                        run_round("warmup", s.gateway.pid, s.port, wires[:20], 2, 3, cycle=False)
                    for conc in args.concurrency:
                        rounds = []
                        for r in range(args.rounds):
                            offset = (r * 97) % max(1, len(wires) - 1)
                            pool = wires[offset:] + wires[:offset]
                            a, b = (
                                run_round(s.name, s.gateway.pid, s.port, pool, conc, args.seconds)
                                for s in stacks
                            )
                            rounds.append((a, b))
                        report(rtt, conc, rounds)
                finally:
                    for s in stacks:
                        s.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
