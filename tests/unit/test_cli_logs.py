"""Logging set-up: one JSON object per line, or text with the same fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.config import LogConfig
from gateway.logs import setup_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_event_level_logger_and_extras(restore_root: None) -> None:
    stream = io.StringIO()
    setup_logging(LogConfig(level="info", format="json"), stream)
    log = logging.getLogger("gateway.test")
    log.info("message_relayed", extra={"queue_id": "Q1", "symbols": ["A", "B"], "score": 1.5})
    log.debug("not_shown")
    try:
        raise ValueError("multi\nline")
    except ValueError:
        log.exception("policy_failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the traceback stays inside its one JSON line
    first = json.loads(lines[0])
    assert first["event"] == "message_relayed" and first["level"] == "info"
    assert first["logger"] == "gateway.test"
    assert first["queue_id"] == "Q1" and first["symbols"] == ["A", "B"] and first["score"] == 1.5
    assert first["ts"].endswith("+00:00")
    second = json.loads(lines[1])
    assert second["level"] == "error" and "ValueError" in second["exc"]


def test_text_format_and_reconfiguring_does_not_duplicate_lines(restore_root: None) -> None:
    stream = io.StringIO()
    setup_logging(LogConfig(format="json"), stream)
    setup_logging(LogConfig(level="debug", format="text"), stream)  # a reload
    logging.getLogger("gateway.test").debug("reloaded", extra={"path": "/etc/g w.toml", "n": 2})
    (line,) = stream.getvalue().splitlines()
    assert " debug gateway.test reloaded " in line
    assert 'path="/etc/g w.toml"' in line and "n=2" in line
