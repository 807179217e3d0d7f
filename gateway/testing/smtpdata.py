"""Test oracles for the DATA reader: RFC 5321 semantics written the slow, obvious way."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.smtp import DataBudget, GatewaySMTP

__all__ = ["ReaderSession", "long_lines_body", "reference_data"]


def long_lines_body(*lengths: int) -> bytes:
    """Body lines of ``lengths`` octets each (before the CRLF), then a short last line.

    RFC 5321 §4.5.3.1.6 caps a line at 1,000 octets with its CRLF, yet real mail
    (old spam and ham alike) carries longer ones and Postfix takes them; the
    gateway relays them byte-exact. Every second line starts with "." (stuffed
    on the wire), so transparency is exercised on long lines too.
    """
    words = b"long line of real mail "
    lines = []
    for i, n in enumerate(lengths):
        lead = b"." if i % 2 else b""
        lines.append((lead + words * (n // len(words) + 1))[:n] + b"\r\n")
    return b"".join(lines) + b"the end\r\n"


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
