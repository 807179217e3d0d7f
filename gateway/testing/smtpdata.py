"""Test oracles for the DATA reader: RFC 5321 semantics written the slow, obvious way."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.smtp import DataBudget, GatewaySMTP

__all__ = ["ReaderSession", "reference_data"]


def reference_data(wire: bytes) -> tuple[bytes, bytes] | None:
    """(message, what follows) per RFC 5321 §4.1.1.4 and §4.5.2, or None without an end.

    Lines end at CRLF only; ``.CRLF`` alone ends the data; a leading dot is removed.
    """
    pos = 0
    lines: list[bytes] = []
    while True:
        nl = wire.find(b"\r\n", pos)
        if nl < 0:
            return None
        line = wire[pos : nl + 2]
        pos = nl + 2
        if line == b".\r\n":
            return b"".join(lines), wire[pos:]
        lines.append(line[1:] if line.startswith(b".") else line)


class ReaderSession:
    """Just what ``GatewaySMTP._read_data`` touches of a session."""

    _take = GatewaySMTP._take

    def __init__(
        self, reader: asyncio.StreamReader | Any, budget: DataBudget | None = None
    ) -> None:
        self._reader = reader
        self.transport: Any = object()
        self.budget = budget or DataBudget(10**9)
        self._taken = 0
