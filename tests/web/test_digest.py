"""Digests and the recipient pages their links open, over HTTP on both quarantine backends."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import re
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest

from gateway.__main__ import main
from gateway.config import Config
from gateway.quarantine import LocalQuarantine, QuarantineStore
from gateway.testing.harness import write_config
from gateway.testing.quarantine import held_item
from gateway.testing.sink import SinkServer
from gateway.testing.web import ServedWeb, served_web, web_overrides
from gateway.web.digest import collect, render, send_digests
from gateway.web.digest_schedule import DigestSchedule, next_due
from gateway.web.links import sign

RAW = b"From: Shop <promo@shop.test>\r\nSubject: deals\r\n\r\nbuy now\r\n"


def linked(web: ServedWeb) -> Config:
    """The served config with ``web.base_url`` pointing at the served port."""
    config = web.ctx.config()
    return dataclasses.replace(config, web=dataclasses.replace(config.web, base_url=web.url("")))


async def put(store: QuarantineStore, **fields: object) -> str:
    item = held_item(len(RAW), **fields)
    await store.put(item, RAW)
    return item.id


def links_of(mail: bytes) -> dict[str, list[str]]:
    msg = email.message_from_bytes(mail, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    found: dict[str, list[str]] = {"release": [], "delete": []}
    for action, url in re.findall(r"(Release|Delete): +(\S+)", text.get_content()):
        found[action.lower()].append(url)
    for url in re.findall(r'class="release" href="([^"]+)"', html.get_content()):
        assert url.replace("&amp;", "&") in found["release"]  # both parts carry the same links
    return found


async def test_a_digest_per_recipient_lists_their_messages_escaped_with_signed_links(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    await put(store, rcpt_tos=("Ann@example.org", "bob@example.org"), subject="<b>deals</b>")
    await put(store, rcpt_tos=("ann@example.org",), subject="second")
    old = datetime.now(UTC) - timedelta(days=3)
    await put(store, rcpt_tos=("carl@example.org",), received_at=old)
    digests, left_out = await collect(store, datetime.now(UTC) - timedelta(hours=24))
    assert left_out == 0
    assert [(d.rcpt.lower(), len(d.items)) for d in digests] == [
        ("ann@example.org", 2),
        ("bob@example.org", 1),
    ]
    async with served_web(store, sink, tmp_path) as web:
        mail = render(linked(web), digests[0], web.ctx.link_key)
    msg = email.message_from_bytes(mail, policy=email.policy.default)
    assert msg["Subject"].lower() == "quarantine digest: 2 messages held for ann@example.org"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert b"\r\n" in mail and b"\n" not in mail.replace(b"\r\n", b"")
    html = msg.get_body(("html",))
    assert html is not None and "&lt;b&gt;deals&lt;/b&gt;" in html.get_content()
    links = links_of(mail)
    assert len(links["release"]) == len(links["delete"]) == 2
    # A cap: the rest is counted, never silently left out.
    capped, _ = await collect(store, None, max_listed=1)
    assert [(len(d.items), d.more) for d in capped if d.rcpt.lower() == "ann@example.org"] == [
        (1, 1)
    ]
    few, left_out = await collect(store, None, max_recipients=1)
    assert len(few) == 1 and left_out == 2


async def test_a_recipient_releases_through_the_link_once_and_only_their_copy(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    ident = await put(store, rcpt_tos=("ann@example.org", "bob@example.org"))
    async with served_web(store, sink, tmp_path) as web:
        run = await send_digests(linked(web), store, web.ctx.link_key, since=None, send=True)
        assert (run.sent, run.failed) == (2, 0)
        digests = {m.rcpt_tos[0]: m for m in sink.wait_for(2)}
        assert digests["ann@example.org"].mail_from == "postmaster@example.org"
        [release] = links_of(digests["ann@example.org"].data)["release"]
        sink.clear()
        async with aiohttp.ClientSession() as http:  # no login, no token
            async with http.get(release) as r:  # the confirm page: nothing happens yet
                page = await r.text()
                assert r.status == 200 and "Release to my inbox" in page
            assert sink.messages == [] and await store.get(ident) is not None
            async with http.post(release) as r:
                assert r.status == 200 and "on its way to ann@example.org" in await r.text()
            [got] = sink.wait_for(1)
            assert got.rcpt_tos == ("ann@example.org",) and got.data.endswith(RAW)
            held = await store.get(ident)
            assert held is not None and held[0].rcpt_tos == ("bob@example.org",)
            for method in (http.get, http.post):  # single use: a replay is told so
                async with method(release) as r:
                    assert r.status == 410 and "already released at" in await r.text()
            assert len(sink.messages) == 1


async def test_delete_drops_the_recipients_copy_and_bad_links_get_a_clear_page(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    ident = await put(store, rcpt_tos=("ann@example.org", "bob@example.org"))
    async with served_web(store, sink, tmp_path) as web, aiohttp.ClientSession() as http:
        key = web.ctx.link_key
        far = int(datetime.now(UTC).timestamp()) + 3600
        delete = web.url("/r/" + sign(key, "delete", ident, "ann@example.org", far))
        async with http.post(delete) as r:
            assert r.status == 200 and "deleted for ann@example.org" in await r.text()
        held = await store.get(ident)
        assert held is not None and held[0].rcpt_tos == ("bob@example.org",)
        good = sign(key, "release", ident, "bob@example.org", far)
        _, mac = good.split(".")
        tampered = sign(key, "release", ident, "eve@example.org", far).split(".")[0] + "." + mac
        cases = {
            tampered: (403, "damaged or was not issued"),  # another recipient, same MAC
            sign(b"x" * 32, "release", ident, "bob@example.org", far): (403, "not issued"),
            sign(key, "release", ident, "bob@example.org", far - 7200): (410, "expired"),
            sign(key, "release", ident, "ann@example.org", far): (410, "already deleted at"),
            "not-a-link": (403, "damaged"),
            good[:-1] + chr(ord(good[-1]) ^ 1): (403, "damaged"),  # padding bits only
            "a" * 5000: (403, "damaged"),
        }
        for token, (status, said) in cases.items():
            for method in (http.get, http.post):
                async with method(web.url("/r/" + token)) as r:
                    text = await r.text()
                    assert r.status == status and said in text, (token[:40], r.status, text)
                    assert "This link cannot be used" in text
        assert sink.messages == []
        held = await store.get(ident)
        assert held is not None and held[0].rcpt_tos == ("bob@example.org",)


async def test_the_schedule_sends_each_day_once_across_nodes(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    assert next_due(datetime(2026, 12, 7, 5, 0, tzinfo=UTC), "06:30") == datetime(
        2026, 12, 7, 6, 30, tzinfo=UTC
    )
    assert next_due(datetime(2026, 12, 7, 6, 30, tzinfo=UTC), "06:30") == datetime(
        2026, 12, 8, 6, 30, tzinfo=UTC
    )
    await put(store, rcpt_tos=("ann@example.org",))
    async with served_web(store, sink, tmp_path) as web:
        config = linked(web)
        nodes = [DigestSchedule(store, lambda: config) for _ in range(2)]
        first = await nodes[0].run_once(date(2026, 12, 7))
        assert first is not None and first.sent == 1
        assert await nodes[1].run_once(date(2026, 12, 7)) is None  # the other node sent it
        assert await nodes[0].run_once(date(2026, 12, 7)) is None  # a restart: not twice
        assert len(sink.wait_for(1)) == 1


def test_the_cli_dry_run_prints_the_digests_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = {
        "web.base_url": "https://quarantine.example.org",
        "quarantine.path": str(tmp_path / "q"),
    }
    path = write_config(web_overrides(None, overrides), tmp_path)
    store = LocalQuarantine(tmp_path / "q")
    asyncio.run(put(store, rcpt_tos=("ann@example.org",), subject="held one"))
    assert main(["quarantine", "digest", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "--- digest for ann@example.org" in out
    assert "1 digests built (dry run: nothing sent; --send sends)" in out
    assert "https://quarantine.example.org/r/" in out
    assert main(["quarantine", "digest", "--config", str(path), "--since", "0"]) == 2
    assert "--since must be hours > 0" in capsys.readouterr().err
