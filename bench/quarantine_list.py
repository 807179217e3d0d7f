"""Listing a large PostgreSQL quarantine: one page per filter, a million rows.

    python -m bench.quarantine_list                 # 1,000,000 rows, 50 per page
    python -m bench.quarantine_list --rows 100000   # smaller, quicker
    python -m bench.quarantine_list --api           # also through GET /api/v1/quarantine

Fills a throwaway schema on the PostgreSQL server (``GATEWAY_TEST_PG``,
default ``postgresql://127.0.0.1:5432/test``) through the gateway's own
migrations, with rows generated in SQL (30 days of mail, 20,000 senders,
5,000 recipients, scores 10-40, 3-6 symbols of 40, subjects of 200 words; the
stored message is a small stand-in, since listing never reads it), then times
``PostgresQuarantine.search`` for each filter the web UI and API offer: the
first page and a page deep down (reached by its cursor), median and max of
several runs, plus the query plan's top node. The schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import psycopg

from gateway.quarantine import PostgresQuarantine, QuarantineFilter
from gateway.testing.postgres import ADMIN_DSN, schema_dsn

_FILL = """
INSERT INTO quarantine (id, queue_id, received_at, client_ip, helo, mail_from, mail_from_lc,
    rcpt_tos, rcpt_lc, size, score, action, reasons, headers, raw, subject, header_from,
    symbols, forced_by)
SELECT lpad(to_hex(n), 12, '0') || 'aaaaaaaaaaaa', 'Q' || n,
    %(end)s - (n * interval '1 second') * (2592000.0 / %(rows)s),
    '192.0.2.1', 'mx.test', s, s, ARRAY[r], ARRAY[r], 20000,
    10 + (n * 7919 %% 3000) / 100.0, 'quarantine', ARRAY['spam'], ARRAY['X-Spam-Flag: YES'],
    '\\x00'::bytea,
    'Subject w' || (n * 31 %% 200) || ' w' || (n * 17 %% 200) || ' offer',
    'Sender <' || s || '>',
    (SELECT jsonb_agg(jsonb_build_object('name', 'SYM_' || ((n + k * 13) %% 40),
        'score', 1.0, 'policy', 'rules', 'detail', ''))
     FROM generate_series(1, 3 + n %% 4) k),
    ''
FROM (SELECT n, 'user' || (n * 7 %% 20000) || '@sender' || (n %% 97) || '.test' AS s,
             'rcpt' || (n * 13 %% 5000) || '@example.org' AS r
      FROM generate_series(%(first)s::bigint, %(last)s::bigint) n) g
"""


_END = datetime(2026, 3, 31, tzinfo=UTC)  # the newest row's time


async def fill(dsn: str, rows: int, end: datetime) -> None:
    store = PostgresQuarantine(dsn)
    await store.count()  # runs the migrations: the real schema and indexes
    await store.close()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        step = 100_000
        for first in range(1, rows + 1, step):
            last = min(rows, first + step - 1)
            await conn.execute(_FILL, {"end": end, "rows": rows, "first": first, "last": last})
        await conn.execute("VACUUM ANALYZE quarantine")


async def plan(dsn: str, f: QuarantineFilter, limit: int, cursor: str | None) -> str:
    sql, args = PostgresQuarantine.search_query(f, limit=limit, cursor=cursor)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(b"EXPLAIN " + sql, args)
        rows = await cur.fetchall()
    nodes = [r[0].strip().lstrip("-> ").split("  (")[0] for r in rows]
    shown = [n for n in nodes if "Scan" in n or n.startswith("Sort")]
    return " / ".join(shown[:3])


def filters(end: datetime) -> dict[str, QuarantineFilter]:
    return {
        "newest first": QuarantineFilter(),
        "recipient": QuarantineFilter(rcpt="rcpt42@example.org"),
        "sender": QuarantineFilter(sender="user6415@sender26.test"),
        "min score 35": QuarantineFilter(min_score=35),
        "min score 39.9 (rare)": QuarantineFilter(min_score=39.9),
        "score 20-21": QuarantineFilter(min_score=20, max_score=21),
        "symbol": QuarantineFilter(symbol="SYM_7"),
        "words (common)": QuarantineFilter(text="offer"),
        "words (rare)": QuarantineFilter(text="w17 w42"),
        "last 24 h": QuarantineFilter(since=end - timedelta(days=1)),
        "one day, 2 weeks ago": QuarantineFilter(
            since=end - timedelta(days=15), until=end - timedelta(days=14)
        ),
        "recipient + min score": QuarantineFilter(rcpt="rcpt42@example.org", min_score=30),
        "words + symbol": QuarantineFilter(text="offer", symbol="SYM_3"),
        # Nothing matches: a plan walking the time index would read every row.
        "none: words": QuarantineFilter(text="zzzz"),
        "none: symbol": QuarantineFilter(symbol="NO_SUCH_SYMBOL"),
        "none: min score 45": QuarantineFilter(min_score=45),
        "none: recipient": QuarantineFilter(rcpt="nobody@example.org"),
    }


async def measure(dsn: str, rows: int, limit: int, runs: int) -> None:
    store = PostgresQuarantine(dsn)
    print(f"{rows:,} rows, {limit} per page, {runs} runs each (median / max ms)")
    print(f"{'filter':24} {'page 1':>15} {'page 20':>15} {'rows':>5}  plan")
    for name, f in filters(_END).items():
        first: list[float] = []
        deep: list[float] = []
        cursor = None
        page_rows = 0
        for run in range(runs):
            t0 = time.perf_counter()
            page = await store.search(f, limit=limit)
            first.append(1000 * (time.perf_counter() - t0))
            page_rows = len(page.items)
            if run == 0:  # walk to page 20 once, then time fetching it
                cursor = page.next
                for _ in range(18):
                    if cursor is None:
                        break
                    cursor = (await store.search(f, limit=limit, cursor=cursor)).next
            if cursor is not None:
                t0 = time.perf_counter()
                await store.search(f, limit=limit, cursor=cursor)
                deep.append(1000 * (time.perf_counter() - t0))
        shown = f"{statistics.median(deep):6.1f} / {max(deep):6.1f}" if deep else f"{'-':>15}"
        print(
            f"{name:24} {statistics.median(first):6.1f} / {max(first):6.1f} {shown:>15} "
            f"{page_rows:>5}  {await plan(dsn, f, limit, None)}"
        )
    t0 = time.perf_counter()
    total = await store.count()
    print(f"count(): {1000 * (time.perf_counter() - t0):.0f} ms ({total:,} rows)")
    await store.close()


def _query(f: QuarantineFilter, limit: int) -> str:
    """The REST API's query string for ``f`` (docs/web.md)."""
    params: dict[str, object] = {
        "rcpt": f.rcpt,
        "sender": f.sender,
        "min_score": f.min_score,
        "max_score": f.max_score,
        "symbol": f.symbol,
        "q": f.text,
        "since": f.since.isoformat() if f.since else None,
        "until": f.until.isoformat() if f.until else None,
        "limit": limit,
    }
    return urlencode({k: v for k, v in params.items() if v is not None})


async def measure_api(dsn: str, limit: int, runs: int) -> None:
    """The same filters through ``GET /api/v1/quarantine`` over HTTP on loopback."""
    import aiohttp

    from gateway.testing.web import served_web

    store = PostgresQuarantine(dsn)
    with tempfile.TemporaryDirectory() as tmp:
        async with served_web(store, None, Path(tmp)) as web, web.client() as http:
            print(f"REST API, {limit} per page, {runs} runs each (median / max ms, HTTP + JSON)")
            for name, f in filters(_END).items():
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    async with http.get(web.url(f"/api/v1/quarantine?{_query(f, limit)}")) as r:
                        body = await r.json()
                        if r.status != 200:
                            raise aiohttp.ClientError(f"{name}: {r.status} {body}")
                    times.append(1000 * (time.perf_counter() - t0))
                print(
                    f"{name:24} {statistics.median(times):6.1f} / {max(times):6.1f} "
                    f"{len(body['items']):>5}"
                )
    await store.close()


async def main_async(rows: int, limit: int, runs: int, api: bool = False) -> None:
    schema = f"gwbench_{int(time.time())}"
    admin = await psycopg.AsyncConnection.connect(ADMIN_DSN, autocommit=True)
    await admin.execute(f'CREATE SCHEMA "{schema}"'.encode())
    dsn = schema_dsn(schema)
    try:
        t0 = time.perf_counter()
        await fill(dsn, rows, _END)
        print(f"filled in {time.perf_counter() - t0:.0f} s")
        await measure(dsn, rows, limit, runs)
        if api:
            await measure_api(dsn, limit, runs)
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())
        await admin.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--api", action="store_true", help="also time the REST API's list (HTTP)")
    args = ap.parse_args()
    asyncio.run(main_async(args.rows, args.limit, args.runs, args.api))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
