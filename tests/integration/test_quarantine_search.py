"""The quarantine's search, recipient removal and shared settings, on both backends alike.

Every test runs against the local store (files + SQLite) and PostgreSQL (a
throwaway schema on the machine's server): the web UI and API rely on the two
behaving the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.quarantine import (
    HeldSymbol,
    LocalQuarantine,
    PostgresQuarantine,
    QuarantineFilter,
    QuarantineItem,
    QuarantineStore,
)
from gateway.testing.postgres import throwaway_schema
from gateway.testing.quarantine import held_item

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["local", "postgresql"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A callable opening another handle (process, node) on one quarantine."""
    if request.param == "local":
        yield lambda: LocalQuarantine(tmp_path / "q")
    else:
        with throwaway_schema() as dsn:
            yield lambda: PostgresQuarantine(dsn)


@pytest.fixture
async def store(store_factory: object) -> AsyncIterator[QuarantineStore]:
    s: QuarantineStore = store_factory()  # type: ignore[operator]
    yield s
    await s.close()


def raw(subject: str, sender: str = "Alice <alice@b.test>") -> bytes:
    return f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def held(minutes: int, **fields: object) -> QuarantineItem:
    return held_item(30, received_at=T0 + timedelta(minutes=minutes), **fields)


async def ids(store: QuarantineStore, f: QuarantineFilter, limit: int = 50) -> list[str]:
    return [i.id for i in (await store.search(f, limit=limit)).items]


async def test_each_filter_narrows_the_newest_first_listing(store: QuarantineStore) -> None:
    a = held(1, mail_from="Promo@Shop.test", rcpt_tos=("Bob@example.org",), score=10.5)
    b = held(2, rcpt_tos=("carol@example.org", "bob@example.org"), score=25.0)
    c = held(3, score=14.0, symbols=(HeldSymbol("BAYES_99", 5.0, "bayes", "0.9990"),))
    await store.put(a, raw("Cheap watches"))
    await store.put(b, raw("Your invoice 4711", "billing@vendor.test"))
    await store.put(c, raw("=?utf-8?q?Gr=C3=BC=C3=9Fe?= from the team"))

    assert await ids(store, QuarantineFilter()) == [c.id, b.id, a.id]
    assert await ids(store, QuarantineFilter(rcpt="BOB@example.org")) == [b.id, a.id]
    assert await ids(store, QuarantineFilter(sender="promo@shop.test")) == [a.id]
    assert await ids(store, QuarantineFilter(min_score=14.0)) == [c.id, b.id]
    assert await ids(store, QuarantineFilter(min_score=11, max_score=20)) == [c.id]
    assert await ids(store, QuarantineFilter(symbol="bayes_99")) == [c.id]
    assert await ids(store, QuarantineFilter(since=T0 + timedelta(minutes=2))) == [c.id, b.id]
    assert await ids(store, QuarantineFilter(until=T0 + timedelta(minutes=2))) == [a.id]
    # Words in the subject (RFC 2047 decoded), the From header or the sender, all of them.
    assert await ids(store, QuarantineFilter(text="invoice")) == [b.id]
    assert await ids(store, QuarantineFilter(text="INVOICE vendor")) == [b.id]
    assert await ids(store, QuarantineFilter(text="grüße")) == [c.id]
    assert await ids(store, QuarantineFilter(text="shop")) == [a.id]
    assert await ids(store, QuarantineFilter(text="invoice watches")) == []
    assert await ids(store, QuarantineFilter(rcpt="bob@example.org", min_score=20)) == [b.id]
    got = (await store.search(QuarantineFilter(text="grüße"))).items[0]
    assert got.subject == "Grüße from the team"
    assert got.header_from == "Alice <alice@b.test>"
    assert got.symbols == (HeldSymbol("BAYES_99", 5.0, "bayes", "0.9990"),)


async def test_search_text_is_data_never_sql_or_a_pattern(store: QuarantineStore) -> None:
    it = held(1)
    await store.put(it, raw("100% off_sale"))
    for text in ("'; DROP TABLE quarantine; --", "zz & yy | !xx", "off:* | zz", "sale') OR 1=1"):
        assert await ids(store, QuarantineFilter(text=text)) == [], text
    # Punctuation alone holds no word to search for: the listing is not narrowed.
    for text in ("%", "_", "\\", ":*", "&|!()"):
        assert await ids(store, QuarantineFilter(text=text)) == [it.id], text
    assert await ids(store, QuarantineFilter(symbol="X' OR '1'='1")) == []
    assert await ids(store, QuarantineFilter(text="off sale")) == [it.id]


async def test_keyset_pages_visit_every_message_once_even_with_equal_times(
    store: QuarantineStore,
) -> None:
    items = [held(i // 3) for i in range(23)]  # three messages per received_at
    for it in items:
        await store.put(it, raw("x"))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await store.search(QuarantineFilter(), limit=5, cursor=cursor)
        seen.extend(i.id for i in page.items)
        pages += 1
        if page.next is None:
            break
        cursor = page.next
    assert pages == 5
    expected = sorted(items, key=lambda i: (i.received_at, i.id), reverse=True)
    assert seen == [i.id for i in expected]
    last = await store.search(QuarantineFilter(), limit=23)
    assert last.next is None and len(last.items) == 23


async def test_a_malformed_cursor_is_a_value_error(store: QuarantineStore) -> None:
    await store.put(held(1), raw("x"))
    for bad in ("", "not-base64!", "Zm9v", "MjAyNnwxMjM0"):
        with pytest.raises(ValueError, match="cursor"):
            await store.search(QuarantineFilter(), cursor=bad)


async def test_dropping_recipients_keeps_the_message_for_the_others(
    store: QuarantineStore,
) -> None:
    it = held(1, rcpt_tos=("A@example.org", "b@example.org", "c@example.org"))
    await store.put(it, raw("x"))
    assert await store.drop_recipients(it.id, ["a@EXAMPLE.org"]) == (
        "b@example.org",
        "c@example.org",
    )
    assert await ids(store, QuarantineFilter(rcpt="a@example.org")) == []
    assert await ids(store, QuarantineFilter(rcpt="b@example.org")) == [it.id]
    got = await store.get(it.id)
    assert got is not None and got[0].rcpt_tos == ("b@example.org", "c@example.org")
    assert await store.drop_recipients(it.id, ["nobody@example.org"]) == (
        "b@example.org",
        "c@example.org",
    )
    assert await store.drop_recipients(it.id, ["b@example.org", "c@example.org"]) == ()
    assert await store.get(it.id) is None
    assert await store.drop_recipients(it.id, ["b@example.org"]) is None
    assert await store.count() == 0


async def test_a_setting_is_created_once_and_shared(store_factory: object) -> None:
    stores: list[QuarantineStore] = [store_factory() for _ in range(4)]  # type: ignore[operator]
    try:
        values = await asyncio.gather(
            *(s.setting("link_key", bytes([n]) * 32) for n, s in enumerate(stores))
        )
        assert len(set(values)) == 1 and len(values[0]) == 32
        assert await stores[0].setting("link_key", b"other") == values[0]
        assert await stores[1].setting("digest:2026-03-01", b"node-b") == b"node-b"
        with pytest.raises(ValueError):
            await stores[0].setting("bad name; --", b"x")
    finally:
        for s in stores:
            await s.close()


async def test_a_word_search_past_its_plan_budget_runs_again_on_the_word_index(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The planner's plan gets ``_WORD_PLAN_BUDGET``; then the GIN-only plan answers.

    A lock held by another session makes the first attempt overrun its budget
    deterministically; the second attempt waits for the lock and answers.
    """
    import psycopg

    from gateway import quarantine

    with throwaway_schema() as dsn:
        store = PostgresQuarantine(dsn)
        try:
            await store.put(held(1, subject="invoice march"), raw("invoice march"))
            await store.put(held(2, subject="other"), raw("other"))
            monkeypatch.setattr(quarantine, "_WORD_PLAN_BUDGET", 100)
            caplog.set_level("INFO", logger="gateway.quarantine")
            async with await psycopg.AsyncConnection.connect(dsn) as locker:
                await locker.execute("LOCK TABLE quarantine IN ACCESS EXCLUSIVE MODE")
                search = asyncio.create_task(
                    store.search(QuarantineFilter(text="invoice"), limit=10)
                )
                await asyncio.sleep(0.5)  # past the budget: the first attempt was cancelled
                assert not search.done()
                await locker.rollback()  # lets the second attempt through
            page = await asyncio.wait_for(search, 10)
            assert [i.subject for i in page.items] == ["invoice march"]
            assert "quarantine_search_replanned" in caplog.messages
        finally:
            await store.close()
