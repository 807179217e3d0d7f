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


def test_mime_fields_parsed_once_across_messages_give_the_same_answers() -> None:
    """A leaf Content-Type parsed for one message is reused by the next (same value,
    same params); multipart Content-Types (unique boundaries) and From are not shared."""
    from gateway import engine

    def raw(boundary: str) -> bytes:
        return (
            f'From: A <a@example.com>\r\nContent-Type: multipart/mixed; boundary="{boundary}"'
            f"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n"
            f"--{boundary}--\r\n"
        ).encode()

    first, second = engine.parse_message(raw("b1")), engine.parse_message(raw("b2"))
    leaf1, leaf2 = first.get_payload()[0], second.get_payload()[0]
    assert leaf1["content-type"] is leaf2["content-type"]
    assert leaf2.get_content_type() == "text/plain"
    assert leaf2["content-type"].params["charset"] == "utf-8"
    assert first["content-type"] is not second["content-type"]
    assert first["from"] is not second["from"]
    assert second["content-type"].params["boundary"] == "b2"
