"""Shared counters for policies: classifier tokens, rate limits, reputation.

Two implementations of :class:`gateway.api.StateStore`:

- ``local`` (default): one SQLite file (WAL), every call in a worker thread so
  the event loop never waits on the disk. Shared by the processes of one host.
- ``redis``: ``redis.asyncio`` with ``key_prefix`` from the config, so several
  gateways count as one. Counter pairs live in 64 hashes per table
  (``{prefix}c:{table}:{shard}``, fields ``a:{key}`` and ``b:{key}``, shard =
  CRC32(key) mod 64): a call with thousands of keys is one pipeline of at most
  64 HMGETs or 64 increment scripts, and the shards spread over Cluster slots.
  Sliding-window hits are sorted sets (``{prefix}h:{key}``) that expire with
  their window. Sentinel (``redis+sentinel://``) and Cluster
  (``redis+cluster://``) use redis-py's clients of the same name.

Every failure becomes :class:`gateway.api.StateUnavailableError`; policies
step aside with a symbol and mail keeps flowing. Both stores recover by
themselves (SQLite reopens, redis-py reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from gateway.api import StateStore, StateUnavailableError
from gateway.config import StateConfig
from gateway.sqlitewal import enable_wal

__all__ = [
    "ClosableStateStore",
    "LocalState",
    "RedisState",
    "SentinelTarget",
    "open_state",
    "parse_sentinel_url",
    "redis_client",
]

_TIMEOUT = 5.0  # seconds for any one state operation
_CHUNK = 500  # keys per statement / pipeline: bounded work per round trip
_CLEANUP_EVERY = 1000  # hits between sweeps of expired hit rows (local)
# Redis counters live in this many hashes per table: a few commands per call
# however many keys (a message has thousands of tokens), yet spread over
# Cluster slots. Part of the storage layout: changing it orphans counts.
_SHARDS = 64
_INCR_LUA = """
for i = 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""


class ClosableStateStore(StateStore, Protocol):
    async def close(self) -> None: ...


def open_state(config: StateConfig, base_dir: Path) -> ClosableStateStore:
    """The configured store. Nothing connects here; errors surface on first use."""
    if config.backend == "redis":
        return RedisState(config.url, config.key_prefix)
    path = Path(config.path).expanduser()
    return LocalState(path if path.is_absolute() else base_dir / path)


def _check_table(table: str) -> None:
    if not table or len(table) > 64:
        raise ValueError(f"table name must be 1..64 characters, got {table!r}")


# --- local: SQLite -------------------------------------------------------------

_LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hits (
    key TEXT NOT NULL,
    at REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hits_key_at ON hits (key, at);
CREATE INDEX IF NOT EXISTS hits_expires ON hits (expires);
CREATE TABLE IF NOT EXISTS blobs (
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
"""


class LocalState:
    """SQLite on the local disk; counters survive restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._hits_since_sweep = 0

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                enable_wal(db, _TIMEOUT)
                db.execute("PRAGMA synchronous=NORMAL")  # counters, not mail: WAL keeps them
                db.executescript(_LOCAL_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _write_sync(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One statement over many rows, in one transaction."""
        with self._lock:
            db = self._open()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(sql, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _incr_sync(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        self._write_sync(
            "INSERT INTO counters (tbl, key, a, b) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tbl, key) DO UPDATE SET a = a + excluded.a, b = b + excluded.b",
            [(table, k, int(a), int(b)) for k, (a, b) in deltas.items()],
        )

    def _get_sync(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            db = self._open()
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, a, b in db.execute(
                    f"SELECT key, a, b FROM counters WHERE tbl = ? AND key IN ({marks})",  # noqa: S608
                    (table, *chunk),
                ):
                    out[key] = (int(a), int(b))
        return out

    def _hit_sync(self, key: str, window: float, now: float) -> int:
        with self._lock:
            db = self._open()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM hits WHERE key = ? AND at <= ?", (key, now - window))
                db.execute(
                    "INSERT INTO hits (key, at, expires) VALUES (?, ?, ?)", (key, now, now + window)
                )
                (count,) = db.execute(
                    "SELECT count(*) FROM hits WHERE key = ? AND at > ?", (key, now - window)
                ).fetchone()
                self._hits_since_sweep += 1
                if self._hits_since_sweep >= _CLEANUP_EVERY:
                    self._hits_since_sweep = 0
                    db.execute("DELETE FROM hits WHERE expires < ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(count)

    def _put_blobs_sync(self, table: str, items: Mapping[str, bytes]) -> None:
        self._write_sync(
            "INSERT INTO blobs (tbl, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (tbl, key) DO UPDATE SET value = excluded.value",
            [(table, k, bytes(v)) for k, v in items.items()],
        )

    def _get_blobs_sync(self, table: str, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with self._lock:
            db = self._open()
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, value in db.execute(
                    f"SELECT key, value FROM blobs WHERE tbl = ? AND key IN ({marks})",  # noqa: S608
                    (table, *chunk),
                ):
                    out[key] = bytes(value)
        return out

    def _blob_keys_sync(self, table: str) -> list[str]:
        with self._lock:
            db = self._open()
            return [k for (k,) in db.execute("SELECT key FROM blobs WHERE tbl = ?", (table,))]

    def _close_sync(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            async with asyncio.timeout(_TIMEOUT * 2):
                return await asyncio.to_thread(fn, *args)
        except (OSError, sqlite3.Error, TimeoutError) as exc:
            with self._lock:  # reopen on next use: the file may have been fixed
                if self._db is not None:
                    self._db.close()
                    self._db = None
            raise StateUnavailableError(
                f"local state at {self.path} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def incr_many(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        _check_table(table)
        if deltas:
            await self._call(self._incr_sync, table, dict(deltas))

    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        _check_table(table)
        if not keys:
            return {}
        result: dict[str, tuple[int, int]] = await self._call(self._get_sync, table, list(keys))
        return result

    async def hit(self, key: str, window: float, now: float | None = None) -> int:
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        return int(
            await self._call(self._hit_sync, key, window, time.time() if now is None else now)
        )

    async def put_blobs(self, table: str, items: Mapping[str, bytes]) -> None:
        _check_table(table)
        if items:
            await self._call(self._put_blobs_sync, table, dict(items))

    async def get_blobs(self, table: str, keys: list[str]) -> dict[str, bytes]:
        _check_table(table)
        if not keys:
            return {}
        result: dict[str, bytes] = await self._call(self._get_blobs_sync, table, list(keys))
        return result

    async def blob_keys(self, table: str) -> list[str]:
        _check_table(table)
        result: list[str] = await self._call(self._blob_keys_sync, table)
        return result

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)


# --- Redis ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """``redis+sentinel://[:password@]host:26379[,host:26379...]/service[/db]``."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split a Sentinel URL; ValueError says what is wrong."""
    rest = url.removeprefix("redis+sentinel://")
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    sentinels = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f'sentinel "{hostport}" must be host:port in {url!r}')
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"the Sentinel service name is missing in {url!r}: .../mymaster/0")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"expected .../service[/db] in {url!r}")
    password = unquote(auth.partition(":")[2]) if auth else None
    return SentinelTarget(
        tuple(sentinels), parts[0], int(parts[1]) if len(parts) == 2 else 0, password or None
    )


def _client(url: str) -> Any:
    """A redis-py asyncio client: plain, Sentinel-managed master, or Cluster."""
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.sentinel

    common: dict[str, Any] = {"socket_timeout": _TIMEOUT, "socket_connect_timeout": _TIMEOUT}
    if url.startswith("redis+sentinel://"):
        target = parse_sentinel_url(url)
        sentinel = redis.asyncio.sentinel.Sentinel(list(target.sentinels), **common)  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8
        return sentinel.master_for(target.service, db=target.db, password=target.password, **common)
    if url.startswith("redis+cluster://"):
        return redis.asyncio.cluster.RedisCluster.from_url(
            "redis://" + url.removeprefix("redis+cluster://"), **common
        )
    return redis.asyncio.Redis.from_url(url, health_check_interval=30, **common)


redis_client = _client  # for other stores on the [state] Redis (DMARC reports)


async def run_redis(op: Callable[[], Awaitable[Any]], what: str, url: str) -> Any:
    """``op()`` under a deadline; any Redis failure a StateUnavailableError naming ``what``
    at ``url`` (credentials left out). Building a pipeline may already connect (Cluster)."""
    import re

    import redis.exceptions

    try:
        async with asyncio.timeout(_TIMEOUT * 2):
            return await op()
    except (
        redis.exceptions.RedisError,
        redis.exceptions.RedisClusterException,  # not a RedisError
        OSError,
        TimeoutError,
    ) as exc:
        where = re.sub(r"//[^@/]*@", "//", url)  # no credentials in messages
        raise StateUnavailableError(
            f"{what} at {where} failed: {type(exc).__name__}: {str(exc) or 'timed out'}"
        ) from exc


class RedisState:
    """Redis (redis.asyncio): counters shared by every gateway of a cluster."""

    def __init__(self, url: str, key_prefix: str = "gateway:") -> None:

        import redis.asyncio.cluster

        self.url = url
        self.prefix = key_prefix
        self._redis: Any = _client(url)
        self._scripted = not isinstance(self._redis, redis.asyncio.cluster.RedisCluster)

    async def _run(self, op: Callable[[], Awaitable[Any]]) -> Any:
        return await run_redis(op, "Redis state", self.url)

    def _shard(self, table: str, key: str) -> str:
        return f"{self.prefix}c:{table}:{zlib.crc32(key.encode()) % _SHARDS:02x}"

    def _by_shard(self, table: str, keys: Iterable[str]) -> dict[str, list[str]]:
        shards: dict[str, list[str]] = {}
        for key in keys:
            shards.setdefault(self._shard(table, key), []).append(key)
        return shards

    async def incr_many(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        """One script call per shard (one key each, so Cluster-safe), all in one pipeline."""
        _check_table(table)
        if not deltas:
            return
        plan: list[tuple[str, list[Any]]] = []
        for shard, keys in self._by_shard(table, deltas).items():
            args: list[Any] = []
            for key in keys:
                a, b = deltas[key]
                if a or not b:  # (0, 0) still creates the pair
                    args += [f"a:{key}", int(a)]
                if b:
                    args += [f"b:{key}", int(b)]
            plan.append((shard, args))

        async def op() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for shard, args in plan:
                if self._scripted:
                    pipe.eval(_INCR_LUA, 1, shard, *args)  # EVAL: no NOSCRIPT after a restart
                else:  # redis-py's Cluster pipeline routes plain commands only
                    for i in range(0, len(args), 2):
                        pipe.hincrby(shard, args[i], args[i + 1])
            return await pipe.execute()

        await self._run(op)

    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        """One HMGET per shard, all in one pipeline."""
        _check_table(table)
        if not keys:
            return {}
        shards = self._by_shard(table, dict.fromkeys(keys))

        async def op() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for shard, members in shards.items():
                pipe.hmget(shard, [f"{h}:{k}" for k in members for h in "ab"])
            return await pipe.execute()

        replies = await self._run(op)
        out: dict[str, tuple[int, int]] = {}
        for members, values in zip(shards.values(), replies, strict=True):
            for i, key in enumerate(members):
                a, b = values[2 * i], values[2 * i + 1]
                if a is not None or b is not None:
                    out[key] = (int(a or 0), int(b or 0))
        return out

    async def hit(self, key: str, window: float, now: float | None = None) -> int:
        """One event in a sliding window: a sorted set of timestamps, trimmed on each hit."""
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        at = time.time() if now is None else now
        name = f"{self.prefix}h:{key}"

        async def op() -> Any:
            pipe = self._redis.pipeline(transaction=True)  # MULTI/EXEC: one key, one slot
            pipe.zremrangebyscore(name, "-inf", at - window)
            pipe.zadd(name, {f"{at:.6f}:{secrets.token_hex(4)}": at})
            pipe.zcount(name, f"({at - window}", "+inf")
            pipe.pexpire(name, max(1, int(window * 1000) + 1000))
            return await pipe.execute()

        replies = await self._run(op)
        return int(replies[2])

    def _blob_hash(self, table: str, shard: int) -> str:
        return f"{self.prefix}b:{table}:{shard:02x}"

    def _blob_shard(self, table: str, key: str) -> str:
        return self._blob_hash(table, zlib.crc32(key.encode()) % _SHARDS)

    async def put_blobs(self, table: str, items: Mapping[str, bytes]) -> None:
        """One HSET per shard, all in one pipeline."""
        _check_table(table)
        if not items:
            return
        shards: dict[str, dict[str, bytes]] = {}
        for key, value in items.items():
            shards.setdefault(self._blob_shard(table, key), {})[key] = bytes(value)

        async def op() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for shard, mapping in shards.items():
                pipe.hset(shard, mapping=mapping)
            return await pipe.execute()

        await self._run(op)

    async def get_blobs(self, table: str, keys: list[str]) -> dict[str, bytes]:
        """One HMGET per shard, all in one pipeline."""
        _check_table(table)
        if not keys:
            return {}
        shards: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            shards.setdefault(self._blob_shard(table, key), []).append(key)

        async def op() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for shard, members in shards.items():
                pipe.hmget(shard, members)
            return await pipe.execute()

        replies = await self._run(op)
        out: dict[str, bytes] = {}
        for members, values in zip(shards.values(), replies, strict=True):
            for key, value in zip(members, values, strict=True):
                if value is not None:
                    out[key] = value if isinstance(value, bytes) else str(value).encode()
        return out

    async def blob_keys(self, table: str) -> list[str]:
        """HKEYS of every shard, in one pipeline."""
        _check_table(table)
        names = [self._blob_hash(table, i) for i in range(_SHARDS)]

        async def op() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.hkeys(name)
            return await pipe.execute()

        replies = await self._run(op)
        return [k.decode() if isinstance(k, bytes) else str(k) for keys in replies for k in keys]

    async def ping(self) -> bool:
        """Readiness: Redis answers."""
        try:
            return bool(await self._run(self._redis.ping))
        except StateUnavailableError:
            return False

    async def close(self) -> None:
        # closing a client whose server is gone must not fail shutdown
        with contextlib.suppress(Exception):
            await self._redis.aclose()
