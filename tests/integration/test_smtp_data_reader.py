"""The chunked DATA reader agrees with a line-at-a-time RFC 5321 reader on every input.

``GatewaySMTP._read_data`` reads large chunks instead of lines. Whatever the
bytes and wherever the chunk boundaries fall, it must find the same end of
data (the first strict CRLF.CRLF), undo the same transparency dots
(RFC 5321 §4.5.2) and leave the bytes after the end for the command loop.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp import DataBudget, DataOutcome, GatewaySMTP
from gateway.testing.smtpdata import ReaderSession, reference_data

END = b"\r\n.\r\n"


async def chunked(
    pieces: list[bytes], limit: int, budget: int = 10**9
) -> tuple[bytes, DataOutcome, bytes]:
    reader = asyncio.StreamReader(limit=2**20)

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    session = ReaderSession(reader, DataBudget(budget))
    raw, outcome = await GatewaySMTP._read_data(session, limit)  # type: ignore[arg-type]
    await feeder
    rest = await reader.read()
    return raw, outcome, rest


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
    expected = reference_data(wire)
    assert expected is not None
    raw, outcome, rest = asyncio.run(chunked(split(wire, cuts), 10_000))
    assert outcome is DataOutcome.OK
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
    raw, outcome, rest = asyncio.run(chunked(split(wire, cuts), limit))
    too_big = len(body) > limit
    assert outcome is (DataOutcome.TOO_BIG if too_big else DataOutcome.OK)
    assert raw == (b"" if too_big else body)
    assert rest == b"QUIT\r\n"


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=3000),
    budget=st.integers(min_value=1, max_value=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_spent_memory_budget_discards_the_message_and_stays_in_sync(
    size: int, budget: int, cuts: list[int]
) -> None:
    body = b"z" * size + b"\r\n"
    wire = body + b".\r\nQUIT\r\n"
    raw, outcome, rest = asyncio.run(chunked(split(wire, cuts), 10_000, budget))
    assert rest == b"QUIT\r\n"
    if outcome is DataOutcome.OK:
        assert raw == body
    else:
        assert outcome is DataOutcome.NO_MEMORY and raw == b""
    if len(wire) <= budget:
        assert outcome is DataOutcome.OK


def test_empty_message_and_leading_dots() -> None:
    ok = DataOutcome.OK
    assert asyncio.run(chunked([b".\r\n"], 100)) == (b"", ok, b"")
    assert asyncio.run(chunked([b"..\r\n.\r\n"], 100)) == (b".\r\n", ok, b"")
    assert asyncio.run(chunked([b"\r", b"\n", b".", b"\r", b"\n"], 100)) == (b"\r\n", ok, b"")
