"""Report rows counted per (interval, policy domain), on SQLite or Redis.

Bounded under a flood: at most ``max_rows`` distinct rows per domain and
``max_domains`` domains per interval; what does not fit is counted as dropped
(per domain, and under ``""`` for domains that did not fit), so a report can
say it is incomplete and the operator can see it in the metrics.

- :class:`LocalReportStore`: tables in the ``[state]`` SQLite file (WAL), every
  call in a worker thread, one transaction per row: the processes of one host
  count together.
- :class:`RedisReportStore`: the ``[state]`` Redis, so every node of a cluster
  counts into the same rows and one node sends. The keys of one interval share
  a hash tag (``{prefix}dmarc:{<interval>}:...``), so the add script touches one
  Cluster slot; every key expires ``retention_days`` after its interval.

Sending once: :meth:`ReportStore.lock` is a lease (SQLite row / ``SET NX PX``)
held while a node sends, and :meth:`ReportStore.mark` records each (interval,
domain) outcome, so a report is never sent twice. Failures raise
:class:`gateway.api.StateUnavailableError`.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.api import StateUnavailableError
from gateway.config import Config
from gateway.dmarcreports.rows import PolicyPublished, Row
from gateway.sqlitewal import enable_wal
from gateway.state import run_redis

__all__ = [
    "DomainReport",
    "LocalReportStore",
    "RedisReportStore",
    "ReportStore",
    "open_report_store",
]

_TIMEOUT = 5.0  # seconds for one store operation


@dataclass(frozen=True, slots=True)
class DomainReport:
    """What one report says: the policy seen, the counted rows, what did not fit."""

    interval: int
    policy: PolicyPublished
    rows: tuple[tuple[Row, int], ...]
    dropped: int


class ReportStore(Protocol):
    async def add(
        self,
        interval: int,
        policy: PolicyPublished,
        row: Row,
        *,
        max_rows: int,
        max_domains: int,
        expires: float,
    ) -> bool:
        """Count one message in its row; False when it was dropped (a cap was reached)."""
        ...

    async def intervals(self) -> list[int]: ...

    async def domains(self, interval: int) -> list[str]: ...

    async def report(self, interval: int, domain: str) -> DomainReport | None: ...

    async def dropped_domains(self, interval: int) -> int: ...

    async def marks(self, interval: int) -> dict[str, str]:
        """domain -> outcome for the reports of ``interval`` already settled."""
        ...

    async def mark(self, interval: int, domain: str, outcome: str, expires: float) -> None: ...

    async def count_destination(self, day: int, address: str, expires: float) -> int:
        """One more report to ``address`` on UTC day ``day``; the new count."""
        ...

    async def lock(self, ttl: float) -> str | None:
        """A lease on sending, or None while another process holds one."""
        ...

    async def unlock(self, token: str) -> None: ...

    async def purge(self, before: int) -> None:
        """Forget intervals that started before ``before``."""
        ...

    async def close(self) -> None: ...


def open_report_store(config: Config) -> ReportStore:
    """The store ``dmarc_reports.store`` names; nothing connects here."""
    state = config.state
    if config.dmarc_reports.store == "state" and state.backend == "redis":
        return RedisReportStore(state.url, state.key_prefix)
    return LocalReportStore(config.resolve_path(state.path))


# --- SQLite ---------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dmarc_domains (
    ival INTEGER NOT NULL,
    domain TEXT NOT NULL,
    policy TEXT NOT NULL,
    nrows INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ival, domain)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dmarc_rows (
    ival INTEGER NOT NULL,
    domain TEXT NOT NULL,
    row TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (ival, domain, row)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dmarc_marks (
    ival INTEGER NOT NULL,
    domain TEXT NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (ival, domain)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dmarc_kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
"""


class LocalReportStore:
    """Tables next to the counters in the ``[state]`` SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # One call in a worker thread at a time: a flood of recordings waits here, on
        # the loop, instead of parking the shared thread pool's workers on ``_lock``.
        self._serial = asyncio.Lock()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                enable_wal(db, _TIMEOUT)
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _tx(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            db = self._open()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return result

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            return fn(self._open())

    async def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            async with asyncio.timeout(_TIMEOUT * 2), self._serial:
                return await asyncio.to_thread(fn)
        except (OSError, sqlite3.Error, TimeoutError) as exc:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None
            raise StateUnavailableError(
                f"DMARC report store at {self.path} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def add(
        self,
        interval: int,
        policy: PolicyPublished,
        row: Row,
        *,
        max_rows: int,
        max_domains: int,
        expires: float,
    ) -> bool:
        domain, key, pol = policy.domain, row.key(), policy.to_json()

        def add(db: sqlite3.Connection) -> bool:
            known = db.execute(
                "SELECT nrows FROM dmarc_domains WHERE ival = ? AND domain = ?", (interval, domain)
            ).fetchone()
            if known is None:
                (count,) = db.execute(
                    "SELECT count(*) FROM dmarc_domains WHERE ival = ? AND domain != ''",
                    (interval,),
                ).fetchone()
                if count >= max_domains:
                    db.execute(
                        "INSERT INTO dmarc_domains (ival, domain, policy, dropped) "
                        "VALUES (?, '', '', 1) ON CONFLICT (ival, domain) "
                        "DO UPDATE SET dropped = dropped + 1",
                        (interval,),
                    )
                    return False
                db.execute(
                    "INSERT INTO dmarc_domains (ival, domain, policy) VALUES (?, ?, ?)",
                    (interval, domain, pol),
                )
                nrows = 0
            else:
                nrows = int(known[0])
                db.execute(
                    "UPDATE dmarc_domains SET policy = ? WHERE ival = ? AND domain = ?",
                    (pol, interval, domain),
                )
            updated = db.execute(
                "UPDATE dmarc_rows SET n = n + 1 WHERE ival = ? AND domain = ? AND row = ?",
                (interval, domain, key),
            ).rowcount
            if updated:
                return True
            if nrows >= max_rows:
                db.execute(
                    "UPDATE dmarc_domains SET dropped = dropped + 1 WHERE ival = ? AND domain = ?",
                    (interval, domain),
                )
                return False
            db.execute(
                "INSERT INTO dmarc_rows (ival, domain, row, n) VALUES (?, ?, ?, 1)",
                (interval, domain, key),
            )
            db.execute(
                "UPDATE dmarc_domains SET nrows = nrows + 1 WHERE ival = ? AND domain = ?",
                (interval, domain),
            )
            return True

        return bool(await self._call(lambda: self._tx(add)))

    async def intervals(self) -> list[int]:
        rows = await self._call(
            lambda: self._read(
                lambda db: db.execute(
                    "SELECT DISTINCT ival FROM dmarc_domains ORDER BY ival"
                ).fetchall()
            )
        )
        return [int(r[0]) for r in rows]

    async def domains(self, interval: int) -> list[str]:
        rows = await self._call(
            lambda: self._read(
                lambda db: db.execute(
                    "SELECT domain FROM dmarc_domains WHERE ival = ? AND domain != '' "
                    "ORDER BY domain",
                    (interval,),
                ).fetchall()
            )
        )
        return [str(r[0]) for r in rows]

    async def report(self, interval: int, domain: str) -> DomainReport | None:
        def read(db: sqlite3.Connection) -> DomainReport | None:
            head = db.execute(
                "SELECT policy, dropped FROM dmarc_domains WHERE ival = ? AND domain = ?",
                (interval, domain),
            ).fetchone()
            if head is None or not domain:
                return None
            rows = db.execute(
                "SELECT row, n FROM dmarc_rows WHERE ival = ? AND domain = ? ORDER BY row",
                (interval, domain),
            ).fetchall()
            # decoded here, in the worker thread: 10,000 rows are ~50 ms of JSON
            return _report(interval, head[0], [(r, int(n)) for r, n in rows], int(head[1]))

        report: DomainReport | None = await self._call(lambda: self._read(read))
        return report

    async def dropped_domains(self, interval: int) -> int:
        row = await self._call(
            lambda: self._read(
                lambda db: db.execute(
                    "SELECT dropped FROM dmarc_domains WHERE ival = ? AND domain = ''",
                    (interval,),
                ).fetchone()
            )
        )
        return int(row[0]) if row else 0

    async def marks(self, interval: int) -> dict[str, str]:
        rows = await self._call(
            lambda: self._read(
                lambda db: db.execute(
                    "SELECT domain, outcome FROM dmarc_marks WHERE ival = ?", (interval,)
                ).fetchall()
            )
        )
        return {str(d): str(o) for d, o in rows}

    async def mark(self, interval: int, domain: str, outcome: str, expires: float) -> None:
        await self._call(
            lambda: self._tx(
                lambda db: db.execute(
                    "INSERT INTO dmarc_marks (ival, domain, outcome) VALUES (?, ?, ?) "
                    "ON CONFLICT (ival, domain) DO UPDATE SET outcome = excluded.outcome",
                    (interval, domain, outcome),
                )
            )
        )

    def _kv_incr(self, db: sqlite3.Connection, key: str, expires: float) -> int:
        db.execute("DELETE FROM dmarc_kv WHERE expires < ?", (time.time(),))
        db.execute(
            "INSERT INTO dmarc_kv (key, value, expires) VALUES (?, '1', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)",
            (key, expires),
        )
        (value,) = db.execute("SELECT value FROM dmarc_kv WHERE key = ?", (key,)).fetchone()
        return int(value)

    async def count_destination(self, day: int, address: str, expires: float) -> int:
        key = f"dest:{day}:{address.lower()}"
        return int(await self._call(lambda: self._tx(lambda db: self._kv_incr(db, key, expires))))

    async def lock(self, ttl: float) -> str | None:
        token = secrets.token_hex(8)

        def take(db: sqlite3.Connection) -> bool:
            now = time.time()
            db.execute("DELETE FROM dmarc_kv WHERE key = 'lock' AND expires < ?", (now,))
            return (
                db.execute(
                    "INSERT INTO dmarc_kv (key, value, expires) VALUES ('lock', ?, ?) "
                    "ON CONFLICT (key) DO NOTHING",
                    (token, now + ttl),
                ).rowcount
                == 1
            )

        return token if await self._call(lambda: self._tx(take)) else None

    async def unlock(self, token: str) -> None:
        await self._call(
            lambda: self._tx(
                lambda db: db.execute(
                    "DELETE FROM dmarc_kv WHERE key = 'lock' AND value = ?", (token,)
                )
            )
        )

    async def purge(self, before: int) -> None:
        def purge(db: sqlite3.Connection) -> None:
            for table in ("dmarc_domains", "dmarc_rows", "dmarc_marks"):
                db.execute(f"DELETE FROM {table} WHERE ival < ?", (before,))  # noqa: S608

        await self._call(lambda: self._tx(purge))

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)


def _report(
    interval: int, policy_json: str, rows: list[tuple[str, int]], dropped: int
) -> DomainReport:
    """Decoded rows; a row that does not decode (a foreign writer) counts as dropped."""
    try:
        policy = PolicyPublished.from_json(policy_json)
    except ValueError:
        return DomainReport(interval, PolicyPublished(""), (), sum(n for _, n in rows) + dropped)
    out: list[tuple[Row, int]] = []
    for key, n in rows:
        try:
            out.append((Row.from_key(key), n))
        except ValueError:
            dropped += n
    return DomainReport(interval, policy, tuple(out), dropped)


# --- Redis ----------------------------------------------------------------------

# KEYS: domains hash, rows hash, dropped hash. ARGV: domain, policy, row, max_rows,
# max_domains, expire-at (unix seconds). Returns 1 stored, 0 dropped.
_ADD_LUA = """
local function expire() for i = 1, 3 do redis.call('EXPIREAT', KEYS[i], ARGV[6]) end end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
   and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then
  redis.call('HINCRBY', KEYS[3], '', 1)
  expire()
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1
   or redis.call('HLEN', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  expire()
  return 1
end
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
expire()
return 0
"""
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisReportStore:
    """The ``[state]`` Redis: every node counts into the same rows."""

    def __init__(self, url: str, key_prefix: str = "gateway:") -> None:
        from gateway.state import redis_client

        self.url = url
        self.prefix = key_prefix
        self._redis: Any = redis_client(url)

    def _key(self, interval: int, part: str) -> str:
        return f"{self.prefix}dmarc:{{{interval}}}:{part}"

    async def _run(self, op: Callable[[], Awaitable[Any]]) -> Any:
        return await run_redis(op, "DMARC report store", self.url)

    async def add(
        self,
        interval: int,
        policy: PolicyPublished,
        row: Row,
        *,
        max_rows: int,
        max_domains: int,
        expires: float,
    ) -> bool:
        domain = policy.domain
        keys = [
            self._key(interval, "d"),
            self._key(interval, f"r:{domain}"),
            self._key(interval, "x"),
        ]
        args = [domain, policy.to_json(), row.key(), max_rows, max_domains, int(expires)]

        async def op() -> Any:
            stored = await self._redis.eval(_ADD_LUA, 3, *keys, *args)
            index = f"{self.prefix}dmarc:intervals"
            await self._redis.zadd(index, {str(interval): interval}, nx=True)
            await self._redis.expireat(index, int(expires))
            return stored

        return bool(int(await self._run(op)))

    async def intervals(self) -> list[int]:
        members = await self._run(
            lambda: self._redis.zrange(f"{self.prefix}dmarc:intervals", 0, -1)
        )
        return sorted(int(m) for m in members)

    async def domains(self, interval: int) -> list[str]:
        names = await self._run(lambda: self._redis.hkeys(self._key(interval, "d")))
        return sorted(_text(n) for n in names)

    async def report(self, interval: int, domain: str) -> DomainReport | None:
        async def op() -> Any:
            policy = await self._redis.hget(self._key(interval, "d"), domain)
            rows = await self._redis.hgetall(self._key(interval, f"r:{domain}"))
            dropped = await self._redis.hget(self._key(interval, "x"), domain)
            return policy, rows, dropped

        policy, rows, dropped = await self._run(op)
        if policy is None or not domain:
            return None
        decoded = sorted((_text(k), int(v)) for k, v in rows.items())
        return await asyncio.to_thread(_report, interval, _text(policy), decoded, int(dropped or 0))

    async def dropped_domains(self, interval: int) -> int:
        value = await self._run(lambda: self._redis.hget(self._key(interval, "x"), ""))
        return int(value or 0)

    async def marks(self, interval: int) -> dict[str, str]:
        values = await self._run(lambda: self._redis.hgetall(self._key(interval, "s")))
        return {_text(k): _text(v) for k, v in values.items()}

    async def mark(self, interval: int, domain: str, outcome: str, expires: float) -> None:
        key = self._key(interval, "s")

        async def op() -> None:
            await self._redis.hset(key, domain, outcome)
            await self._redis.expireat(key, int(expires))

        await self._run(op)

    async def count_destination(self, day: int, address: str, expires: float) -> int:
        key = f"{self.prefix}dmarc:dest:{day}"

        async def op() -> int:
            count = await self._redis.hincrby(key, address.lower(), 1)
            await self._redis.expireat(key, int(expires))
            return int(count)

        return int(await self._run(op))

    async def lock(self, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        ok = await self._run(
            lambda: self._redis.set(
                f"{self.prefix}dmarc:lock", token, nx=True, px=max(1, int(ttl * 1000))
            )
        )
        return token if ok else None

    async def unlock(self, token: str) -> None:
        await self._run(lambda: self._redis.eval(_UNLOCK_LUA, 1, f"{self.prefix}dmarc:lock", token))

    async def purge(self, before: int) -> None:
        """Keys expire by themselves; only the index of intervals needs trimming."""
        await self._run(
            lambda: self._redis.zremrangebyscore(
                f"{self.prefix}dmarc:intervals", "-inf", f"({before}"
            )
        )

    async def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
