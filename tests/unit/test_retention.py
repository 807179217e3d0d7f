"""RetentionPurger in-process: schedule from the current config, clean stop, bounded batches."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway import metrics
from gateway.config import QuarantineConfig
from gateway.quarantine import LocalQuarantine, QuarantineItem
from gateway.retention import RetentionPurger
from gateway.testing.quarantine import held_item

RAW = b"Subject: held\r\n\r\nbody\r\n"


def held(days_old: float) -> QuarantineItem:
    return held_item(len(RAW), received_at=datetime.now(UTC) - timedelta(days=days_old))


class GatedStore(LocalQuarantine):
    """A real local store whose purge calls wait for the test to let them through."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls = 0
        self.emptied = asyncio.Event()  # a purge call found nothing left

    async def purge(self, older_than: datetime, *, limit: int | None = None) -> int:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        n = await super().purge(older_than, limit=limit)
        if n == 0:
            self.emptied.set()
        return n


async def test_stop_lets_the_batch_in_progress_finish_and_starts_no_other(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    for _ in range(3):
        await store.put(held(40), RAW)
    purger = RetentionPurger(store, lambda: QuarantineConfig(purge_interval=0.01), batch=1)
    purger.start()
    await store.entered.wait()  # the first of three batches
    stopping = asyncio.create_task(purger.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # waits for the store call, never abandons it in a thread
    store.gate.set()
    await stopping
    assert store.calls == 1 and await store.count() == 2
    await store.close()


async def test_interval_zero_waits_until_a_reconfiguration_sets_one(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    store.gate.set()
    await store.put(held(40), RAW)
    config = QuarantineConfig(purge_interval=0)
    purger = RetentionPurger(store, lambda: config, batch=1)
    purger.start()
    await asyncio.sleep(0)
    config = replace(config, purge_interval=0.01)
    purger.reconfigured()
    await store.emptied.wait()  # a full batch, then an empty one
    await purger.stop()
    assert store.calls == 2 and await store.count() == 0
    await store.close()


async def test_a_purge_that_fails_returns_none_and_one_that_works_the_count(
    tmp_path: Path,
) -> None:
    (tmp_path / "index.sqlite").write_bytes(b"not a database" * 100)
    broken = RetentionPurger(LocalQuarantine(tmp_path), QuarantineConfig)
    failures = metrics.QUARANTINE_PURGE_FAILURES._value.get()
    assert await broken.purge() is None
    assert metrics.QUARANTINE_PURGE_FAILURES._value.get() == failures + 1  # the alert's input
    good_store = LocalQuarantine(tmp_path / "good")
    for days in (40, 31, 1):
        await good_store.put(held(days), RAW)
    assert await RetentionPurger(good_store, QuarantineConfig).purge() == 2
    await good_store.close()
