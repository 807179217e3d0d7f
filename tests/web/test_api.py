"""The REST API over HTTP on loopback, on the local and the PostgreSQL quarantine."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from gateway.quarantine import HeldSymbol, QuarantineStore
from gateway.testing.quarantine import held_item
from gateway.testing.sink import SinkServer
from gateway.testing.web import ServedWeb

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RAW = (
    b"From: Mallory <mallory@evil.test>\r\nTo: bob@example.org\r\n"
    b"Subject: <script>alert(1)</script> cheap\r\nContent-Type: text/html\r\n\r\n"
    b"<p>Buy <b>now</b><script>steal()</script></p>\r\n"
)
API = "/api/v1/quarantine"


async def put(store: QuarantineStore, minutes: int = 0, **fields: object) -> str:
    item = held_item(
        len(RAW),
        received_at=T0 + timedelta(minutes=minutes),
        symbols=(HeldSymbol("BAYES_99", 5.0, "bayes", "0.9990"), HeldSymbol("X", 7.0)),
        **fields,
    )
    await store.put(item, RAW)
    return item.id


async def test_no_or_bad_token_is_401_and_a_good_one_lists(
    web: ServedWeb, store: QuarantineStore
) -> None:
    ident = await put(store)
    for token in (None, "wrong-token"):
        async with web.client(token) as http, http.get(web.url(API)) as r:
            assert r.status == 401
            assert "error" in await r.json()
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with web.client() as http, http.get(web.url(API)) as r:
        assert r.status == 200
        body = await r.json()
    assert body["next"] is None
    [item] = body["items"]
    assert item["id"] == ident
    for key in ("received_at", "mail_from", "rcpt_tos", "size", "score", "reasons"):
        assert key in item


async def test_filters_and_keyset_paging(web: ServedWeb, store: QuarantineStore) -> None:
    a = await put(store, 1, mail_from="promo@shop.test", score=8.0)
    b = await put(store, 2, rcpt_tos=("carol@example.org",), score=20.0)
    c = await put(store, 3, score=30.0)
    async with web.client() as http:

        async def ids(query: str) -> list[str]:
            async with http.get(web.url(f"{API}?{query}")) as r:
                assert r.status == 200, await r.text()
                return [i["id"] for i in (await r.json())["items"]]

        assert await ids("") == [c, b, a]
        assert await ids("rcpt=CAROL@example.org") == [b]
        assert await ids("sender=promo@shop.test") == [a]
        assert await ids("min_score=15") == [c, b]
        assert await ids("min_score=15&max_score=25") == [b]
        assert await ids("q=cheap") == [c, b, a]  # the subject's words
        assert await ids("symbol=BAYES_99") == [c, b, a]
        assert await ids("since=2026-03-01T12:02:00Z") == [c, b]
        assert await ids("until=2026-03-01T12:02:00Z") == [a]
        seen: list[str] = []
        query = "limit=2"
        while True:
            async with http.get(web.url(f"{API}?{query}")) as r:
                page = await r.json()
            seen += [i["id"] for i in page["items"]]
            if page["next"] is None:
                break
            query = f"limit=2&cursor={page['next']}"
        assert seen == [c, b, a]
        for bad in ("min_score=lots", "limit=0", "limit=9999", "since=yesterday", "cursor=@@"):
            async with http.get(web.url(f"{API}?{bad}")) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]


async def test_show_explains_with_symbols_headers_and_a_text_preview(
    web: ServedWeb, store: QuarantineStore
) -> None:
    ident = await put(store)
    async with web.client() as http:
        async with http.get(web.url(f"{API}/{ident}")) as r:
            assert r.status == 200
            body = await r.json()
        assert {"name": "BAYES_99", "score": 5.0, "policy": "bayes", "detail": "0.9990"} in body[
            "symbols"
        ]
        assert {"name": "Subject", "value": "<script>alert(1)</script> cheap"} in body["headers"]
        assert body["text"] == "Buy now"  # HTML rendered to text; the script is gone
        async with http.get(web.url(f"{API}/{ident}/raw")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/octet-stream"
            assert await r.read() == RAW
        for path in (f"{API}/0123456789abcdef", f"{API}/not-an-id", f"{API}/0123456789abcdef/raw"):
            async with http.get(web.url(path)) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]


async def test_release_relays_once_and_removes_the_message(
    web: ServedWeb, store: QuarantineStore, sink: SinkServer
) -> None:
    ident = await put(store, rcpt_tos=("bob@example.org", "carol@example.org"))
    async with web.client() as http:
        url = web.url(f"{API}/{ident}/release")
        async with http.post(url, json={"rcpt_tos": ["mallory@example.org"]}) as r:
            assert r.status == 400
        async with http.post(url, json={"rcpt_tos": ["BOB@example.org"]}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert body["accepted"] == ["bob@example.org"]
        assert body["remaining"] == ["carol@example.org"]
        [got] = sink.wait_for(1)
        assert got.rcpt_tos == ("bob@example.org",)
        assert got.data.endswith(RAW) and got.data.startswith(b"X-Spam-Flag: YES\r\n")
        # Two releases at once (two admins, two nodes): one delivery.
        answers = await asyncio.gather(*(http.post(url) for _ in range(2)))
        statuses = sorted(a.status for a in answers)
        for a in answers:
            a.release()
        assert statuses[0] == 200 and statuses[1] in (404, 409)
        assert len(sink.wait_for(2)) == 2
        async with http.post(url) as r:
            assert r.status == 404
    assert await store.get(ident) is None


async def test_release_failure_keeps_the_message(
    web: ServedWeb, store: QuarantineStore, sink: SinkServer
) -> None:
    ident = await put(store)
    sink.data_reply = "451 4.3.0 try later"
    async with web.client() as http, http.post(web.url(f"{API}/{ident}/release")) as r:
        assert r.status == 502
        assert "451" in (await r.json())["error"]
    assert await store.get(ident) is not None
    assert await store.claim(ident, 1.0)  # the failed release gave its claim back


async def test_delete_and_delete_as_spam(web: ServedWeb, store: QuarantineStore) -> None:
    a, b = await put(store), await put(store)
    async with web.client() as http:
        async with http.post(web.url(f"{API}/{a}/delete")) as r:
            assert r.status == 200
            assert (await r.json())["deleted"] is True
        async with http.post(web.url(f"{API}/{b}/delete"), json={"as_spam": "yes"}) as r:
            assert r.status == 400
        async with http.post(web.url(f"{API}/{b}/delete"), json={"as_spam": True}) as r:
            assert r.status == 200
            assert (await r.json())["learned"] is False  # no classifier in this app
        async with http.post(web.url(f"{API}/{a}/delete")) as r:
            assert r.status == 404
    assert await store.count() == 0
