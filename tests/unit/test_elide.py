"""Parsing with base64 runs elided builds exactly what the stdlib parser builds."""

from __future__ import annotations

import base64
import email.feedparser
import email.policy
import re
from email.message import Message
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import elide
from gateway.engine import _MULTIPART, _containers_in_step, parse_message


def _stdlib(raw: bytes) -> Message:
    parser = email.feedparser.FeedParser(policy=email.policy.default)
    parser.feed(raw.decode("ascii", "surrogateescape"))
    return parser.close()


def _shape(msg: Message) -> list[Any]:
    return [
        (
            list(part.raw_items()),
            part._payload if isinstance(part._payload, str) else None,  # type: ignore[attr-defined]
            part.preamble,
            part.epilogue,
            [type(d).__name__ for d in part.defects],
        )
        for part in msg.walk()
    ]


def _via_elision(raw: bytes) -> Message | None:
    elided = elide.elide(raw)
    if elided is None:
        return None
    msg = _stdlib(elided.data)
    return msg if elide.restore(msg, elided) else None


def _attachment_message(size: int) -> bytes:
    blob = base64.encodebytes(bytes(range(256)) * (size // 256)).replace(b"\n", b"\r\n")
    return (
        b'From: a@example.com\r\nContent-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b"preamble\r\n--m\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--m\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + blob + b"--m--\r\nepilogue\r\n"
    )


def test_a_big_attachment_is_one_run_and_parses_identically() -> None:
    raw = _attachment_message(3_000_000)
    elided = elide.elide(raw)
    assert elided is not None and len(elided.spans) == 1 and len(elided.data) < 1000
    msg = _via_elision(raw)
    assert msg is not None
    assert _shape(msg) == _shape(_stdlib(raw))
    assert _shape(parse_message(raw)) == _shape(_stdlib(raw))


def test_a_message_without_long_base64_runs_is_left_alone() -> None:
    assert elide.elide(b"Subject: hi\r\n\r\n" + b"plain words here\r\n" * 5000) is None


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_LINE = st.text(alphabet=_B64, min_size=1, max_size=20).map(str.encode)
_PIECE = st.one_of(
    st.lists(_LINE, min_size=1, max_size=8).map(lambda ls: b"\r\n".join(ls) + b"\r\n"),
    st.sampled_from(
        [
            b"\r\n", b"\n", b"\r", b"--b\r\n", b"--b--\r\n", b"--c\r\n", b"--c--\r\n", b"--b",
            b'Content-Type: multipart/mixed; boundary="b"\r\n',
            b"Content-Type: multipart/alternative; boundary=c\r\n",
            b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
            b"Subject: x\r\n", b" folded\r\n", b"\tfolded\r\n", b"From x\r\n", b"abc",
            b"ABCD==\r\n\r\n", b"\xff\r\n", b"GWELIDE", b"A-B\r\n",
        ]
    ),
)  # fmt: skip


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.lists(_PIECE, max_size=40).map(b"".join), window=st.sampled_from([16, 64, 1 << 20]))
def test_any_structure_parses_identically_or_falls_back(raw: bytes, window: int) -> None:
    """Boundaries, folded and broken headers, nested parts, bare CR/LF, empty lines."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(elide, "MIN_RUN", 8)
        mp.setattr(elide, "_RUN", re.compile(rb"[A-Za-z0-9+/=\r\n]{8,}"))
        mp.setattr(elide, "WINDOW", window)
        msg = _via_elision(raw)
    if msg is not None:
        assert _shape(msg) == _shape(_stdlib(raw))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"QUJD", b"AA", b"\r\n", b"\r", b"\n", b"="]), max_size=40))
def test_the_crlf_count_by_stride_is_the_count(pieces: list[bytes]) -> None:
    """The stride shortcut returns exactly ``bytes.count(b"\\r\\n")`` on any span ending in CRLF."""
    raw = b"x" + b"".join(pieces) + b"\r\n"
    start, end = 1, len(raw)
    crs = raw.count(b"\r", start, end)
    assert elide._crlf_count(raw, start, end, crs) == raw.count(b"\r\n", start, end)


_ct_atoms = st.sampled_from(
    [
        *(b"Content-Type:", b"content-TYPE: ", b"multipart/", b"MultiPart/", b" ", b"\t"),
        *(b"\r\n", b"\n", b"\r\n ", b":", b"x", b"QUJD" * 40),
    ]
)


def _containers_by_scan(raw: bytes, step: int) -> int:
    """The reference: each step lower-cased with 256 bytes of overlap and scanned."""
    return sum(
        sum(1 for m in _MULTIPART.finditer(raw[s : s + step + 256].lower()) if m.start() < step)
        for s in range(0, len(raw), step)
    )


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(_ct_atoms, max_size=50), st.sampled_from([16, 64, 4096]), st.sampled_from([2, 1000])
)
def test_multipart_fields_counted_at_their_colons_as_by_the_scan(
    atoms: list[bytes], step: int, max_colons: int
) -> None:
    """The container count (MIME_TOO_COMPLEX) is the same whether each step's colons are
    visited or the step is lower-cased and scanned."""
    raw = b"".join(atoms)
    walked = sum(_containers_in_step(raw, s, step, max_colons) for s in range(0, len(raw), step))
    assert walked == _containers_by_scan(raw, step)
