"""SMTP hand-offs while the web UI and REST API are polled, against the same load unpolled.

    python -m bench.web_poll                          # 1 worker, conc. 20, 3 x 15 s pairs
    python -m bench.web_poll --workers auto           # as shipped (web on worker 0)
    python -m bench.web_poll --interval 1.0           # a dashboard refreshing every second
    python -m bench.web_poll --quick                  # a few seconds, smoke test

The gateway (``config.example.toml``, the full default pipeline, as in
``bench/run.py``, whose DNS server, sink, mix and load generator this reuses)
serves ``web.listen`` over a local quarantine pre-filled with messages.
Rounds alternate: (a) SMTP load alone, (b) the same load while pollers, in
their own thread and event loop, fetch the API's list (50 items), one
message's detail (header fields, symbols, text preview) and the UI's list
page, back to back by default (``--interval 0``: far more than people do).
Prints messages/s of both, the ratio b/a, the p99 per message and what the
polling got (requests/s, p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

from bench.mix import build_mix, make_domain
from bench.run import (
    DNS_ZONES,
    RoundResult,
    Wire,
    dns_records,
    free_port,
    gateway_config,
    pct,
    run_round,
    start_gateway,
    start_sink,
    stop,
    wait_port,
)
from gateway.quarantine import LocalQuarantine
from gateway.testing.dnsserver import DNSServer
from gateway.testing.quarantine import held_item
from gateway.testing.web import TOKEN, web_overrides

_HELD = (
    b"From: Promo <promo@shop.test>\r\nSubject: Cheap watches, today only\r\n"
    b"Content-Type: text/html\r\n\r\n<p>Buy <b>now</b>, 90% off</p>\r\n"
)


async def _fill(path: Path, count: int) -> list[str]:
    store = LocalQuarantine(path)
    ids = []
    for i in range(count):
        item = held_item(len(_HELD), mail_from=f"s{i % 300}@shop{i % 17}.test")
        await store.put(item, _HELD)
        ids.append(item.id)
    await store.close()
    return ids


class Poller:
    """``n`` clients polling the API and UI in a thread of their own until stopped."""

    def __init__(self, port: int, ids: list[str], n: int, interval: float) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.ids, self.n, self.interval = ids, n, interval
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Poller:
        self.latencies.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _client(self, k: int) -> None:
        paths = [
            "/api/v1/quarantine?limit=50",
            "/api/v1/quarantine/{id}",
            "/?limit=50",
        ]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            i = k
            while not self._stop.is_set():
                path = paths[i % len(paths)].format(id=self.ids[i % len(self.ids)])
                i += 1
                t0 = time.perf_counter()
                try:
                    async with http.get(self.base + path) as r:
                        await r.read()
                        if r.status != 200:
                            self.errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.errors += 1
                self.latencies.append(time.perf_counter() - t0)
                if self.interval:
                    await asyncio.sleep(self.interval)

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(k) for k in range(self.n)))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds; smoke test")
    ap.add_argument("--concurrency", type=int, default=20, help="SMTP sessions")
    ap.add_argument("--seconds", type=float, default=15.0, help="per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (a, b) pairs")
    ap.add_argument("--workers", default="1", help='server.workers: a number or "auto"')
    ap.add_argument("--pollers", type=int, default=1, help="concurrent web clients")
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between a client's polls")
    ap.add_argument("--held", type=int, default=2000, help="messages in the quarantine")
    ap.add_argument("--messages", type=int, default=2000, help="size of the seeded SMTP mix")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.held, args.messages, args.concurrency = 3.0, 1, 200, 200, 5
    workers: int | str = args.workers if args.workers == "auto" else int(args.workers)

    domains = [make_domain(f"sender{i}.example") for i in range(4)]
    wires = [Wire.of(m) for m in build_mix(args.messages, domains)]
    records = dns_records(domains)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-web-"))
    procs: list[subprocess.Popen[bytes]] = []
    with DNSServer(records, zones=DNS_ZONES) as dns:
        try:
            ids = asyncio.run(_fill(tmp / "quarantine", args.held))
            sink_port, gw_port, web_port = free_port(), free_port(), free_port()
            procs.append(start_sink(sink_port))
            wait_port(sink_port, procs[-1])
            web = web_overrides(None)  # the test token's hash, fast scrypt
            cfg = gateway_config(
                tmp,
                gw_port,
                sink_port,
                dns.address,
                workers,
                **{
                    "quarantine.path": str(tmp / "quarantine"),
                    "web.listen": f"127.0.0.1:{web_port}",
                    "web.api_token_hashes": web["web.api_token_hashes"],
                    "web.admin_password_hash": web["web.admin_password_hash"],
                },
            )
            gw = start_gateway(cfg)
            procs.append(gw)
            wait_port(gw_port, gw)
            wait_port(web_port, gw)
            poller = Poller(web_port, ids, args.pollers, args.interval)
            run_round("warmup", gw.pid, gw_port, wires[:50], 5, 3.0, cycle=False)
            pairs: list[tuple[RoundResult, RoundResult, Poller, float]] = []
            for r in range(args.rounds):
                offset = (r * 997) % max(1, len(wires) - 1)
                pool = wires[offset:] + wires[:offset]
                a = run_round("unpolled", gw.pid, gw_port, pool, args.concurrency, args.seconds)
                t0 = time.perf_counter()
                with poller:
                    b = run_round("polled", gw.pid, gw_port, pool, args.concurrency, args.seconds)
                polls = list(poller.latencies)
                rate = len(polls) / (time.perf_counter() - t0)
                pairs.append((a, b, poller, rate))
                print(
                    f"round {r + 1}: unpolled {a.rate:7.1f} msg/s  polled {b.rate:7.1f} msg/s  "
                    f"ratio {b.rate / a.rate if a.rate else 0:.3f}  | web {rate:6.1f} req/s "
                    f"p50 {pct(polls, 0.5):6.1f} ms p99 {pct(polls, 0.99):6.1f} ms "
                    f"errors {poller.errors}  | smtp failed {a.failed}/{b.failed}"
                )
            ratios = [b.rate / a.rate for a, b, _, _ in pairs if a.rate]
            lat_a = [x for a, _, _, _ in pairs for v in a.latencies.values() for x in v]
            lat_b = [x for _, b, _, _ in pairs for v in b.latencies.values() for x in v]
            print(
                f"workers={args.workers} concurrency={args.concurrency} pollers={args.pollers} "
                f"interval={args.interval}s held={args.held}"
            )
            print(
                f"messages/s unpolled {statistics.mean(a.rate for a, *_ in pairs):.1f}, polled "
                f"{statistics.mean(b.rate for _, b, *_ in pairs):.1f}; ratio polled/unpolled "
                f"mean {statistics.mean(ratios):.3f} median {statistics.median(ratios):.3f}"
            )
            print(
                f"p99 per message unpolled {pct(lat_a, 0.99):.1f} ms, "
                f"polled {pct(lat_b, 0.99):.1f} ms; "
                f"web {statistics.mean(r for *_, r in pairs):.1f} req/s"
            )
        finally:
            for p in procs:
                stop(p)
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
