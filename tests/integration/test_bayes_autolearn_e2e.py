"""Bayes auto-learn end to end: a gateway started from the shipped config in this process,
mail sent over SMTP on loopback, the learned counts read back from the state store
after the gateway stopped (stopping drains the background learning).

A test rule file gives messages a known score: ``header-hit`` in the Subject
is a 6-point header symbol, ``body-hit`` in the body a 7-point body symbol, so
a message with both scores 13 (>= 12: spam, quarantined), one with the Subject
only 6 (between the thresholds), and plain mail 0 (< 0.1: ham). Only the
policies named here run (bayes, rules, and lists where a test adds it).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.config import StateConfig
from gateway.state import open_state
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import running_gateway
from gateway.testing.require import require_tool
from gateway.testing.services import ThrowawayRedis, free_port
from gateway.testing.sink import SinkServer
from gateway.testing.training import training_message
from policies.bayes import TOTALS_KEY

RULES = """
[[rule]]
name = "HDR_AUTOLEARN_TEST"
type = "header"
header = "Subject"
pattern = 'header-hit'
score = 6.0
description = "test header rule"

[[rule]]
name = "BODY_AUTOLEARN_TEST"
type = "body"
pattern = 'body-hit'
score = 7.0
description = "test body rule"
"""
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(n: int, subject: str, body: str) -> bytes:
    return (
        f"From: sender@deals.example\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jul 2024 10:00:00 +0000\r\nMessage-ID: <{n}@deals.example>\r\n\r\n"
        f"{body}\r\n"
    ).encode()


SPAM = message(1, "header-hit today", "body-hit now, casino bonus prize")
MIDDLE = message(2, "header-hit later", "an ordinary note")
HAM = training_message(False, 3, random.Random(3), domain="project.example")


def overrides(workdir: Path, sink: SinkServer, dns: DNSServer, **extra: Any) -> dict[str, Any]:
    (workdir / "rules.toml").write_text(RULES)
    return {
        "relay.host": sink.host,
        "relay.port": sink.port,
        "dns.nameservers": [dns.address],
        "dns.timeout": 2.0,
        "policies": {"bayes": {"autolearn": True}, "rules": {"files": ["rules.toml"]}},
        **extra,
    }


async def send(port: int, *messages: bytes) -> list[str]:
    replies = []
    for raw in messages:
        _, reply = await aiosmtplib.send(
            raw,
            sender="sender@deals.example",
            recipients=["bob@example.org"],
            hostname="127.0.0.1",
            port=port,
            start_tls=False,
            timeout=15,
        )
        replies.append(reply)
    return replies


async def learned(workdir: Path, config: StateConfig | None = None) -> tuple[int, int]:
    """(spam, ham) messages learned, from the store the gateway used."""
    store = open_state(config or StateConfig(path=str(workdir / "state.sqlite")), workdir)
    try:
        return (await store.get_many("bayes", [TOTALS_KEY])).get(TOTALS_KEY, (0, 0))
    finally:
        await store.close()


def autolearn(records: list[logging.LogRecord]) -> list[str | None]:
    return [getattr(r, "autolearn", None) for r in records]


async def test_high_scoring_mail_is_learned_as_spam_low_scoring_as_ham_the_middle_not_at_all(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.handoff"):
        async with running_gateway(overrides(tmp_path, sink, dns_server), workdir=tmp_path) as gw:
            await send(gw.smtp_port, SPAM, MIDDLE, HAM)  # each accepted (or it raises)
    assert len(sink.messages) == 2  # the spam went to quarantine (13 >= 10), safely
    # X-Spam-Status ends with the decision, as SpamAssassin's does
    middle, ham = (
        m.data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ") + b"\r\n" for m in sink.messages
    )
    assert b" autolearn=no\r\n" in middle and b" autolearn=ham\r\n" in ham
    records = [r for r in caplog.records if r.getMessage() == "message_processed"]
    assert [r.action for r in records] == ["quarantine", "add_header", "relay"]  # type: ignore[attr-defined]
    assert autolearn(records) == ["spam", "no", "ham"]
    assert "between 0.1 and 12.0" in records[1].autolearn_detail  # type: ignore[attr-defined]
    assert await learned(tmp_path) == (1, 1)


async def test_autolearn_is_off_by_default(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = overrides(tmp_path, sink, dns_server)
    config["policies"]["bayes"] = {}
    with caplog.at_level(logging.INFO, logger="gateway.handoff"):
        async with running_gateway(config, workdir=tmp_path) as gw:
            await send(gw.smtp_port, SPAM, HAM)
    records = [r for r in caplog.records if r.getMessage() == "message_processed"]
    assert autolearn(records) == [None, None]
    assert await learned(tmp_path) == (0, 0)


async def test_allowlisted_and_gtube_mail_is_not_learned(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "allow.txt").write_text("127.0.0.1\n")
    allow = {"file": "allow.txt", "symbol": "ALLOWLIST_CLIENT", "score": -100.0}
    config = overrides(tmp_path, sink, dns_server)
    gtube = message(4, "header-hit today", f"body-hit now {GTUBE}")
    with caplog.at_level(logging.INFO, logger="gateway.handoff"):
        async with running_gateway(config, workdir=tmp_path) as gw:
            with pytest.raises(aiosmtplib.SMTPDataError, match="GTUBE"):
                await send(gw.smtp_port, gtube)  # 33 points and a reject floor
            config["policies"]["lists"] = {"lists": [{**allow, "authenticated": False}]}
            gw.rewrite_config(config)
            assert await gw.reload()
            await send(gw.smtp_port, SPAM)  # 13 - 100 points: "ham" by score alone
    records = [r for r in caplog.records if r.getMessage() == "message_processed"]
    assert [r.action for r in records] == ["reject", "relay"]  # type: ignore[attr-defined]
    assert autolearn(records) == ["no", "no"]
    details = [r.autolearn_detail for r in records]  # type: ignore[attr-defined]
    assert details == ["action floor from rules", "allow/block list hit: ALLOWLIST_CLIENT"]
    assert await learned(tmp_path) == (0, 0)


async def test_the_same_message_twice_is_learned_once(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        async with running_gateway(overrides(tmp_path, sink, dns_server), workdir=tmp_path) as gw:
            await send(gw.smtp_port, SPAM, SPAM)
    results = [r.result for r in caplog.records if r.getMessage() == "message_autolearned"]  # type: ignore[attr-defined]
    assert sorted(results) == ["known", "learned"]
    assert await learned(tmp_path) == (1, 0)


async def test_a_state_store_that_is_down_does_not_hurt_delivery(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    down = {"state.backend": "redis", "state.url": f"redis://127.0.0.1:{free_port()}/0"}
    with caplog.at_level(logging.INFO, logger="gateway.handoff"):
        async with running_gateway(
            overrides(tmp_path, sink, dns_server, **down), workdir=tmp_path
        ) as gw:
            replies = await send(gw.smtp_port, SPAM, HAM)
    assert len(replies) == 2 and len(sink.messages) == 1  # quarantined spam, relayed ham
    records = [r for r in caplog.records if r.getMessage() == "message_processed"]
    assert autolearn(records) == ["unavailable", "unavailable"]


async def test_autolearn_counts_go_to_redis_when_that_is_the_state_store(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer
) -> None:
    require_tool("redis-server", "apt-get install redis-server")
    redis = ThrowawayRedis(tmp_path, persist=False)
    redis.start()
    try:
        state = {"state.backend": "redis", "state.url": redis.url}
        async with running_gateway(
            overrides(tmp_path, sink, dns_server, **state), workdir=tmp_path
        ) as gw:
            await send(gw.smtp_port, SPAM, HAM)
        config = StateConfig(backend="redis", url=redis.url)
        assert await learned(tmp_path, config) == (1, 1)
    finally:
        redis.stop()


async def test_an_observed_policy_does_not_train_the_classifier(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The rules on trial give SPAM 13 points; enforced, the gateway sees 0 points and
    # learns what it would learn without them: a trial must not change later scores.
    config = overrides(tmp_path, sink, dns_server)
    config["policies"]["rules"]["observe"] = True
    with caplog.at_level(logging.INFO, logger="gateway.handoff"):
        async with running_gateway(config, workdir=tmp_path) as gw:
            await send(gw.smtp_port, SPAM)
    records = [r for r in caplog.records if r.getMessage() == "message_processed"]
    assert [r.action for r in records] == ["relay"]  # type: ignore[attr-defined]
    assert autolearn(records) == ["ham"]
    assert records[0].autolearn_detail.startswith("score 0.00 without bayes")  # type: ignore[attr-defined]
    assert b"X-Spam-Action-Observed: quarantine" in sink.messages[0].data
    assert await learned(tmp_path) == (0, 1)


async def test_nothing_is_learned_in_global_observe_mode(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = overrides(tmp_path, sink, dns_server, **{"actions.mode": "observe"})
    with caplog.at_level(logging.INFO, logger="gateway.handoff"):
        async with running_gateway(config, workdir=tmp_path) as gw:
            await send(gw.smtp_port, SPAM, HAM)
    records = [r for r in caplog.records if r.getMessage() == "message_processed"]
    assert autolearn(records) == ["no", "no"]
    assert records[0].autolearn_detail == "observe mode: verdicts are not learned"  # type: ignore[attr-defined]
    assert len(sink.messages) == 2 and await learned(tmp_path) == (0, 0)
