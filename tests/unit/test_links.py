"""Signed recipient links: tampered, expired, replayed and other-recipient links act on nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.config import WebConfig
from gateway.quarantine import LocalQuarantine
from gateway.testing.quarantine import held_item
from gateway.web import links
from gateway.web.links import LinkExpired, LinkGone, LinkKeyError, LinkTampered

KEY = b"k" * 32
RAW = b"Subject: hi\r\n\r\nbody\r\n"


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    q = LocalQuarantine(tmp_path / "q")
    yield q
    await q.close()


def test_round_trip_binds_action_message_recipient_and_expiry() -> None:
    token = links.sign(KEY, "release", "0123456789abcdef", "Bob+x|y@example.org", 2_000_000_000)
    link = links.verify(KEY, token, now=1_000_000_000)
    assert (link.action, link.id, link.rcpt, link.expires) == (
        "release",
        "0123456789abcdef",
        "Bob+x|y@example.org",
        2_000_000_000,
    )


def test_tampered_links_are_refused() -> None:
    token = links.sign(KEY, "release", "0123456789abcdef", "bob@example.org", 2_000_000_000)
    body, mac = token.split(".")
    # the action switched (delete -> release) keeps the MAC of the other: refused
    other = links.sign(KEY, "delete", "0123456789abcdef", "bob@example.org", 2_000_000_000)
    forged = [
        f"{other.split('.')[0]}.{mac}",
        f"{body}.{mac[:-2]}AA",
        f"{body[:-1]}{'A' if body[-1] != 'A' else 'B'}.{mac}",
        token[:-5],
        "garbage",
        "a.b.c",
        f"{body}.!!!",
        "x" * 5000,
    ]
    for bad in forged:
        with pytest.raises(LinkTampered):
            links.verify(KEY, bad, now=1_000_000_000)
    with pytest.raises(LinkTampered):  # another gateway's key
        links.verify(b"o" * 32, token, now=1_000_000_000)


def test_expired_links_are_refused() -> None:
    token = links.sign(KEY, "delete", "0123456789abcdef", "bob@example.org", 1_000)
    with pytest.raises(LinkExpired) as err:
        links.verify(KEY, token, now=1_000)
    assert err.value.status == 410


async def test_other_recipients_message_is_refused(store: LocalQuarantine) -> None:
    item = held_item(len(RAW), rcpt_tos=("alice@example.org",))
    await store.put(item, RAW)
    link = links.verify(KEY, links.sign(KEY, "release", item.id, "mallory@example.org", 2**40))
    with pytest.raises(LinkGone):
        await links.authorize(store, link)
    ok = links.verify(KEY, links.sign(KEY, "release", item.id, "ALICE@example.org", 2**40))
    got, raw = await links.authorize(store, ok)
    assert got.id == item.id and raw == RAW


async def test_replayed_link_is_refused_and_named_used(store: LocalQuarantine) -> None:
    item = held_item(len(RAW), rcpt_tos=("alice@example.org", "bob@example.org"))
    await store.put(item, RAW)
    link = links.verify(KEY, links.sign(KEY, "delete", item.id, "alice@example.org", 2**40))
    await links.authorize(store, link)
    # what the delete page does for alice: her copy goes, bob's stays
    assert await store.drop_recipients(item.id, ["alice@example.org"]) == ("bob@example.org",)
    await links.mark_used(store, link, "deleted")
    with pytest.raises(LinkGone) as err:
        await links.authorize(store, link)
    assert err.value.used == "deleted"
    bob = links.verify(KEY, links.sign(KEY, "delete", item.id, "bob@example.org", 2**40))
    await links.authorize(store, bob)


async def test_key_in_the_quarantine_is_shared_and_stable(store: LocalQuarantine) -> None:
    a = await links.link_key(WebConfig(), Path("/"), store)
    assert len(a) == 32 and await links.link_key(WebConfig(), Path("/"), store) == a


async def test_key_file_created_private_and_checked(tmp_path: Path, store: LocalQuarantine) -> None:
    config = WebConfig(link_key_file="link.key")
    key = await links.link_key(config, tmp_path, store)
    path = tmp_path / "link.key"
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert await links.link_key(config, tmp_path, store) == key
    os.chmod(path, 0o644)
    with pytest.raises(LinkKeyError, match="chmod 600"):
        await links.link_key(config, tmp_path, store)
    path.write_text("abcd\n")
    os.chmod(path, 0o600)
    with pytest.raises(LinkKeyError, match="at least 32"):
        await links.link_key(config, tmp_path, store)


def test_expiry_is_in_the_future_of_signing() -> None:
    token = links.sign(KEY, "release", "0123456789abcdef", "a@b.test", int(time.time()) + 60)
    assert links.verify(KEY, token).action == "release"
