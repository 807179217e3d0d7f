"""``gateway replay`` pieces: the envelope from trace fields, the message as received,
offline DNS and read-only state, and totals that stay bounded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.api import DNSTemporaryError
from gateway.config import config_from_mapping
from gateway.replay import (
    OfflineResolver,
    ReadOnlyState,
    ReplaySetup,
    Row,
    Summary,
    as_received,
    envelope_for,
)

CONFIG = config_from_mapping(
    {
        "server": {
            "listen": "127.0.0.1:0",
            "hostname": "mx.example.org",
            "accepted_domains": ["example.org"],
        }
    },
    Path("/tmp/x.toml"),
)

DELIVERED = (
    b"Return-Path: <alice@sender.test>\n"
    b"Delivered-To: bob@example.org\n"
    b"Received: from mx.example.org (localhost [127.0.0.1])\n\tby mail.example.org; x\n"
    b"X-Spam-Status: No, score=0.00\n"
    b"Authentication-Results: mx.example.org; spf=pass\n"
    b"Received: from mail.sender.test (mail.sender.test [192.0.2.7])\n"
    b"\tby mx.example.org (gateway) with ESMTP id Q1; Mon, 1 Jan 2024 00:00:00 +0000\n"
    b"Received: from laptop (laptop [10.0.0.5])\n\tby mail.sender.test; x\n"
    b"Authentication-Results: other.test; dkim=pass\n"
    b"From: alice@sender.test\nSubject: hi\n\nbody\n"
)


def test_the_envelope_comes_from_our_own_received_field_and_return_path() -> None:
    env = envelope_for(DELIVERED, CONFIG, ReplaySetup(config_a="x"), "Q")
    assert env.mail_from == "alice@sender.test"
    assert env.rcpt_to == ("bob@example.org",)
    assert (env.client_ip, env.helo) == ("192.0.2.7", "mail.sender.test")


def test_options_override_the_envelope_and_defaults_fill_it() -> None:
    setup = ReplaySetup(config_a="x", mail_from="", rcpt=("c@example.org",), ip="198.51.100.1")
    env = envelope_for(DELIVERED, CONFIG, setup, "Q")
    assert (env.mail_from, env.rcpt_to, env.client_ip) == ("", ("c@example.org",), "198.51.100.1")
    bare = envelope_for(b"Subject: x\n\nbody\n", CONFIG, ReplaySetup(config_a="x"), "Q")
    assert bare.rcpt_to == ("postmaster@example.org",) and bare.client_ip is None


def test_as_received_drops_what_the_gateway_and_later_hops_added() -> None:
    raw = as_received(DELIVERED, "mx.example.org")
    assert raw.startswith(b"Received: from laptop (laptop [10.0.0.5])\r\n")
    assert b"X-Spam-Status" not in raw and b"spf=pass" not in raw
    assert b"Authentication-Results: other.test; dkim=pass\r\n" in raw
    assert raw.endswith(b"\r\n\r\nbody\r\n")


def test_offline_dns_fails_every_lookup_the_same_way() -> None:
    with pytest.raises(DNSTemporaryError, match="skipped"):
        asyncio.run(OfflineResolver().query("example.com", "TXT"))


def test_read_only_state_reads_and_never_writes() -> None:
    class Store:
        writes = 0

        async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
            return {k: (1, 2) for k in keys}

        async def incr_many(self, *a: object) -> None:
            Store.writes += 1

        async def hit(self, *a: object, **k: object) -> int:
            Store.writes += 1
            return 99

        async def put_blobs(self, *a: object) -> None:
            Store.writes += 1

        async def get_blobs(self, table: str, keys: list[str]) -> dict[str, bytes]:
            return {k: b"model" for k in keys}

        async def blob_keys(self, table: str) -> list[str]:
            return ["m1"]

    state = ReadOnlyState(Store())  # type: ignore[arg-type]

    async def go() -> None:
        assert await state.get_many("bayes", ["a"]) == {"a": (1, 2)}
        await state.incr_many("bayes", {"a": (1, 0)})
        assert await state.hit("rl:ip:1", 60.0) == 1
        await state.put_blobs("bayes_msgs", {"m2": b"x"})
        assert await state.get_blobs("bayes_model", ["logistic"]) == {"logistic": b"model"}
        assert await state.blob_keys("bayes_msgs") == ["m1"]

    asyncio.run(go())
    assert Store.writes == 0


def test_totals_stay_bounded_however_many_messages_change() -> None:
    summary = Summary(against=True)
    for i in range(25_000):
        summary.add(Row(f"m{i}", "spam" if i % 2 else "", "relay", "reject", ("X",), ("X", "Y")))
    for i in range(2_000):
        summary.add(Row(f"bad{i}", error="not a mail message"))
    assert summary.changed_total == 25_000 and len(summary.changed) == 10_000
    assert summary.errors == 2_000 and len(summary.problems) == 1_000
    doc = summary.to_json("offline")
    assert doc["labels"]["spam"] == {
        "a": {"flagged": 0, "total": 12_500},
        "b": {"flagged": 12_500, "total": 12_500},
    }
    assert doc["symbol_changes"] == [{"symbol": "Y", "a": 0, "b": 25_000}]


def test_preload_loads_what_forked_workers_would_each_load_again() -> None:
    from gateway.engine import Engine
    from policies import _language

    config = config_from_mapping(
        {
            "server": {"hostname": "mx.example.org", "accepted_domains": ["example.org"]},
            "policies": {"heuristics": {"ok_languages": ["en"]}},
        },
        Path("gateway.toml"),
    )
    _language._model = None
    Engine.preload(Engine.make_plan(config))
    assert _language._model is not None  # in the parent, before replay forks


def test_start_up_does_not_import_the_doh_stack() -> None:
    """dnspython would import httpx2/h2 for DoH, which no resolver here uses (40 ms a start)."""
    code = "import sys, gateway.engine; print(sorted({'httpx2', 'h2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
