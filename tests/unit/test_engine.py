"""Engine.evaluate: one parse, bounded cost on hostile MIME, verdict and headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.api import Action, Services
from gateway.config import config_from_mapping
from gateway.engine import Engine, Envelope
from gateway.testing import NoDNS


def engine(**pipeline: Any) -> Engine:
    config = config_from_mapping(
        {
            "server": {"hostname": "mx.example.org", "accepted_domains": ["example.org"]},
            "pipeline": pipeline,
        },
        Path("/nonexistent/config.toml"),
    )
    services = Services(resolver=NoDNS(), state=None, hostname="mx.example.org", config_dir=Path())  # type: ignore[arg-type]
    return Engine(config, Engine.make_plan(config), services)


ENVELOPE = Envelope(
    client_ip="192.0.2.1",
    helo="h.example.net",
    mail_from="a@example.net",
    rcpt_to=("b@example.org",),
    queue_id="Q1",
)


def nested(depth: int) -> bytes:
    parts = [b"From: a@example.net\r\nMIME-Version: 1.0\r\n"]
    parts += [
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    ]
    parts.append(b"Content-Type: text/plain\r\n\r\nhello\r\n")
    parts += [b"--b%d--\r\n" % i for i in reversed(range(depth))]
    return b"".join(parts)


async def test_a_plain_message_with_no_policies_is_relayed_with_score_zero() -> None:
    ev = await engine().evaluate(ENVELOPE, b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n")
    assert ev.action is Action.RELAY
    assert ev.headers[1] == "X-Spam-Status: No, score=0.00 required=5.00 tests=none"


async def test_thousands_of_nested_multiparts_are_not_parsed_and_are_quarantined() -> None:
    ev = await engine(max_mime_containers=50).evaluate(ENVELOPE, nested(5000))
    assert ev.action is Action.QUARANTINE
    assert [s.name for s in ev.verdict.symbols] == ["MIME_TOO_COMPLEX"]
    assert ev.verdict.reason == "message structure too complex to inspect"


async def test_moderate_nesting_is_parsed_normally() -> None:
    ev = await engine(max_mime_containers=50).evaluate(ENVELOPE, nested(20))
    assert ev.action is Action.RELAY
