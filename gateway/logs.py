"""Logging set-up: one JSON object per line (default) or readable text.

Events are snake_case past-tense names passed as the message, facts go in
``extra`` (``log.info("message_relayed", extra={"queue_id": ...})``); both
formats print every extra field, so nothing is lost between them. Exception
tracebacks go into the ``exc`` field, never to an SMTP peer.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from gateway.config import LogConfig

__all__ = ["JSONFormatter", "TextFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JSONFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "event": ..., <extras>}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000+00:00 info gateway.server message_relayed key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname.lower(), record.name, record.getMessage()]
        for key, value in _extras(record).items():
            plain = isinstance(value, str) and value and " " not in value and '"' not in value
            text = value if plain else json.dumps(value, default=str, ensure_ascii=False)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Configure the root logger once per process (``run`` calls it; a reload may again)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_gateway", False):
            root.removeHandler(old)
    handler._gateway = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    # Libraries chatter at INFO; their warnings still come through.
    for noisy in ("mail.log", "asyncio", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
