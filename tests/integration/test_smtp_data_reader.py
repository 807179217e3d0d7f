"""The chunked DATA reader agrees with a line-at-a-time RFC 5321 reader on every input.

``GatewaySMTP._read_data`` reads large chunks instead of lines. Whatever the
bytes and wherever the chunk boundaries fall, it must find the same end of
data (the first strict CRLF.CRLF), undo the same transparency dots
(RFC 5321 §4.5.2) and leave the bytes after the end for the command loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp import GatewaySMTP

END = b"\r\n.\r\n"


def reference(wire: bytes) -> tuple[bytes, bytes] | None:
    """aiosmtpd's semantics: lines end at CRLF only; ``.CRLF`` alone ends the data."""
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


class _Session:
    """Just what ``_read_data`` touches."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.transport: Any = object()


async def chunked(pieces: list[bytes], limit: int) -> tuple[bytes, bool, bytes]:
    reader = asyncio.StreamReader(limit=2**20)

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    raw, too_big = await GatewaySMTP._read_data(_Session(reader), limit)  # type: ignore[arg-type]
    await feeder
    rest = await reader.read()
    return raw, too_big, rest


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


@settings(max_examples=250, deadline=None)
@given(
    body=st.binary(max_size=200).map(
        lambda b: bytes(b"\r\n.ab\x00"[x % 6] for x in b)  # dense in CR, LF and dots
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_chunked_reader_matches_the_line_reader(body: bytes, cuts: list[int]) -> None:
    wire = body + END + b"NOOP\r\n"
    expected = reference(wire)
    assert expected is not None
    raw, too_big, rest = asyncio.run(chunked(split(wire, cuts), 10_000))
    assert not too_big
    assert (raw, rest) == expected


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=3000),
    limit=st.integers(min_value=1, max_value=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_size_limit_is_exact_and_the_stream_stays_in_sync(
    size: int, limit: int, cuts: list[int]
) -> None:
    body = (b"x" * 70 + b"\r\n") * (size // 72) + b"y" * (size % 72) + b"\r\n"
    wire = body + b".\r\nQUIT\r\n"
    raw, too_big, rest = asyncio.run(chunked(split(wire, cuts), limit))
    assert too_big == (len(body) > limit)
    assert raw == (b"" if too_big else body)
    assert rest == b"QUIT\r\n"


def test_empty_message_and_leading_dots() -> None:
    assert asyncio.run(chunked([b".\r\n"], 100)) == (b"", False, b"")
    assert asyncio.run(chunked([b"..\r\n.\r\n"], 100)) == (b".\r\n", False, b"")
    assert asyncio.run(chunked([b"\r", b"\n", b".", b"\r", b"\n"], 100)) == (b"\r\n", False, b"")
