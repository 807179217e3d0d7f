"""Throughput benchmark: the gateway beside a do-nothing relay, in one run.

    python -m bench.run                       # full: concurrency 10 and 50, 20 s rounds, memory
    python -m bench.run --quick               # a few seconds; CI smoke test, no assertions
    python -m bench.run --workers 2           # the gateway with server.workers = 2
    python -m bench.run --workers auto        # ... = "auto": one per usable CPU (as shipped)
    python -m bench.run --profile-gateway /tmp/gw.prof   # cProfile the gateway process

Alternating rounds of (a) the do-nothing aiosmtpd -> aiosmtplib relay and (b)
the gateway with the full shipped default pipeline (config.example.toml), both
relaying to the same fast sink in its own process, with DNS answered by a
local authoritative server (SPF, DKIM, DMARC records, DNSBL zones). Prints
messages/s, latency p50/p99 per message kind, server CPU ms per message, peak
RSS, and the ratios b/a. Load is bounded by time (the sessions cycle through
the mix); loopback only. The load generator sends prepared bytes over plain
asyncio streams, so it costs ~0.2 ms CPU per message on the cores the servers
share (aiosmtplib's sendmail cost ~5 ms). Per round it also prints the load
generator's CPU, the load average and ``others``: cores busy with work that is
not the benchmark's (another job on the machine): a disturbed round shows there,
and the added p99 is given per round with the median over rounds.
The memory part (full mode, or ``--memory``) reports the gateway's peak RSS
with 200 concurrent sessions and what one in-flight 20 MB message costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.mix import BenchMessage, SenderDomain, big_message, build_mix, make_domain
from gateway.cpus import usable_cpus
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import write_config

ROOT = Path(__file__).resolve().parent.parent
CLIENT_IP = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


DNS_ZONES = ["spamhaus.org", "example", "example.org"]


def dns_records(domains: list[SenderDomain]) -> dict[str, list[tuple[str, str]]]:
    """What the bench's DNS server publishes: the senders' SPF/DKIM/DMARC, a DNSBL test entry."""
    records: dict[str, list[tuple[str, str]]] = {}
    for d in domains:
        records.update(d.dns_records(CLIENT_IP))
    # DNSBL zones present but not listing loopback; 127.0.0.2 is the standard test entry.
    records["2.0.0.127.zen.spamhaus.org"] = [("A", "127.0.0.2")]
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def _pids(root: int) -> list[int]:
    """The process and its children (gateway workers)."""
    out = [root]
    try:
        kids = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out.extend(_pids(int(k)))
    return out


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of the process and each of its children."""
    out: dict[int, float] = {}
    for p in _pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def cpu_seconds(pid: int) -> float:
    return sum(cpu_by_process(pid).values())


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS


def peak_rss_mb(pid: int) -> float:
    total = 0
    for p in _pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def pss_mb(pid: int) -> float:
    """Proportional set size of the process and its children: pages the pre-forked
    workers share copy-on-write are counted once, as the machine really holds them."""
    total = 0
    for p in _pids(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class PeakPSS:
    """Samples :func:`pss_mb` every 100 ms in a thread; the kernel keeps no PSS peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, pss_mb(self.pid))

    def __enter__(self) -> PeakPSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_mb(pid: int) -> float:
    """Current resident set of the process and its children."""
    total = 0
    for p in _pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


@dataclass
class RoundResult:
    target: str
    concurrency: int
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    rss_mb: float = 0.0
    load_cpu: float = 0.0  # the load generator's own CPU seconds (and the DNS server's)
    loadavg: float = 0.0  # 1-minute load average at the end of the round
    others: float = 0.0  # cores busy with other work than the benchmark's during the round
    split: tuple[float, ...] = ()  # share of the server's CPU by process (supervisor, workers)
    cycle: bool = True  # cycle through the mix until the time is up
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.sent if self.sent else 0.0

    @property
    def load_cpu_ms(self) -> float:
        return 1000 * self.load_cpu / self.sent if self.sent else 0.0


@dataclass(frozen=True, slots=True)
class Wire:
    """One message as the load generator sends it: commands and DATA ready on the wire.

    Dot-stuffing and line-ending normalization are done once here, not per send:
    aiosmtplib redoes both with regexes on every ``sendmail`` (most of the load
    generator's CPU, which competes with the servers for the same cores).
    """

    kind: str
    mail: bytes
    rcpt: bytes
    data: bytes  # dot-stuffed, ending in CRLF "." CRLF

    @classmethod
    def of(cls, msg: BenchMessage) -> Wire:
        body = msg.data if msg.data.endswith(b"\r\n") else msg.data + b"\r\n"
        stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
        return cls(
            msg.kind,
            f"MAIL FROM:<{msg.mail_from}>\r\n".encode(),
            f"RCPT TO:<{msg.rcpt_to}>\r\n".encode(),
            stuffed + b".\r\n",
        )


class SMTPFailed(Exception):
    pass


MESSAGES_PER_CONNECTION = 100  # then the load generator reconnects, as MTAs' caches do


async def _reply(reader: asyncio.StreamReader) -> int:
    """The code of one (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise SMTPFailed(f"connection closed or short reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


class Client:
    """A minimal SMTP client for the load: one connection, one transaction at a time
    (no PIPELINING: the relay baseline does not offer it), nothing computed per send."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        if await _reply(self.reader) != 220:
            raise SMTPFailed("no greeting")
        self.writer.write(b"EHLO loadgen.example\r\n")
        if await _reply(self.reader) != 250:
            raise SMTPFailed("EHLO refused")

    async def transact(self, msg: Wire) -> tuple[int, str]:
        """One transaction: the reply code that ended it and the step ("MAIL", "RCPT",
        "DATA" refused before the message; "" for the reply to the message itself)."""
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        for command, expected in ((msg.mail, 250), (msg.rcpt, 250), (b"DATA\r\n", 354)):
            writer.write(command)
            code = await _reply(reader)
            if code != expected:
                writer.write(b"RSET\r\n")
                await _reply(reader)
                return code, command[:4].decode().strip()
        writer.write(msg.data)
        return await _reply(reader), ""

    async def send(self, msg: Wire) -> None:
        code, step = await self.transact(msg)
        if step:
            raise SMTPFailed(step)
        if code != 250:
            raise SMTPFailed("DATA refused")

    async def close(self) -> None:
        if self.writer is not None:
            # uvloop raises RuntimeError on a transport the peer already closed.
            with contextlib.suppress(OSError, SMTPFailed, RuntimeError):
                self.writer.write(b"QUIT\r\n")
                await self.writer.drain()
            self.writer.close()
            with contextlib.suppress(OSError, RuntimeError):
                await self.writer.wait_closed()
            self.writer = self.reader = None


async def load(
    port: int, messages: list[Wire], concurrency: int, seconds: float, result: RoundResult
) -> None:
    """``concurrency`` sessions sending from the mix, cycling through it, until the time is up
    (or, with ``cycle=False``, the messages run out)."""
    it = iter(messages) if not result.cycle else itertools.cycle(messages)
    deadline = time.monotonic() + seconds

    async def session() -> None:
        client = Client(port)
        await client.connect()
        sent = 0
        try:
            for msg in it:
                if time.monotonic() > deadline:
                    break
                if sent == MESSAGES_PER_CONNECTION:
                    # As an MTA's connection cache does; the gateway allows 1,000
                    # MAIL commands per session (a bound on hostile clients).
                    await client.close()
                    await client.connect()
                    sent = 0
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(60):
                        await client.send(msg)
                    sent += 1
                    result.sent += 1
                    result.latencies[msg.kind].append(time.perf_counter() - t0)
                except (SMTPFailed, OSError, TimeoutError):
                    result.failed += 1
                    await client.close()
                    await client.connect()
                    sent = 0
        finally:
            await client.close()

    await asyncio.gather(*(session() for _ in range(concurrency)))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when installed (as the gateway and the relay baseline use it): a cheaper
    load generator leaves more of the shared cores to the servers it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_round(
    target: str,
    pid: int,
    port: int,
    messages: list[Wire],
    concurrency: int,
    secs: float,
    *,
    cycle: bool = True,
) -> RoundResult:
    res = RoundResult(target, concurrency, cycle=cycle)
    by_process0 = cpu_by_process(pid)
    cpu0 = sum(by_process0.values())
    own0 = time.process_time()
    ours0, busy0 = cpu_seconds(os.getpid()), machine_busy_seconds()
    t0 = time.perf_counter()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(load(port, messages, concurrency, secs, res))
    res.seconds = time.perf_counter() - t0
    by_process = cpu_by_process(pid)
    res.cpu = sum(by_process.values()) - cpu0
    # Each process's share of the server's CPU (pre-forked workers: is the load even?).
    res.split = tuple(
        (by_process[p] - by_process0.get(p, 0.0)) / res.cpu if res.cpu else 0.0
        for p in sorted(by_process)
    )
    res.load_cpu = time.process_time() - own0
    # Busy CPU that is not the benchmark's (this process and its children): other
    # work on the machine during the round, in cores. A disturbed round shows here.
    ours = cpu_seconds(os.getpid()) - ours0
    res.others = max(0.0, (machine_busy_seconds() - busy0 - ours) / res.seconds)
    res.rss_mb = peak_rss_mb(pid)
    res.loadavg = os.getloadavg()[0]
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def start_sink(port: int) -> subprocess.Popen[bytes]:
    smtp_sink = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
    )
    if smtp_sink:
        cmd = [smtp_sink, "-c", "-u", "nobody", f"127.0.0.1:{port}", "512"]
    else:
        cmd = [sys.executable, "-m", "bench.sink", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gateway_config(
    tmp: Path, port: int, sink_port: int, dns: str, workers: int | str, **extra: object
) -> Path:
    """config.example.toml (the shipped default pipeline) pointed at the bench's peers."""
    return write_config(
        {
            "server.listen": f"127.0.0.1:{port}",
            "server.workers": workers,
            "server.max_sessions_per_ip": 1000,
            "relay.port": sink_port,
            "relay.verify_recipients": False,
            "dns.nameservers": [dns],
            "metrics.listen": "127.0.0.1:0",
            "web.listen": "",
            "log.level": "warning",
            **extra,  # last: a bench may turn the web on (bench/web_poll.py)
        },
        tmp,
    )


def start_gateway(cfg: Path, profile: str | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", profile]
    cmd += ["-m", "gateway", "run", "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def memory_checks(
    tmp: Path, sink_port: int, dns: str, workers: int | str, messages: list[BenchMessage]
) -> None:
    """Peak RSS with 200 concurrent sessions; the cost of one in-flight 20 MB message.

    Each on a fresh gateway process, so VmHWM is that check's own peak.
    """
    port = free_port()
    gw = start_gateway(gateway_config(tmp / "m1", port, sink_port, dns, workers))
    try:
        wait_port(port, gw)
        wires = [Wire.of(m) for m in messages]
        run_round("warmup", gw.pid, port, wires[:40], 5, 5, cycle=False)
        idle = rss_mb(gw.pid)
        with PeakPSS(gw.pid) as pss:
            res = run_round("gateway", gw.pid, port, wires, 200, 15, cycle=False)
        print(
            f"memory: 200 concurrent sessions: {res.sent} msgs ({res.failed} failed), "
            f"peak RSS {res.rss_mb:.1f} MB (idle {idle:.1f} MB; sum of each process's peak), "
            f"peak PSS {pss.peak:.1f} MB (shared pages counted once)"
        )
    finally:
        stop(gw)
    port = free_port()
    # Attachments over 10 MB are refused by default: allow this one, so it is relayed.
    big_ok = {"policies.attachments.max_attachment_size": 30_000_000}
    gw = start_gateway(gateway_config(tmp / "m2", port, sink_port, dns, 1, **big_ok))
    try:
        wait_port(port, gw)
        run_round("warmup", gw.pid, port, wires[:40], 5, 5, cycle=False)
        before = rss_mb(gw.pid)
        big = big_message(20_000_000, messages[0].mail_from, messages[0].rcpt_to)
        res = run_round("gateway", gw.pid, port, [Wire.of(big)], 1, 60, cycle=False)
        cost = res.rss_mb - before
        size = len(big.data) / 2**20
        print(
            f"memory: one in-flight {size:.1f} MB message: peak RSS {res.rss_mb:.1f} MB, "
            f"+{cost:.1f} MB over {before:.1f} MB = {cost / size:.2f}x its size "
            f"({res.sent} relayed, {1000 * res.seconds:.0f} ms, cpu {1000 * res.cpu:.0f} ms)"
        )
    finally:
        stop(gw)


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'a number or "auto", got {text!r}') from None


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds; smoke test")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seconds", type=float, default=20.0, help="per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating (a, b) pairs per level")
    ap.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help='gateway server.workers: a number or "auto" (one per usable CPU)',
    )
    ap.add_argument(
        "--relay-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the relay baseline's event loop (default: uvloop, as the gateway runs)",
    )
    ap.add_argument("--messages", type=int, default=3000, help="size of the seeded mix")
    ap.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the memory checks (default: on in full mode, off with --quick)",
    )
    ap.add_argument("--profile-gateway", metavar="PATH", help="run the gateway under cProfile")
    args = ap.parse_args()
    warm = (50, 5.0)
    if args.quick:
        args.concurrency, args.seconds, args.rounds, args.messages = [5], 3.0, 1, 200
        warm = (10, 2.0)
    if args.memory is None:
        args.memory = not args.quick

    domains = [make_domain(f"sender{i}.example") for i in range(4)]
    messages = build_mix(args.messages, domains)
    records = dns_records(domains)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    with DNSServer(records, zones=DNS_ZONES) as dns:
        try:
            sink_port, base_port, gw_port = free_port(), free_port(), free_port()
            procs.append(start_sink(sink_port))
            wait_port(sink_port, procs[-1])
            base = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.baseline",
                    "--port",
                    str(base_port),
                    "--relay-port",
                    str(sink_port),
                    "--loop",
                    args.relay_loop,
                ],
                cwd=ROOT,
            )
            procs.append(base)
            wait_port(base_port, base)
            cfg = gateway_config(tmp, gw_port, sink_port, dns.address, args.workers)
            gw = start_gateway(cfg, args.profile_gateway)
            procs.append(gw)
            wait_port(gw_port, gw)
            # Warm-up: imports, DNS cache, pools.
            wires = [Wire.of(m) for m in messages]
            run_round("warmup", gw.pid, gw_port, wires[: warm[0]], 5, warm[1], cycle=False)
            run_round("warmup", base.pid, base_port, wires[: warm[0]], 5, warm[1], cycle=False)
            results: list[tuple[RoundResult, RoundResult]] = []
            for conc in args.concurrency:
                for r in range(args.rounds):
                    offset = (r * 997) % max(1, len(wires) - 1)
                    pool = wires[offset:] + wires[:offset]
                    a = run_round("relay", base.pid, base_port, pool, conc, args.seconds)
                    b = run_round("gateway", gw.pid, gw_port, pool, conc, args.seconds)
                    results.append((a, b))
            report(results, args.workers)
            if args.profile_gateway:
                stop(gw)
                print(f"gateway profile: {args.profile_gateway}")
            if args.memory:
                memory_checks(tmp, sink_port, dns.address, args.workers, messages)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: list[tuple[RoundResult, RoundResult]], workers: int | str = 1) -> None:
    resolved = usable_cpus() if workers == "auto" else workers
    print(
        f"machine: {os.cpu_count()} cores ({usable_cpus()} usable), Python "
        f"{sys.version.split()[0]}; gateway server.workers = {workers} ({resolved} processes)"
    )
    print(
        f"{'target':8} {'conc':>4} {'msgs':>6} {'fail':>4} {'msg/s':>8} "
        f"{'cpu ms/msg':>10} {'rss MB':>7} {'loadgen ms/msg':>14} {'load1':>5} {'others':>6}"
    )
    by_conc: dict[int, list[tuple[RoundResult, RoundResult]]] = defaultdict(list)
    for a, b in results:
        by_conc[a.concurrency].append((a, b))
        for r in (a, b):
            print(
                f"{r.target:8} {r.concurrency:>4} {r.sent:>6} {r.failed:>4} {r.rate:>8.1f} "
                f"{r.cpu_ms:>10.2f} {r.rss_mb:>7.1f} {r.load_cpu_ms:>14.2f} {r.loadavg:>5.2f}"
                f" {r.others:>6.2f}"
                + (f"  split {'/'.join(f'{x:.2f}' for x in r.split)}" if len(r.split) > 1 else "")
            )
    for conc, pairs in sorted(by_conc.items()):
        print(f"\nlatency ms (p50/p99) by kind, concurrency {conc}, all rounds")
        lat_a: dict[str, list[float]] = defaultdict(list)
        lat_b: dict[str, list[float]] = defaultdict(list)
        for a, b in pairs:
            for kind, v in a.latencies.items():
                lat_a[kind].extend(v)
            for kind, v in b.latencies.items():
                lat_b[kind].extend(v)
        for kind in sorted(set(lat_a) | set(lat_b)):
            la, lb = lat_a[kind], lat_b[kind]
            # Each round's gateway p99 minus the p99 of the relay round just before it:
            # the median of these is robust to one disturbed round.
            added = [
                pct(b.latencies[kind], 0.99) - pct(a.latencies[kind], 0.99)
                for a, b in pairs
                if a.latencies.get(kind) and b.latencies.get(kind)
            ]
            per_round = " ".join(f"{x:+.0f}" for x in added)
            print(
                f"  {kind:8} relay {pct(la, 0.5):7.1f}/{pct(la, 0.99):7.1f}"
                f"   gateway {pct(lb, 0.5):7.1f}/{pct(lb, 0.99):7.1f}"
                f"   added p99 {pct(lb, 0.99) - pct(la, 0.99):+7.1f}"
                f"   by round {per_round} (median {statistics.median(added or [0.0]):+.1f})"
            )
    print("\nratios gateway/relay (mean over rounds; median in brackets)")
    for conc, pairs in sorted(by_conc.items()):
        thr = [b.rate / a.rate for a, b in pairs if a.rate]
        cpu = [b.cpu_ms / a.cpu_ms for a, b in pairs if a.cpu_ms]
        extra = [b.cpu_ms - a.cpu_ms for a, b in pairs]
        print(
            f"  concurrency {conc:>3}: throughput {statistics.mean(thr):.2f}x "
            f"({statistics.median(thr):.2f}x), cpu/msg {statistics.mean(cpu):.2f}x "
            f"({statistics.median(cpu):.2f}x), pipeline cost {statistics.mean(extra):+.2f} ms/msg "
            f"({statistics.median(extra):+.2f})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
