"""StateStore contract, run against both backends: local SQLite and the real Redis.

Redis is the machine's server at 127.0.0.1:6379 with a unique key prefix per
test, deleted afterwards. When Redis is unreachable the Redis cases skip with
the reason; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from gateway.api import StateUnavailableError
from gateway.config import StateConfig
from gateway.state import (
    ClosableStateStore,
    LocalState,
    RedisState,
    open_state,
    parse_sentinel_url,
)
from gateway.testing.require import require
from gateway.testing.tcpproxy import TCPProxy

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def _redis_or_skip() -> redis.asyncio.Redis:
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        reason = f"Redis at {REDIS_URL} unreachable: {exc}"
        require(False, reason)  # skips locally, fails under CI=true
    return client


@pytest.fixture(params=["local", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ClosableStateStore]:
    if request.param == "local":
        s = open_state(StateConfig(path="state.sqlite"), tmp_path)
        assert isinstance(s, LocalState)
        yield s
        await s.close()
        return
    admin = await _redis_or_skip()
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    s = open_state(StateConfig(backend="redis", url=REDIS_URL, key_prefix=prefix), tmp_path)
    assert isinstance(s, RedisState)
    try:
        yield s
    finally:
        await s.close()
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_counters_add_up_per_table_and_missing_keys_are_absent(
    store: ClosableStateStore,
) -> None:
    await store.incr_many("bayes", {"viagra": (3, 0), "meeting": (0, 2)})
    await store.incr_many("bayes", {"viagra": (1, 1), "naïve ✓": (5, 7)})
    await store.incr_many("other", {"viagra": (100, 100)})
    got = await store.get_many("bayes", ["viagra", "meeting", "naïve ✓", "unknown"])
    assert got == {"viagra": (4, 1), "meeting": (0, 2), "naïve ✓": (5, 7)}
    assert await store.get_many("other", ["viagra"]) == {"viagra": (100, 100)}
    assert await store.get_many("bayes", []) == {}


async def test_large_batches_are_chunked_and_complete(store: ClosableStateStore) -> None:
    deltas = {f"tok{i}": (i, 1) for i in range(2500)}
    await store.incr_many("t", deltas)
    got = await store.get_many("t", list(deltas))
    assert got == deltas


async def test_hit_counts_events_in_a_sliding_window(store: ClosableStateStore) -> None:
    t0 = 1_700_000_000.0
    counts = [await store.hit("ip:192.0.2.1", 60, now=t0 + i * 10) for i in range(8)]
    assert counts == [1, 2, 3, 4, 5, 6, 6, 6]  # hits older than 60 s fall out
    assert await store.hit("ip:192.0.2.2", 60, now=t0 + 70) == 1  # keys are independent
    assert await store.hit("ip:192.0.2.1", 60, now=t0 + 200) == 1
    with pytest.raises(ValueError):
        await store.hit("k", 0)


async def test_concurrent_hits_from_many_tasks_are_all_counted(store: ClosableStateStore) -> None:
    t0 = 1_700_000_000.0
    results = await asyncio.gather(*(store.hit("burst", 60, now=t0 + i * 0.001) for i in range(50)))
    assert max(results) == 50
    assert await store.hit("burst", 60, now=t0 + 1) == 51


async def test_unreachable_redis_raises_state_unavailable_and_recovers_on_its_own() -> None:
    down = RedisState("redis://:secret@127.0.0.1:1/0", "gwtest:")
    with pytest.raises(StateUnavailableError) as err:
        await down.hit("k", 10)
    assert "secret" not in str(err.value)
    with pytest.raises(StateUnavailableError):
        await down.get_many("t", ["a"])
    assert await down.ping() is False
    await down.close()


async def test_redis_store_reconnects_after_its_connection_is_killed(tmp_path: Path) -> None:
    admin = await _redis_or_skip()
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    name = prefix.replace(":", "_")
    client = RedisState(f"{REDIS_URL}?client_name={name}", prefix)
    await client.incr_many("t", {"k": (1, 0)})
    # kill only our own connection: other suites share this server
    killed = 0
    for info in await admin.client_list():
        if info.get("name") == name:
            killed += await admin.client_kill_filter(_id=info["id"])
    assert killed == 1
    got: dict[str, tuple[int, int]] = {}
    for _ in range(3):
        try:
            got = await client.get_many("t", ["k"])
            break
        except StateUnavailableError:
            continue
    assert got == {"k": (1, 0)}
    await client.close()
    keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


def test_local_state_is_shared_by_processes_on_one_host(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from gateway.state import LocalState
        async def main():
            s = LocalState(Path({str(tmp_path / "s.sqlite")!r}))
            for _ in range(20):
                await s.incr_many("t", {{"k": (1, 2)}})
                await s.hit("h", 3600)
            await s.close()
        asyncio.run(main())
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]

    async def check() -> None:
        s = LocalState(tmp_path / "s.sqlite")
        assert await s.get_many("t", ["k"]) == {"k": (60, 120)}
        assert await s.hit("h", 3600) == 61
        await s.close()

    asyncio.run(check())


async def test_unopenable_local_state_raises_state_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    s = LocalState(blocker / "state.sqlite")
    with pytest.raises(StateUnavailableError, match="local state"):
        await s.incr_many("t", {"k": (1, 1)})
    await s.close()


def test_sentinel_urls_name_the_sentinels_service_db_and_password() -> None:
    target = parse_sentinel_url("redis+sentinel://:p%40ss@s1:26379,[::1]:26380/mymaster/2")
    assert target.sentinels == (("s1", 26379), ("::1", 26380))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "p@ss")
    assert parse_sentinel_url("redis+sentinel://s1:26379/mymaster").db == 0
    with pytest.raises(ValueError, match="service name"):
        parse_sentinel_url("redis+sentinel://s1:26379")
    with pytest.raises(ValueError, match="host:port"):
        parse_sentinel_url("redis+sentinel://s1/mymaster")


async def test_unreachable_sentinel_or_cluster_raises_state_unavailable() -> None:
    for url in ("redis+sentinel://127.0.0.1:1/mymaster/0", "redis+cluster://127.0.0.1:1"):
        with pytest.raises(ValueError):
            StateConfig(backend="redis", url="http://x")
        StateConfig(backend="redis", url=url)  # accepted by the config
        store = RedisState(url, "gwtest:")
        with pytest.raises(StateUnavailableError):
            await store.hit("k", 10)
        await store.close()


async def test_redis_outage_raises_state_unavailable_then_recovers_with_nothing_lost() -> None:
    """Redis down (a proxy cut in front of the shared server): errors fast, then reconnects."""
    admin = await _redis_or_skip()
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    host, _, port = REDIS_URL.removeprefix("redis://").partition("/")[0].rpartition(":")
    proxy = await asyncio.to_thread(lambda: TCPProxy(host, int(port)).up())
    store = RedisState(f"redis://127.0.0.1:{proxy.port}/0", prefix)
    try:
        await store.incr_many("t", {"k": (1, 0)})
        await asyncio.to_thread(proxy.down)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StateUnavailableError):
            await store.incr_many("t", {"k": (1, 0)})
        assert loop.time() - started < 11  # bounded by the store's deadline
        assert await store.ping() is False
        await asyncio.to_thread(proxy.up)
        for _ in range(3):
            try:
                await store.incr_many("t", {"k": (0, 1)})
                break
            except StateUnavailableError:
                continue
        assert await store.get_many("t", ["k"]) == {"k": (1, 1)}
    finally:
        await store.close()
        await asyncio.to_thread(proxy.close)
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_plain_command_increments_used_for_cluster_match_the_scripted_ones() -> None:
    admin = await _redis_or_skip()
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    scripted = RedisState(REDIS_URL, prefix)
    plain = RedisState(REDIS_URL, prefix)
    plain._scripted = False  # what a redis+cluster:// store does
    try:
        deltas = {f"k{i}": (i % 3, i % 2) for i in range(300)}
        await scripted.incr_many("t", deltas)
        await plain.incr_many("t", deltas)
        got = await plain.get_many("t", list(deltas))
        assert got == {k: (2 * a, 2 * b) for k, (a, b) in deltas.items()}
    finally:
        await scripted.close()
        await plain.close()
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_blobs_are_stored_replaced_listed_and_kept_per_table(
    store: ClosableStateStore,
) -> None:
    """The classifier's training set: byte strings by key, any bytes, replaced on write."""
    data = bytes(range(256)) * 40
    await store.put_blobs("msgs", {"k1": b"\x00first", "k2": data})
    await store.put_blobs("msgs", {"k1": b"second"})
    await store.put_blobs("other", {"k1": b"elsewhere"})
    assert await store.get_blobs("msgs", ["k1", "k2", "missing"]) == {"k1": b"second", "k2": data}
    assert sorted(await store.blob_keys("msgs")) == ["k1", "k2"]
    assert await store.blob_keys("empty") == []
    assert await store.get_blobs("msgs", []) == {}
    many = {f"m{i}": i.to_bytes(4, "big") for i in range(1200)}  # past one SQL chunk
    await store.put_blobs("big", many)
    assert await store.get_blobs("big", list(many)) == many
    assert len(await store.blob_keys("big")) == 1200
