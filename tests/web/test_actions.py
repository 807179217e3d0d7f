"""Decisions that teach the classifier and write the lists policy's files, through the API."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from gateway.quarantine import QuarantineStore
from gateway.testing.quarantine import held_item
from gateway.testing.sink import SinkServer
from gateway.testing.web import served_web
from policies.lists import parse_list

RAW = b"From: Promo Team <Promo@Shop.test>\r\nSubject: deals\r\n\r\nbuy\r\n"
API = "/api/v1/quarantine"


class RecordingLearner:
    """Stands in for the bayes policy's ``learn`` (the state store is not under test here)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], bool]] = []

    async def learn(self, messages: Iterable[bytes], spam: bool) -> int:
        batch = list(messages)
        self.calls.append((batch, spam))
        return len(batch)


async def put(store: QuarantineStore, **fields: object) -> str:
    item = held_item(len(RAW), mail_from="bounce@shop.test", **fields)
    await store.put(item, RAW)
    return item.id


async def test_release_teaches_ham_and_delete_as_spam_teaches_spam_once_per_message(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    learner = RecordingLearner()
    a = await put(store)
    b = await put(store, rcpt_tos=("x@example.org", "y@example.org"))
    async with served_web(store, sink, tmp_path, learner=learner) as web, web.client() as http:
        async with http.post(web.url(f"{API}/{a}/release")) as r:
            assert r.status == 200
        # b: released to one recipient (ham), then deleted as spam for the other: learned once.
        async with http.post(web.url(f"{API}/{b}/release"), json={"rcpt_tos": ["x@example.org"]}):
            pass
        async with http.post(web.url(f"{API}/{b}/delete"), json={"as_spam": True}) as r:
            assert (await r.json())["learned"] is False
    assert learner.calls == [([RAW], False), ([RAW], False)]
    c = await put(store)
    async with (
        served_web(store, sink, tmp_path, learner=learner) as web,
        web.client() as http,
        http.post(web.url(f"{API}/{c}/delete"), json={"as_spam": True}) as r,
    ):
        assert (await r.json())["learned"] is True
    assert learner.calls[-1] == ([RAW], True)


async def test_learn_on_release_false_teaches_nothing(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    learner = RecordingLearner()
    a, b = await put(store), await put(store)
    off = {"quarantine.learn_on_release": False}
    async with served_web(store, sink, tmp_path, off, learner) as web, web.client() as http:
        async with http.post(web.url(f"{API}/{a}/release")) as r:
            assert r.status == 200
        async with http.post(web.url(f"{API}/{b}/delete"), json={"as_spam": True}) as r:
            assert r.status == 200
    assert learner.calls == []


async def test_release_and_allow_delete_and_block_write_the_lists_files_and_reload(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    (tmp_path / "allow.txt").write_text("# people we trust\n")
    lists = {
        "policies.lists.lists": [
            {"file": "allow.txt", "symbol": "ALLOWLIST_SENDER", "score": -100.0},
            {"file": "block.txt", "symbol": "BLOCKLIST_SENDER", "score": 100.0},
        ]
    }
    a, b, c = await put(store), await put(store), await put(store)
    async with served_web(store, sink, tmp_path, lists) as web, web.client() as http:
        async with http.post(web.url(f"{API}/{a}/release"), json={"allow_sender": True}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["listed"] == "promo@shop.test"  # the From header's address
        async with http.post(web.url(f"{API}/{b}/release"), json={"allow_sender": True}) as r:
            assert r.status == 200
        async with http.post(web.url(f"{API}/{c}/delete"), json={"block_sender": True}) as r:
            assert (await r.json())["listed"] == "promo@shop.test"
        assert web.reloads == 2  # the second allow found the entry there already
    allow = (tmp_path / "allow.txt").read_text()
    assert allow.count("promo@shop.test") == 1 and allow.startswith("# people we trust\n")
    assert parse_list(allow, "allow").match_address("promo@shop.test") == "promo@shop.test"
    assert parse_list((tmp_path / "block.txt").read_text(), "block").addresses == {
        "promo@shop.test"
    }


async def test_allow_without_a_matching_list_says_how_to_add_one(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    a = await put(store)
    async with (
        served_web(store, sink, tmp_path) as web,
        web.client() as http,
        http.post(web.url(f"{API}/{a}/release"), json={"allow_sender": True}) as r,
    ):
        assert r.status == 409
        assert "[[policies.lists.lists]]" in (await r.json())["error"]
    assert len(sink.wait_for(1)) == 1  # the release itself happened
