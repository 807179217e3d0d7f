"""Very long lines are moved out of the DATA buffer in pieces, with the same result.

``GatewaySMTP._read_data`` hands an unfinished line over in pieces once it
is longer than ``_LONG_LINE`` (so a 25 MB single-line message never costs one
long step at its end). With a tiny ``_LONG_LINE`` every input must still give
exactly what a line-at-a-time RFC 5321 reader gives, and the exact size limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import smtp
from gateway.smtp import DataOutcome, GatewaySMTP
from gateway.testing.smtpdata import ReaderSession, reference_data


async def _read(pieces: list[bytes], limit: int) -> tuple[bytes, DataOutcome, bytes]:
    session = ReaderSession(_PieceReader(pieces))  # type: ignore[arg-type]
    raw, outcome = await GatewaySMTP._read_data(session, limit)  # type: ignore[arg-type]
    rest = b"".join(session._reader.rest())  # type: ignore[attr-defined]
    return raw, outcome, rest


class _PieceReader:
    """Returns exactly one piece per read(); ``_buffer`` takes pushed-back bytes."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self._buffer = bytearray()

    async def read(self, n: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    def rest(self) -> list[bytes]:
        return [bytes(self._buffer), *self.pieces]


_atoms = st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"..", b"xyz" * 5])


@pytest.fixture(scope="module", autouse=True)
def tiny_long_line() -> Iterator[None]:
    """Every line over 8 bytes counts as very long here."""
    saved = smtp._LONG_LINE
    smtp._LONG_LINE = 8
    yield
    smtp._LONG_LINE = saved


@settings(max_examples=300, deadline=None)
@given(st.lists(_atoms, max_size=60), st.lists(st.integers(1, 12), min_size=1, max_size=30))
async def test_long_line_pieces_match_the_line_reader(body: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(body) + b"\r\n.\r\nQUIT\r\n"
    pieces, pos, i = [], 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        pieces.append(wire[pos : pos + step])
        pos += step
        i += 1
    expected = reference_data(wire)
    assert expected is not None
    raw, outcome, rest = await _read(pieces, 10**6)
    assert outcome is DataOutcome.OK
    assert (raw, rest) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(20, 60), st.integers(1, 9))
async def test_size_limit_stays_exact_on_one_long_line(length: int, step: int) -> None:
    line = b"y" * length + b"\r\n"
    wire = line + b".\r\n"
    pieces = [wire[i : i + step] for i in range(0, len(wire), step)]
    ok, outcome_ok, _ = await _read(pieces, len(line))
    assert outcome_ok is DataOutcome.OK and ok == line
    _, outcome_big, _ = await _read(pieces, len(line) - 1)
    assert outcome_big is DataOutcome.TOO_BIG
