"""The gateway and any downstream agree on where a message ends, whatever the client sends.

For arbitrary client DATA streams built from CR, LF, CRLF, dots, NULs and
text, the gateway's own path is run for real: the DATA reader
(``GatewaySMTP._read_data``), the listener's smuggling check, the relay's
prepend-and-encode (``relay.wire_data``). The relayed stream is then read by
the three kinds of downstream that exist: strict (CRLF lines), and lenient
ones that also end lines at a bare LF or a bare CR (the smuggling targets).
Each must find exactly one message whose end is the end the gateway used;
none may see a second message inside it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import smuggling
from gateway.relay import RelayError, wire_data
from gateway.smtp import DataBudget, DataOutcome, GatewaySMTP

_atoms = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b".", b"..", b"\x00", b"a", b"Subject: x", b"\r\n.\r\n", b" "]
)


class _PieceReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self._buffer = bytearray()

    async def read(self, n: int) -> bytes:
        out, self.data = self.data[:7], self.data[7:]  # small, odd-sized chunks
        return out


class _Session:
    _take = GatewaySMTP._take

    def __init__(self, data: bytes) -> None:
        self._reader: Any = _PieceReader(data)
        self.transport: Any = object()
        self.budget = DataBudget(10**9)
        self._taken = 0


def _lenient_end(stream: bytes, ends: tuple[bytes, ...]) -> int | None:
    """Where a downstream that ends lines at any of ``ends`` sees the lone-dot line."""
    pos = 0
    while pos < len(stream):
        cut = min(
            ((stream.find(e, pos), e) for e in ends if stream.find(e, pos) >= 0), default=None
        )
        if cut is None:
            return None
        at, sep = cut
        if stream[pos:at] == b".":
            return pos
        pos = at + len(sep)
    return None


DOWNSTREAMS = {
    "strict": (b"\r\n",),
    "bare_lf": (b"\r\n", b"\n"),
    "bare_cr_or_lf": (b"\r\n", b"\n", b"\r"),
}


@settings(max_examples=1000, deadline=None)
@given(st.lists(_atoms, max_size=40))
def test_no_downstream_sees_a_different_end_than_the_gateway(atoms: list[bytes]) -> None:
    client = b"".join(atoms) + b"\r\n.\r\n"
    raw, outcome = asyncio.run(GatewaySMTP._read_data(_Session(client), 10**6))  # type: ignore[arg-type]
    assert outcome is DataOutcome.OK
    if smuggling.found_sync(raw, smuggling.Rule.ANY_DOT):
        return  # refused with 550 at the listener: nothing is relayed
    data = b"Received: by gateway\r\n" + raw  # what the server prepends
    try:
        stream = wire_data(data)
    except RelayError:
        raise AssertionError("the relay refused what the listener passed") from None
    for name, ends in DOWNSTREAMS.items():
        end = _lenient_end(stream, ends)
        # The only lone dot any downstream finds is the final one the relay wrote.
        assert end == len(stream) - 3, (name, stream)


def test_every_named_smuggling_variant_is_refused_or_stays_inside() -> None:
    variants = {
        "lf_dot_lf": b"\n.\n",
        "cr_dot_cr": b"\r.\r",
        "lf_dot_crlf": b"\n.\r\n",
        "crlf_dot_lf": b"\r\n.\n",
        "crlf_dot_cr": b"\r\n.\r",
        "cr_dot_lf": b"\r.\n",
        "lf_dot_cr": b"\n.\r",
        "cr_dot_crlf": b"\r.\r\n",
    }
    for name, fake in variants.items():
        client = b"Subject: x\r\n\r\nhello" + fake + b"MAIL FROM:<evil@x>\r\n.\r\n"
        raw, _ = asyncio.run(GatewaySMTP._read_data(_Session(client), 10**6))  # type: ignore[arg-type]
        assert b"MAIL FROM:<evil@x>" in raw, name  # the gateway kept it inside the message
        if smuggling.found_sync(raw, smuggling.Rule.ANY_DOT):
            continue  # refused, 550
        stream = wire_data(raw)
        for ends in DOWNSTREAMS.values():
            assert _lenient_end(stream, ends) == len(stream) - 3, name


_walk_atoms = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"QUJD", b"\r\n.\r\n"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_walk_atoms, max_size=60), st.sampled_from(list(smuggling.Rule)))
def test_the_dot_walk_agrees_with_the_byte_searches(
    atoms: list[bytes], rule: smuggling.Rule
) -> None:
    """The fast path for big windows (visit each dot) answers as the two-byte searches do,
    or hands over (None) when there are too many dots."""
    data = b"".join(atoms)
    walked = smuggling._dot_walk(data, rule)
    if walked is not None:
        assert walked == smuggling._scan(data, rule), data
    padded = b"QUJD" * 17000 + data  # a big window: the path found_sync takes
    assert smuggling.found_sync(padded, rule) == smuggling._scan(padded, rule)


def test_a_window_with_many_dots_falls_back_to_the_searches() -> None:
    text = b"Dr. Smith. " * 2000  # more dots than the walk looks at
    for tail, found in ((b"", False), (b"\r\n\n.\r\n", True)):
        data = text + tail
        assert smuggling._dot_walk(data, smuggling.Rule.ANY_DOT) is None
        assert smuggling.found_sync(data, smuggling.Rule.ANY_DOT) is found


@settings(max_examples=2000, deadline=None)
@given(st.lists(_walk_atoms, max_size=60), st.integers(0, 68_010), st.booleans())
def test_data_end_and_unstuffing_checks_agree_with_the_byte_searches(
    atoms: list[bytes], start: int, dotty: bool
) -> None:
    """The DATA reader's end search and its "nothing to unstuff" shortcut answer as
    ``find(CRLF . CRLF)`` and ``replace(CRLF ., CRLF)`` do, with few dots or many."""
    # Padded past the size below which the plain searches are used.
    data = (b"x." * 600 if dotty else b"") + b"QUJD" * 17000 + b"".join(atoms)
    assert smuggling.data_end(data, start) == data.find(b"\r\n.\r\n", start)
    assert smuggling.data_end(bytearray(data), start) == data.find(b"\r\n.\r\n", start)
    if smuggling.no_line_starts_with_dot(data):
        assert data.replace(b"\r\n.", b"\r\n") == data
