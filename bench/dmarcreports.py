"""DMARC report recording and building: cost per message and for a full report.

- record: ``rows_for`` (through the caching resolver, answers from a loopback
  DNS server, as the dmarc policy left them) + ``store.add`` on SQLite, against
  the baseline of one ``LocalState.incr_many`` (what a rate limit costs a message)
  in the same run; and on Redis when it answers.
- flood: ``2 * cap`` distinct rows into one domain: the cap holds, the rest counted.
- build: the XML and gzip of a report with ``cap`` rows.

Run: .venv/bin/python bench/dmarcreports.py [N]; loopback only, bounded counts.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

from gateway.api import AuthResult
from gateway.config import DmarcReportsConfig, DNSConfig
from gateway.dmarcreports.rows import PolicyPublished, Row, rows_for
from gateway.dmarcreports.store import LocalReportStore, RedisReportStore, ReportStore
from gateway.dmarcreports.xml import build_xml
from gateway.dns import CachingResolver
from gateway.state import LocalState
from gateway.testing.dnsserver import DNSServer

DAY = 86_400
AUTH = (
    AuthResult("spf", "pass", properties=(("smtp.mailfrom", "b@mail.example.com"),)),
    AuthResult("dkim", "pass", properties=(("header.d", "example.com"), ("header.s", "s1"))),
    AuthResult(
        "dmarc",
        "pass",
        properties=(("header.from", "example.com"), ("polrec.domain", "example.com")),
    ),
)
ZONE = {"_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.com")]}


async def _record(store: ReportStore, resolver: CachingResolver, n: int, interval: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        rows = await rows_for(
            resolver=resolver,
            auth=AUTH,
            symbols=[],
            action="relay",
            client_ip=f"192.0.2.{i % 50}",
            mail_from="b@mail.example.com",
            helo="mail.example.com",
        )
        for policy, row in rows:
            await store.add(
                interval,
                policy,
                row,
                max_rows=10_000,
                max_domains=10_000,
                expires=time.time() + DAY,
            )
    return time.perf_counter() - start


async def main(n: int) -> None:
    interval = int(time.time()) // DAY * DAY
    with DNSServer(ZONE, zones=["com"]) as dns, tempfile.TemporaryDirectory() as tmp:
        resolver = CachingResolver(DNSConfig(nameservers=(dns.address,), timeout=2.0))
        base_store = LocalState(Path(tmp) / "base.sqlite")
        start = time.perf_counter()
        for i in range(n):
            await base_store.incr_many("bench", {f"k{i % 50}": (1, 0)})
        base = time.perf_counter() - start
        await base_store.close()

        local = LocalReportStore(Path(tmp) / "reports.sqlite")
        await _record(local, resolver, 20, interval)  # warm the DNS cache and the file
        took = await _record(local, resolver, n, interval)
        print(
            f"record (SQLite): {took / n * 1000:.3f} ms/message ({n} messages, 50 rows); "
            f"state incr_many alone {base / n * 1000:.3f} ms; ratio {took / base:.2f}x"
        )
        url = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
        remote = RedisReportStore(url, f"gwbench:{os.getpid()}:")
        try:
            took_r = await _record(remote, resolver, n, interval)
            print(f"record (Redis): {took_r / n * 1000:.3f} ms/message; ratio {took_r / base:.2f}x")
        except Exception as exc:
            print(f"record (Redis): skipped ({type(exc).__name__}: {exc})")
        finally:
            await remote.close()

        cap = 10_000
        policy = PolicyPublished("flood.test")
        start = time.perf_counter()
        kept = 0
        for i in range(2 * cap):
            row = Row(
                f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "flood.test", "none", "fail", "fail"
            )
            kept += await local.add(
                interval, policy, row, max_rows=cap, max_domains=10_000, expires=time.time() + DAY
            )
        flood = time.perf_counter() - start
        report = await local.report(interval, "flood.test")
        assert report is not None and len(report.rows) == cap and report.dropped == cap
        size = (Path(tmp) / "reports.sqlite").stat().st_size
        print(
            f"flood: {2 * cap} distinct rows in {flood:.2f} s ({flood / (2 * cap) * 1000:.3f} ms "
            f"each), {kept} kept, {report.dropped} counted as dropped, SQLite file {size >> 10} KB"
        )
        cfg = DmarcReportsConfig(enabled=True, org_name="Bench", email="d@example.org")
        start = time.perf_counter()
        xml = build_xml(cfg, report)
        gz = gzip.compress(xml, 9)
        built = time.perf_counter() - start
        print(
            f"build: {cap}-row report in {built * 1000:.0f} ms, XML {len(xml) >> 10} KB, "
            f"gzip {len(gz) >> 10} KB"
        )
        await local.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
