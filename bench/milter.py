"""Milter benchmark: Postfix alone, Postfix + the gateway as milter, Postfix + rspamd's proxy.

    python -m bench.milter                 # 3 rounds of 20 s per target, concurrency 10
    python -m bench.milter --quick         # a few seconds per target (smoke test)
    python -m bench.milter --no-rspamd     # without rspamd (it takes ~20 s to start)

One Postfix instance (``gateway.testing.postfix``, needs root) listens on
three ``smtpd`` services that differ only in ``smtpd_milters``: none, the
gateway (``gateway run`` with ``milter.listen``, ``server.listen = ""``,
config.example.toml's pipeline) and Debian's rspamd (proxy worker with
``milter = yes; self_scan = yes``, its shipped modules, Redis on loopback).
Both filters run two processes (``server.workers = "auto"`` on 2 cores;
rspamd ``count = 2``) and resolve through the same local authoritative DNS
server with the bench mix's SPF, DKIM and DMARC records (every other name
gets a fast NXDOMAIN); rspamd's fuzzy check is off (its servers are on the
internet). Postfix hands accepted mail to ``discard`` so delivery costs the
same for all three and little.

Rounds alternate between the targets with the same mix offset. A round
sends for ``--seconds`` then waits until Postfix's queue is empty, and
charges each process tree the CPU it used over send + drain: Postfix (all
its daemons) and the filter, separately. Reported per target: handled
msg/s (any final reply to DATA: a rejected message is work done), replies
by class, CPU ms per message of Postfix and of the filter, and ratios
against Postfix alone. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.mix import build_mix, make_domain
from bench.run import (
    DNS_ZONES,
    ROOT,
    Client,
    SMTPFailed,
    Wire,
    cpu_seconds,
    dns_records,
    free_port,
    gateway_config,
    stop,
    wait_port,
)
from gateway.testing.dnsserver import DNSServer
from gateway.testing.postfix import PostfixInstance

MESSAGES_PER_CONNECTION = 100
RSPAMD_START = 90.0  # seconds rspamd may take to load its rules and listen


@dataclass
class Round:
    target: str
    handled: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    postfix_cpu: float = 0.0
    filter_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.handled / self.seconds if self.seconds else 0.0

    def ms(self, cpu: float) -> float:
        return 1000 * cpu / self.handled if self.handled else 0.0


async def _send(client: Client, msg: Wire) -> str:
    """One transaction; the class of its final reply ("2xx", "4xx@MAIL", "5xx" ...)."""
    code, step = await client.transact(msg)
    return f"{code // 100}xx" + (f"@{step}" if step else "")


async def _load(port: int, wires: list[Wire], concurrency: int, seconds: float, r: Round) -> None:
    it = itertools.cycle(wires)
    deadline = time.monotonic() + seconds

    async def session() -> None:
        client = Client(port)
        await client.connect()
        sent = 0
        try:
            while time.monotonic() < deadline:
                if sent == MESSAGES_PER_CONNECTION:
                    await client.close()
                    await client.connect()
                    sent = 0
                try:
                    async with asyncio.timeout(120):
                        r.replies[await _send(client, next(it))] += 1
                    r.handled += 1
                    sent += 1
                except (SMTPFailed, OSError, TimeoutError):
                    r.replies["broken"] += 1
                    await client.close()
                    await client.connect()
                    sent = 0
        finally:
            await client.close()

    await asyncio.gather(*(session() for _ in range(concurrency)))


def _queue_empty(postfix: PostfixInstance) -> bool:
    spool = postfix.root / "spool"
    for sub in ("incoming", "active", "deferred", "maildrop"):
        with contextlib.suppress(OSError):
            for _dirpath, _dirs, files in os.walk(spool / sub):
                if files:
                    return False
    return True


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port} after {timeout}s") from None
            time.sleep(0.05)


def run_round(
    target: str,
    port: int,
    postfix: PostfixInstance,
    postfix_pid: int,
    filter_pids: list[int],
    wires: list[Wire],
    concurrency: int,
    seconds: float,
) -> Round:
    r = Round(target)
    p0 = cpu_seconds(postfix_pid)
    f0 = sum(cpu_seconds(p) for p in filter_pids)
    t0 = time.perf_counter()
    asyncio.run(_load(port, wires, concurrency, seconds, r))
    r.seconds = time.perf_counter() - t0
    end = time.monotonic() + 120
    while not _queue_empty(postfix) and time.monotonic() < end:
        time.sleep(0.1)
    r.postfix_cpu = cpu_seconds(postfix_pid) - p0
    r.filter_cpu = sum(cpu_seconds(p) for p in filter_pids) - f0
    return r


def _postfix(ports: dict[str, int], milters: dict[str, int]) -> PostfixInstance:
    services = []
    for target, port in ports.items():
        line = f"127.0.0.1:{port} inet n - n - - smtpd"
        if target in milters:
            line += f"\n  -o smtpd_milters=inet:127.0.0.1:{milters[target]}"
        services.append(line)
    main_cf = """\
virtual_transport = discard
milter_protocol = 6
milter_default_action = tempfail
milter_connect_timeout = 10s
milter_command_timeout = 30s
milter_content_timeout = 120s
max_use = 100000
max_idle = 600s
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 200
message_size_limit = 30000000
"""
    return PostfixInstance(main_cf=main_cf, master_cf="\n".join(services) + "\n")


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """rspamd's own Redis (its Bayes, reputation, ratelimit state), so its CPU is counted
    with rspamd's: the gateway keeps the same state in-process (SQLite)."""
    tmp.mkdir(parents=True, exist_ok=True)
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    cmd = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return subprocess.Popen(
        [*cmd, "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def start_rspamd(tmp: Path, port: int, dns: str, redis: int) -> subprocess.Popen[bytes]:
    """Debian's rspamd with its shipped config, the proxy worker as milter (self_scan)."""
    rspamd = shutil.which("rspamd") or "/usr/bin/rspamd"
    etc = tmp / "etc"
    for sub in ("etc/local.d", "etc/override.d", "db", "run", "log"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    (etc / "override.d" / "worker-normal.inc").write_text("enabled = false;\n")
    (etc / "override.d" / "worker-controller.inc").write_text("enabled = false;\n")
    (etc / "override.d" / "worker-proxy.inc").write_text(
        f'bind_socket = "127.0.0.1:{port}";\nmilter = yes;\ntimeout = 120s;\ncount = 2;\n'
        'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n'
    )
    (etc / "override.d" / "options.inc").write_text(
        f'dns {{ nameserver = ["{dns}"]; timeout = 2s; retransmits = 1; }}\n'
    )
    (etc / "local.d" / "redis.conf").write_text(f'servers = "127.0.0.1:{redis}";\n')
    (etc / "override.d" / "fuzzy_check.conf").write_text("enabled = false;\n")
    for sub in ("db", "run", "log"):
        shutil.chown(tmp / sub, "_rspamd", "_rspamd")
    cmd = [rspamd, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf"]
    for var, sub in (("LOCAL_CONFDIR", "etc"), ("DBDIR", "db"), ("RUNDIR", "run")):
        cmd += ["--var", f"{var}={tmp / sub}"]
    cmd += ["--var", f"LOGDIR={tmp / 'log'}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report(rounds: list[Round]) -> None:
    by: dict[str, list[Round]] = {}
    for r in rounds:
        by.setdefault(r.target, []).append(r)
    print(
        f"{'target':8} {'msgs':>6} {'msg/s':>7} {'postfix ms':>10} {'filter ms':>9} "
        f"{'total ms':>8}  replies"
    )
    for r in rounds:
        replies = " ".join(f"{k}:{v}" for k, v in sorted(r.replies.items()))
        print(
            f"{r.target:8} {r.handled:>6} {r.rate:>7.1f} {r.ms(r.postfix_cpu):>10.2f} "
            f"{r.ms(r.filter_cpu):>9.2f} {r.ms(r.postfix_cpu + r.filter_cpu):>8.2f}  {replies}"
        )
    base = by.get("postfix")
    print("\nmedian over rounds (CPU ms per handled message; ratio of msg/s to Postfix alone)")
    for target, rs in by.items():
        rate = statistics.median(r.rate for r in rs)
        f_ms = statistics.median(r.ms(r.filter_cpu) for r in rs)
        p_ms = statistics.median(r.ms(r.postfix_cpu) for r in rs)
        ratio = rate / statistics.median(b.rate for b in base) if base else float("nan")
        print(
            f"{target:8} {rate:7.1f} msg/s  ratio {ratio:4.2f}  postfix {p_ms:5.2f} ms  "
            f"filter {f_ms:5.2f} ms  total {p_ms + f_ms:5.2f} ms"
        )
    if "gateway" in by and "rspamd" in by:
        g = statistics.median(r.ms(r.filter_cpu) for r in by["gateway"])
        s = statistics.median(r.ms(r.filter_cpu) for r in by["rspamd"])
        if s:
            print(f"\nfilter CPU per message, gateway / rspamd: {g / s:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds per target")
    ap.add_argument("--seconds", type=float, default=20.0, help="sending time per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--messages", type=int, default=2000, help="size of the seeded mix")
    ap.add_argument("--no-rspamd", dest="rspamd", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the filters' temp dirs (logs)")
    ap.add_argument("--show-log", type=int, default=0, metavar="CHARS", help="Postfix log tail")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.messages = 3.0, 1, 200
    if os.geteuid() != 0:
        print("bench.milter: starting a Postfix master needs root", file=sys.stderr)
        return 2
    if args.rspamd and not (shutil.which("rspamd") or Path("/usr/bin/rspamd").exists()):
        print("bench.milter: rspamd not installed (apt-get install rspamd); --no-rspamd")
        args.rspamd = False

    domains = [make_domain(f"sender{i}.example") for i in range(4)]
    wires = [Wire.of(m) for m in build_mix(args.messages, domains)]
    targets = ["postfix", "gateway"] + (["rspamd"] if args.rspamd else [])
    ports = {t: free_port() for t in targets}
    milters = {t: free_port() for t in targets if t != "postfix"}
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-milter-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def pids(target: str) -> list[int]:
        """The process trees charged to ``target``: rspamd's includes its Redis."""
        names = {"gateway": ["gateway"], "rspamd": ["rspamd", "redis"]}.get(target, [])
        return [procs[n].pid for n in names]

    with DNSServer(dns_records(domains), zones=DNS_ZONES) as dns:
        try:
            if args.rspamd:
                redis_port = free_port()
                procs["redis"] = start_redis(tmp / "redis", redis_port)
                wait_port(redis_port, procs["redis"])
                procs["rspamd"] = start_rspamd(
                    tmp / "rspamd", milters["rspamd"], dns.address, redis_port
                )
            cfg = gateway_config(
                tmp / "gateway",
                0,
                free_port(),  # relay: unused in milter mode (quarantine release only)
                dns.address,
                "auto",
                **{
                    "server.listen": "",
                    "milter.listen": f"127.0.0.1:{milters['gateway']}",
                    "quarantine.path": str(tmp / "quarantine"),
                },
            )
            procs["gateway"] = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(cfg)], cwd=ROOT
            )
            wait_port(milters["gateway"], procs["gateway"])
            if args.rspamd:
                wait_port(milters["rspamd"], procs["rspamd"], timeout=RSPAMD_START)
            with _postfix(ports, milters) as postfix:
                master = postfix.pid
                assert master is not None
                for t in targets:
                    _wait_listening(ports[t])
                warm = wires[:50]
                for t in targets:  # imports, DNS caches, rspamd's lazy maps
                    run_round("warmup", ports[t], postfix, master, pids(t), warm, 5, 3.0)
                rounds: list[Round] = []
                for i in range(args.rounds):
                    offset = (i * 997) % max(1, len(wires) - 1)
                    pool = wires[offset:] + wires[:offset]
                    for t in targets:
                        rounds.append(
                            run_round(
                                t,
                                ports[t],
                                postfix,
                                master,
                                pids(t),
                                pool,
                                args.concurrency,
                                args.seconds,
                            )
                        )
                print(
                    f"machine: {os.cpu_count()} cores; concurrency {args.concurrency}, "
                    f"{args.rounds} x {args.seconds:.0f} s per target, mix of {len(wires)}"
                )
                report(rounds)
                if args.show_log:
                    print(postfix.log()[-args.show_log :])
        finally:
            for proc in procs.values():
                stop(proc)
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
