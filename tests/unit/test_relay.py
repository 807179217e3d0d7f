"""The relay's pure parts: DATA transparency, reply sanitizing, error classification."""

from __future__ import annotations

import re
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import relay
from gateway.relay import FailureReason, RelayError, sanitize_reply_text, wire_data


def unstuff(wire: bytes) -> bytes:
    """What a conforming server (RFC 5321 §4.5.2, CRLF-delimited lines) stores."""
    lines: list[bytes] = []
    rest = wire
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "the payload must end with CRLF.CRLF"
        if line == b".":
            assert rest == b"", "nothing may follow the terminator"
            return b"".join(lines)
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def test_public_surface_is_the_agreed_one() -> None:
    assert {"Relay", "RelayError", "RelayResult"} <= set(relay.__all__)
    for name in relay.__all__:
        assert hasattr(relay, name)


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: x\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n",
        b".first line is a dot line\r\n",
        b"x" * 998 + b"\r\n",
        b"8-bit \xff\xfe\x80 and NUL \x00 bytes\r\n",
        b"bare LF\nand bare CR\rstay as they are\r\n",
        b"dot after bare LF\n.x is not a terminator to anyone\r\n",
    ],
)
def test_wire_data_unstuffs_to_exactly_the_input(data: bytes) -> None:
    assert unstuff(wire_data(data)) == data


def test_wire_data_adds_the_final_crlf_the_terminator_needs() -> None:
    """RFC 5321 §4.1.1.4: the first CRLF of CRLF.CRLF ends the last line."""
    assert wire_data(b"no final line end") == b"no final line end\r\n.\r\n"
    assert wire_data(b"line\r\n.") == b"line\r\n..\r\n.\r\n"
    assert unstuff(wire_data(b"a\r\nb")) == b"a\r\nb\r\n"


def test_wire_data_of_an_empty_message_is_just_the_terminator() -> None:
    assert wire_data(b"") == b".\r\n"


@given(st.binary(max_size=300))
def test_wire_data_never_ends_early_and_round_trips(data: bytes) -> None:
    try:
        wire = wire_data(data)
    except RelayError as exc:
        assert exc.code == 550
        return
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[:-3]
    assert b"\r\n.\r\n" not in b"\r\n" + body
    expected = data if not data or data.endswith(b"\r\n") else data + b"\r\n"
    assert unstuff(wire) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"a\n.\r\nMAIL FROM:<x@y>\r\n",  # the 2023 SMTP smuggling pattern
        b"a\n.\nb\r\n",
        b"a\r.\rb\r\n",
        b"a\r.\r\n",
        b"ends with a bare LF dot\n.",
    ],
)
def test_a_bare_line_ending_before_a_lone_dot_is_refused(data: bytes) -> None:
    """A lenient downstream would see an end of DATA there: refuse rather than smuggle."""
    with pytest.raises(RelayError) as info:
        wire_data(data)
    assert info.value.code == 550
    assert info.value.permanent
    assert "bare CR or LF" in info.value.text


def test_a_dot_after_crlf_then_bare_lf_is_stuffed_not_refused() -> None:
    data = b"a\r\n.\nb\r\n"
    assert wire_data(data) == b"a\r\n..\nb\r\n.\r\n"


def test_reply_texts_are_one_printable_bounded_line() -> None:
    text = "5.1.1 no such user\r\n250 injected\x00\x1b[31m \u00e9t\u00e9 " + "x" * 1000
    clean = sanitize_reply_text(text)
    assert "\r" not in clean and "\n" not in clean
    assert all(" " <= c <= "~" for c in clean)
    assert len(clean) == relay.MAX_REPLY_TEXT
    assert clean.startswith("5.1.1 no such user 250 injected?")


def test_relay_error_permanent_only_for_5xx() -> None:
    assert RelayError(550, "5.1.1 no").permanent
    assert RelayError(550, "x").reason is FailureReason.PERMFAIL
    assert not RelayError(451, "4.3.0 busy").permanent
    assert RelayError(451, "x").reason is FailureReason.TEMPFAIL
    unreachable = RelayError(None, "down")
    assert not unreachable.permanent
    assert unreachable.reason is FailureReason.UNREACHABLE
    assert RelayError(None, "t", reason=FailureReason.TLS).reason is FailureReason.TLS


def test_relay_error_text_is_sanitized() -> None:
    assert RelayError(550, "5.7.1 a\r\nb").text == "5.7.1 a b"


@pytest.mark.parametrize("address", ["a\r\nRCPT TO:<x@y>@example.org", "a\x00b@example.org"])
def test_addresses_with_control_characters_are_refused(address: str) -> None:
    with pytest.raises(RelayError) as info:
        relay._check_address(address, "recipient")
    assert info.value.code == 553


def test_tls_context_requires_tls_1_2_and_verifies_by_default() -> None:
    ctx = relay._tls_context(verify=True)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    lax = relay._tls_context(verify=False)
    assert lax.verify_mode == ssl.CERT_NONE and not lax.check_hostname
    assert lax.minimum_version >= ssl.TLSVersion.TLSv1_2


# The rule, stated as a regex: a bare CR or bare LF, then ".", then CR or LF.
_REFERENCE = re.compile(rb"(?:\r(?!\n)|(?<!\r)\n)\.[\r\n]")


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a"]), max_size=40))
def test_fast_smuggling_check_matches_the_reference_rule(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert relay._bare_line_end_dot(data) == bool(_REFERENCE.search(data))


@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\r\n."]), max_size=60),
    st.integers(min_value=1, max_value=8),
)
async def test_slice_by_slice_equals_whole_message(parts: list[bytes], size: int) -> None:
    """Checking and stuffing in CRLF-ending slices gives exactly the whole-message result."""
    data = b"".join(parts)
    saved = relay.SLICE
    relay.SLICE = size
    try:
        pieces = list(relay._slices(relay._terminated(data)))
        try:
            whole = wire_data(data)
        except RelayError:
            with pytest.raises(RelayError):
                await relay._prepared(data)
            return
        prepared = await relay._prepared(data)
    finally:
        relay.SLICE = saved
    assert b"".join(pieces) == prepared
    assert all(p.endswith(b"\r\n") for p in pieces)
    assert b"".join(relay._stuff(p) for p in pieces) + b".\r\n" == whole


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"a", b"QUJD"]), max_size=40))
def test_dot_stuffing_is_the_plain_replacement(pieces: list[bytes]) -> None:
    """RFC 5321 §4.5.2 stuffing, whether the dots are visited or bytes.replace does it."""
    for piece in (
        b"".join(pieces),
        b"".join(pieces) + b"QUJD" * 17000,  # big enough for the dot walk
        b"x." * 600 + b"QUJD" * 17000 + b"".join(pieces),  # more dots than it visits
    ):
        stuffed = piece.replace(b"\r\n.", b"\r\n..")
        expected = b"." + stuffed if stuffed.startswith(b".") else stuffed
        assert relay._stuff(piece) == expected
