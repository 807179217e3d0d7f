"""XFORWARD (Postfix XFORWARD_README): the up-stream client's identity between MTAs.

Both directions live here: the listener reads XFORWARD from trusted
up-stream MTAs (:func:`parse_xforward`), the relay sends it to a downstream
that offers it (:func:`xforward_arguments`). Values are RFC 3461 xtext.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "XFORWARD_ATTRIBUTES",
    "XFORWARD_LINE_MAX",
    "XFORWARD_VALUE_MAX",
    "Forwarded",
    "XForwardError",
    "parse_xforward",
    "xforward_arguments",
]

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")  # compared upper-cased (README note 3)
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
XFORWARD_VALUE_MAX = 255  # characters of one value (README note 1)
XFORWARD_LINE_MAX = 512  # octets of one command line, CRLF included (README note 2)
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,62})(?:\.[A-Za-z0-9_\-]{1,63})*\.?")
_PROTO = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-_]{0,63}")


class XForwardError(ValueError):
    """An XFORWARD command the gateway refuses with 501; the message says why."""


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The up-stream client an MTA passed on with XFORWARD; None = [UNAVAILABLE].

    Per the README an initial XFORWARD starts from all-unavailable, later ones
    in the same transaction overwrite only the attributes they name.
    """

    name: str | None = None
    addr: str | None = None  # a bare IP address (any "IPv6:" prefix removed)
    port: int | None = None
    proto: str | None = None
    helo: str | None = None
    ident: str | None = None  # the up-stream queue id
    source: str | None = None  # "LOCAL" or "REMOTE"


def _xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext: ``+XX`` is the byte 0xXX; a lone ``+`` is a syntax error."""
    if "+" not in value:
        return value
    if "+" in _XTEXT_HEX.sub("", value):
        raise XForwardError("bad xtext: '+' must be followed by two hex digits (RFC 3461)")
    decoded = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    return decoded


def _xforward_value(attr: str, value: str) -> str | int | None:
    """One decoded, checked attribute value (README note 1); None for [UNAVAILABLE]."""
    if len(value) > XFORWARD_VALUE_MAX:
        raise XForwardError(f"{attr} value longer than {XFORWARD_VALUE_MAX} characters")
    text = _xtext_decode(value)
    if text.upper() in _UNAVAILABLE:
        return None
    if not text or any(not ("!" <= c <= "~") for c in text):
        raise XForwardError(f"{attr} value empty or not printable ASCII without spaces")
    if attr == "NAME":
        if text.lower() == "unknown":  # Postfix's name for a client without verified rDNS
            return None
        if not _HOSTNAME.fullmatch(text):
            raise XForwardError(f"NAME must be a host name, got {text[:64]!r}")
    elif attr == "ADDR":
        bare = text[5:] if text[:5].upper() == "IPV6:" else text
        try:
            addr = ipaddress.ip_address(bare)
        except ValueError:
            raise XForwardError(f"ADDR must be an IP address, got {text[:64]!r}") from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(addr)
    elif attr == "PORT":
        if not text.isdigit() or int(text) > 65535:
            raise XForwardError(f"PORT must be a TCP port number, got {text[:16]!r}")
        return int(text)
    elif attr == "PROTO":
        if not _PROTO.fullmatch(text):
            raise XForwardError(f"PROTO must be a protocol name, got {text[:64]!r}")
    elif attr == "SOURCE":
        if text.upper() not in ("LOCAL", "REMOTE"):
            raise XForwardError(f"SOURCE must be LOCAL or REMOTE, got {text[:16]!r}")
        return text.upper()
    return text


def parse_xforward(arg: str, current: Forwarded | None) -> Forwarded:
    """Apply one ``XFORWARD attr=value ...`` to ``current`` (None before the first).

    Attribute names are case-insensitive; values are xtext (RFC 3461 §4).
    Raises :class:`XForwardError` for anything malformed, changing nothing.
    """
    items = arg.split()
    if not items:
        raise XForwardError("Syntax: XFORWARD attribute=value ...")
    updates: dict[str, str | int | None] = {}
    for item in items:
        attr, eq, value = item.partition("=")
        attr = attr.upper()
        if not eq:
            raise XForwardError(f"expected attribute=value, got {item[:64]!r}")
        if attr not in XFORWARD_ATTRIBUTES:
            raise XForwardError(f"unknown XFORWARD attribute {attr[:32]!r}")
        updates[attr.lower()] = _xforward_value(attr, value)
    base = current if current is not None else Forwarded()
    return dataclasses.replace(base, **updates)  # type: ignore[arg-type]


# -- sending ---------------------------------------------------------------------


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+", "=" and anything outside "!".."~" as ``+XX``."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)


def _wire_value(value: str | int | None) -> str:
    """One attribute value on the wire; "[UNAVAILABLE]" when unknown or unfit.

    Only printable ASCII without spaces, at most 255 characters once encoded,
    is passed on: the gateway's own listener refuses anything else with a 501
    (Postfix mangles it), and a refused XFORWARD would lose every other
    attribute too.
    """
    text = "" if value is None else str(value)
    if not text or not all("!" <= c <= "~" for c in text):
        return "[UNAVAILABLE]"
    encoded = _xtext(text)
    return encoded if len(encoded) <= XFORWARD_VALUE_MAX else "[UNAVAILABLE]"


def xforward_arguments(client: Forwarded, offered: str) -> list[bytes]:
    """The arguments of the XFORWARD commands for ``client``; one per command.

    ``offered`` is the downstream's EHLO parameter list ("NAME ADDR ..."); only
    those attributes are sent (XFORWARD_README: others get a 501). Each line
    stays within XFORWARD_LINE_MAX.
    """
    names = {name.upper() for name in offered.split()}
    commands: list[bytes] = []
    line = b""
    for attr in XFORWARD_ATTRIBUTES:
        if attr not in names:
            continue
        item = f"{attr}={_wire_value(getattr(client, attr.lower()))}".encode("ascii")
        if line and len(b"XFORWARD " + line + b" " + item + b"\r\n") > XFORWARD_LINE_MAX:
            commands.append(line)
            line = b""
        line = line + b" " + item if line else item
    if line:
        commands.append(line)
    return commands
