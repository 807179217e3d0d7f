"""Local quarantine: durable files + SQLite index, crash consistency, clear errors."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.api import Action
from gateway.config import QuarantineConfig
from gateway.engine import Envelope, Evaluation
from gateway.pipeline import PipelineRun
from gateway.quarantine import (
    LocalQuarantine,
    QuarantineError,
    QuarantineItem,
    new_id,
    new_quarantine_item,
    open_quarantine,
    retention_cutoff,
    summarize,
)
from gateway.testing.quarantine import held_item
from gateway.verdict import ScoredSymbol, Verdict

RAW = b"From: a@b.test\r\nSubject: hi\r\n\r\n..dot-stuffed?\r\n\x00\xff binary\r\n"


def item(
    mail_from: str = "a@b.test",
    rcpts: tuple[str, ...] = ("x@example.org",),
    received_at: datetime | None = None,
) -> QuarantineItem:
    return held_item(
        len(RAW),
        received_at=received_at or datetime.now(UTC),
        mail_from=mail_from,
        rcpt_tos=rcpts,
        score=11.5,
        reasons=("spam score 11.50 (X)", "X=11.50"),
        headers=("X-Spam-Status: Yes, score=11.50", "Authentication-Results: h; none"),
    )


async def test_put_then_get_returns_identical_bytes_envelope_and_verdict(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    it = item()
    await store.put(it, RAW)
    got = await store.get(it.id)
    assert got is not None
    assert got[1] == RAW
    # put() takes the subject and From from the header for the listing.
    assert got[0] == summarize(it, RAW)
    assert (got[0].subject, got[0].header_from) == ("hi", "a@b.test")
    assert await store.count() == 1
    assert (tmp_path / "messages" / f"{it.id}.eml").read_bytes() == RAW
    await store.close()


async def test_list_filters_by_sender_and_recipient_case_insensitively_and_pages(
    tmp_path: Path,
) -> None:
    store = LocalQuarantine(tmp_path)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    items = [
        item(
            mail_from=f"s{i % 2}@b.test",
            rcpts=(f"r{i % 3}@example.org", "all@example.org"),
            received_at=base + timedelta(minutes=i),
        )
        for i in range(10)
    ]
    for it in items:
        await store.put(it, RAW)
    newest_first = [it.id for it in reversed(items)]
    assert [i.id for i in await store.list()] == newest_first
    assert [i.id for i in await store.list(limit=3, offset=3)] == newest_first[3:6]
    assert {i.id for i in await store.list(mail_from="S1@B.TEST")} == {
        it.id for it in items if it.mail_from == "s1@b.test"
    }
    assert {i.id for i in await store.list(rcpt="R2@example.org")} == {
        it.id for it in items if "r2@example.org" in it.rcpt_tos
    }
    assert len(await store.list(rcpt="all@example.org", mail_from="s0@b.test")) == 5
    with pytest.raises(ValueError):
        await store.list(limit=0)
    await store.close()


async def test_delete_removes_file_and_row_and_reports_unknown_ids(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    it = item()
    await store.put(it, RAW)
    assert await store.delete(it.id) is True
    assert await store.get(it.id) is None
    assert await store.delete(it.id) is False
    assert not (tmp_path / "messages" / f"{it.id}.eml").exists()
    assert await store.delete("../../etc/passwd") is False
    assert await store.get("../../etc/passwd") is None
    await store.close()


async def test_purge_removes_only_messages_past_retention(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    old = item(received_at=datetime.now(UTC) - timedelta(days=40))
    new = item()
    await store.put(old, RAW)
    await store.put(new, RAW)
    assert await store.purge(retention_cutoff(QuarantineConfig(retention_days=30))) == 1
    assert [i.id for i in await store.list()] == [new.id]
    await store.close()


async def test_purge_skips_a_message_claimed_by_a_release_and_takes_it_once_given_back(
    tmp_path: Path,
) -> None:
    """A release that fails gives its claim back and must find the message still there."""
    store = LocalQuarantine(tmp_path)
    old = [item(received_at=datetime.now(UTC) - timedelta(days=40)) for _ in range(3)]
    for it in old:
        await store.put(it, RAW)
    releasing = old[0]
    assert await store.claim(releasing.id)
    cutoff = retention_cutoff(QuarantineConfig(retention_days=30))
    assert await store.purge(cutoff) == 2
    assert await store.get(releasing.id) is not None
    await store.unclaim(releasing.id)  # the release failed
    assert await store.purge(cutoff) == 1
    assert await store.count() == 0
    await store.close()


async def test_purge_works_in_batches_oldest_first_and_processes_purging_together_count_once(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    a, b = LocalQuarantine(tmp_path), LocalQuarantine(tmp_path)  # two processes, one store
    old = [item(received_at=now - timedelta(days=60 - i)) for i in range(20)]
    for it in old:
        await a.put(it, RAW)
    cutoff = now - timedelta(days=30)
    assert await a.purge(cutoff, limit=3) == 3
    assert {i.id for i in await a.list(limit=100)} == {it.id for it in old[3:]}
    counts = await asyncio.gather(*(s.purge(cutoff, limit=4) for s in (a, b, a, b, a, b)))
    assert sum(counts) == 17 and await b.count() == 0
    assert await b.purge(cutoff) == 0
    await a.close()
    await b.close()


async def test_purge_of_a_quarantine_never_written_creates_nothing(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path / "q")
    assert await store.purge(datetime.now(UTC)) == 0
    assert not (tmp_path / "q").exists()
    await store.close()


async def test_open_repairs_orphan_file_dangling_row_and_stale_temp_file(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    kept, lost_file = item(), item()
    await store.put(kept, RAW)
    await store.put(lost_file, RAW)
    await store.close()
    messages = tmp_path / "messages"
    (messages / f"{lost_file.id}.eml").unlink()  # row without file
    orphan_id = new_id()
    orphan = messages / f"{orphan_id}.eml"  # file without row (crash before commit)
    orphan.write_bytes(RAW)
    stale = messages / f".tmp-{new_id()}"  # crash before rename
    stale.write_bytes(b"partial")
    young_id = new_id()
    young = messages / f"{young_id}.eml"  # maybe another process's put in progress
    young.write_bytes(RAW)
    old = time.time() - 3600
    for p in (orphan, stale):
        os.utime(p, (old, old))

    reopened = LocalQuarantine(tmp_path)
    assert [i.id for i in await reopened.list()] == [kept.id]
    assert (tmp_path / "orphans" / f"{orphan_id}.eml").read_bytes() == RAW
    assert not stale.exists()
    assert young.exists()
    await reopened.close()


async def test_unwritable_location_raises_quarantine_error_with_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_quarantine(QuarantineConfig(path=str(blocker / "q")), tmp_path)
    with pytest.raises(QuarantineError, match="writable"):
        await store.put(item(), RAW)
    await store.close()


def test_disk_full_raises_quarantine_error_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes fail with EFBIG, like ENOSPC, without root or a small disk."""
    script = textwrap.dedent(
        f"""
        import asyncio, resource, signal
        from pathlib import Path
        from gateway.quarantine import LocalQuarantine, QuarantineError
        from tests.unit.test_quarantine_local import item
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        async def main():
            store = LocalQuarantine(Path({str(tmp_path)!r}))
            await asyncio.to_thread(store._open_sync)  # create the index before the limit
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
            try:
                await store.put(item(), b"x" * 1_000_000)
            except QuarantineError as exc:
                print("QuarantineError", exc)
            print("count", await store.count())
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert "QuarantineError" in out.stdout, out.stderr
    assert "count 0" in out.stdout
    assert list((tmp_path / "messages").iterdir()) == []


def test_sigkill_during_puts_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """Every put() that returned survives a SIGKILL; files and index agree after reopening."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from gateway.quarantine import LocalQuarantine
        from tests.unit.test_quarantine_local import item
        async def main():
            store = LocalQuarantine(Path({str(tmp_path)!r}))
            i = 0
            while True:
                it = item()
                await store.put(it, b"msg %d\\r\\n" % i * 100)
                print(it.id, i, flush=True)
                i += 1
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout is not None
    acked: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(acked) < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        qid, n = line.split()
        acked[qid] = int(n)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert len(acked) >= 40

    async def check() -> None:
        store = LocalQuarantine(tmp_path)
        for qid, n in acked.items():
            got = await store.get(qid)
            assert got is not None, qid
            assert got[1] == b"msg %d\r\n" % n * 100
        listed = {i.id for i in await store.list(limit=100_000)}
        files = {p.name[:-4] for p in (tmp_path / "messages").glob("*.eml")}
        assert set(acked) <= listed
        # a file of the put in flight at the kill may stay for the grace period; rows never dangle
        assert listed <= files
        await store.close()

    asyncio.run(check())


async def test_index_uses_wal_with_full_synchronous_commits(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    await asyncio.to_thread(store._open_sync)
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store._db is not None
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    await store.close()


async def test_a_large_put_does_not_block_the_event_loop(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    await asyncio.to_thread(store._open_sync)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await store.put(item(), os.urandom(1024) * 30_000)  # ~30 MB written and fsync'd
    task.cancel()
    assert gaps and max(gaps) < 0.25
    await store.close()


def test_new_quarantine_item_puts_the_reason_first_then_symbol_scores() -> None:
    verdict = Verdict(
        action=Action.QUARANTINE,
        score=Decimal("12.00"),
        required=Decimal("5.00"),
        symbols=(
            ScoredSymbol("BAYES_SPAM", Decimal("9.00"), "bayes", "p=0.99", "likely spam"),
            ScoredSymbol("SPF_FAIL", Decimal("3.00"), "spf", "", "spf failed"),
        ),
        reason="spam score 12.00 (BAYES_SPAM, SPF_FAIL)",
        forced_by=None,
        auth=(),
    )
    env = Envelope("192.0.2.1", "helo.test", "a@b.test", ("c@example.org", "d@example.org"), "QX")
    ev = Evaluation(env, verdict, PipelineRun(()), ("X-Spam-Flag: YES",))
    it = new_quarantine_item(ev, 1234)
    assert it.reasons == (
        "spam score 12.00 (BAYES_SPAM, SPF_FAIL)",
        "BAYES_SPAM=9.00",
        "SPF_FAIL=3.00",
    )
    assert it.rcpt_tos == ("c@example.org", "d@example.org")
    assert it.size == 1234 and it.score == 12.0 and it.action == "quarantine"
    assert it.headers == ("X-Spam-Flag: YES",)
    assert it.queue_id == "QX" and it.received_at.tzinfo is not None


async def test_many_concurrent_puts_on_a_fresh_store_all_land(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path)
    items = [item(rcpts=(f"r{i}@example.org",)) for i in range(30)]
    await asyncio.gather(*(store.put(it, RAW + b"%d" % i) for i, it in enumerate(items)))
    assert await store.count() == 30
    for i, it in enumerate(items):
        got = await store.get(it.id)
        assert got is not None and got[1] == RAW + b"%d" % i
    await store.close()


async def test_a_claim_reserves_a_message_for_one_release_until_given_back_or_lapsed(
    tmp_path: Path,
) -> None:
    store = LocalQuarantine(tmp_path)
    it = item()
    await store.put(it, RAW)
    assert await store.claim(it.id) is True
    assert await store.claim(it.id) is False  # a second release must wait
    await store.unclaim(it.id)
    assert await store.claim(it.id, seconds=0.05) is True
    await asyncio.sleep(0.1)
    assert await store.claim(it.id) is True  # the first holder crashed: the claim lapsed
    assert await store.claim(new_id()) is False  # unknown id
    await store.close()


async def test_an_index_from_before_claims_is_upgraded_in_place(tmp_path: Path) -> None:
    from gateway.quarantine import _LOCAL_SCHEMA  # the first version's tables, no claims

    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.executescript(_LOCAL_SCHEMA)
    db.close()
    assert "claimed_until" not in _LOCAL_SCHEMA
    store = LocalQuarantine(tmp_path)
    it = item()
    await store.put(it, RAW)
    assert await store.claim(it.id) is True
    await store.close()


async def test_reading_an_empty_location_creates_nothing(tmp_path: Path) -> None:
    store = LocalQuarantine(tmp_path / "never-used")
    assert await store.list() == []
    assert await store.count() == 0
    assert await store.get(new_id()) is None
    assert await store.delete(new_id()) is False
    assert await store.purge(datetime.now(UTC)) == 0
    assert not (tmp_path / "never-used").exists()
    await store.close()
