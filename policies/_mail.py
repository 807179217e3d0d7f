"""Header access shared by the spam policies, computed once per message.

The stdlib's structured header parsing (``policy=default``) raises on some
hostile header values when a field is accessed. These helpers read the raw
fields, decode RFC 2047 words defensively and never raise: a broken header is
evidence, not a crash.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import re
from dataclasses import dataclass

from gateway.api import Context

__all__ = [
    "Address",
    "addresses",
    "all_headers",
    "decode_words",
    "domain_of",
    "from_address",
    "header",
    "header_values",
    "raw_headers",
]

_FOLD = re.compile(r"\r?\n[ \t]*")
MAX_FIELDS = 500  # header fields looked at
MAX_VALUE = 8192  # characters of one field value
MAX_ADDRESSES = 1000  # mailboxes parsed from one header name


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox: display name (decoded), address and its lower-case domain."""

    name: str
    addr: str
    domain: str


def decode_words(value: str) -> str:
    """RFC 2047 encoded-words decoded; undecodable input comes back as it was."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return value


def _raw_headers(ctx: Context) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for n, (name, value) in enumerate(ctx.message.raw_items()):
        if n >= MAX_FIELDS:
            break
        text = str(value)[:MAX_VALUE]
        if not text.isascii():  # raw 8-bit (RFC 6532 UTF-8, or junk) arrives surrogate-escaped
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        # Unfold (RFC 5322 §2.2.3); a fold's indentation becomes one space, while
        # white space within a line stays as sent (runs of spaces are evidence).
        if "\n" in text:
            text = _FOLD.sub(" ", text)
        out.append((name.strip().lower(), text.strip()))
    return tuple(out)


def _headers(ctx: Context) -> tuple[tuple[str, str], ...]:
    return tuple((n, decode_words(v)) for n, v in raw_headers(ctx))


def raw_headers(ctx: Context) -> tuple[tuple[str, str], ...]:
    """Every header field as (lower-case name, unfolded value, not decoded), in order."""
    return ctx.memo(_raw_headers)


def all_headers(ctx: Context) -> tuple[tuple[str, str], ...]:
    """Every header field as (lower-case name, unfolded decoded value), in order."""
    return ctx.memo(_headers)


def header_values(ctx: Context, name: str) -> list[str]:
    key = name.lower()
    return [v for n, v in all_headers(ctx) if n == key]


def header(ctx: Context, name: str) -> str | None:
    """The first field ``name``'s decoded value, or None when absent."""
    key = name.lower()
    for n, v in all_headers(ctx):
        if n == key:
            return v
    return None


def domain_of(addr: str) -> str:
    _, at, domain = addr.rpartition("@")
    return domain.strip().strip(".").lower().strip("<>[] ") if at else ""


def addresses(ctx: Context, name: str) -> tuple[Address, ...]:
    """Mailboxes in every field ``name`` (From, To, Cc, Reply-To)."""
    values = [v for n, v in raw_headers(ctx) if n == name.lower()]
    if not values:
        return ()
    try:
        pairs = email.utils.getaddresses(values)
    except (ValueError, IndexError, TypeError):
        return ()
    return tuple(
        Address(decode_words(display).strip(), addr.strip(), domain_of(addr))
        for display, addr in pairs[:MAX_ADDRESSES]
        if addr
    )


def _from(ctx: Context) -> Address | None:
    found = addresses(ctx, "from")
    return found[0] if found else None


def from_address(ctx: Context) -> Address | None:
    """The first From mailbox (RFC 5322 §3.6.2), or None."""
    return ctx.memo(_from)
