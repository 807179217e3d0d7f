"""The Sendmail/Postfix milter wire format (protocol version 6), both directions.

A packet is a 4-byte big-endian length, one command byte and the payload
(libmilter's ``mfdef.h`` and Postfix's ``milter8.c`` are the references).
Strings are NUL-terminated; header values and body chunks stay bytes, so the
message can be rebuilt exactly. Nothing here does I/O except
:func:`read_packet`, which bounds the length before it reads a byte of payload.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "Connect",
    "MilterProtocolError",
    "decode_connect",
    "decode_macros",
    "decode_optneg",
    "decode_strings",
    "encode",
    "encode_chgheader",
    "encode_insheader",
    "encode_optneg",
    "encode_replycode",
    "read_packet",
]

# MTA -> milter commands (SMFIC_*)
ABORT: Final = b"A"
BODY: Final = b"B"
CONNECT: Final = b"C"
MACRO: Final = b"D"
BODYEOB: Final = b"E"
HELO: Final = b"H"
QUIT_NC: Final = b"K"  # quit, but a new connection follows on the same socket
HEADER: Final = b"L"
MAIL: Final = b"M"
EOH: Final = b"N"
OPTNEG: Final = b"O"
QUIT: Final = b"Q"
RCPT: Final = b"R"
DATA: Final = b"T"
UNKNOWN: Final = b"U"

# milter -> MTA replies (SMFIR_*)
ACCEPT: Final = b"a"
CONTINUE: Final = b"c"
DISCARD: Final = b"d"
CHGHEADER: Final = b"m"
INSHEADER: Final = b"i"
REPLYCODE: Final = b"y"

# Actions the milter may request (SMFIF_*)
SMFIF_ADDHDRS: Final = 0x001
SMFIF_CHGHDRS: Final = 0x010
SMFIF_SETSYMLIST: Final = 0x100

# Protocol steps and options (SMFIP_*)
SMFIP_NOCONNECT: Final = 0x000001
SMFIP_NOHELO: Final = 0x000002
SMFIP_NOMAIL: Final = 0x000004
SMFIP_NORCPT: Final = 0x000008
SMFIP_NOBODY: Final = 0x000010
SMFIP_NOHDRS: Final = 0x000020
SMFIP_NOEOH: Final = 0x000040
SMFIP_NR_HDR: Final = 0x000080
SMFIP_NOUNKNOWN: Final = 0x000100
SMFIP_NODATA: Final = 0x000200
SMFIP_SKIP: Final = 0x000400
SMFIP_RCPT_REJ: Final = 0x000800
SMFIP_NR_CONN: Final = 0x001000
SMFIP_NR_HELO: Final = 0x002000
SMFIP_NR_MAIL: Final = 0x004000
SMFIP_NR_RCPT: Final = 0x008000
SMFIP_NR_DATA: Final = 0x010000
SMFIP_NR_UNKN: Final = 0x020000
SMFIP_NR_EOH: Final = 0x040000
SMFIP_NR_BODY: Final = 0x080000
SMFIP_HDR_LEADSPC: Final = 0x100000

# Macro stages for the symbol list in the OPTNEG reply (SMFIM_*)
SMFIM_CONNECT: Final = 0
SMFIM_HELO: Final = 1
SMFIM_ENVFROM: Final = 2
SMFIM_ENVRCPT: Final = 3
SMFIM_DATA: Final = 4
SMFIM_EOM: Final = 5
SMFIM_EOH: Final = 6

FAMILY_UNKNOWN: Final = b"U"
FAMILY_UNIX: Final = b"L"
FAMILY_INET: Final = b"4"
FAMILY_INET6: Final = b"6"

_LENGTH = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")
_INDEX = struct.Struct("!I")
_PORT = struct.Struct("!H")


class MilterProtocolError(Exception):
    """The MTA side broke the protocol; ``reason`` is the metric label, the text says how."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


async def read_packet(reader: asyncio.StreamReader, max_size: int) -> tuple[bytes, bytes] | None:
    """The next (command, payload), or None at a clean end of stream between packets.

    The claimed length is checked against ``max_size`` before any payload is
    read, so a hostile length never makes us buffer it.
    """
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise MilterProtocolError("truncated", "connection closed inside a packet length") from None
    (length,) = _LENGTH.unpack(head)
    if length == 0:
        raise MilterProtocolError("malformed", "packet of length 0 has no command")
    if length > max_size:
        raise MilterProtocolError(
            "oversized", f"packet claims {length} bytes, more than the limit of {max_size}"
        )
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise MilterProtocolError(
            "truncated", f"connection closed after {len(exc.partial)} of {length} packet bytes"
        ) from None
    return body[:1], body[1:]


def encode(cmd: bytes, payload: bytes = b"") -> bytes:
    return _LENGTH.pack(len(payload) + 1) + cmd + payload


# --- decoding MTA commands ------------------------------------------------------


def decode_optneg(payload: bytes) -> tuple[int, int, int]:
    """(version, actions, protocol) the MTA offers."""
    if len(payload) < _OPTNEG.size:
        raise MilterProtocolError("malformed", f"option negotiation of {len(payload)} bytes")
    version, actions, protocol = _OPTNEG.unpack_from(payload)
    return int(version), int(actions), int(protocol)


def decode_strings(payload: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings (MAIL/RCPT arguments, HELO, HEADER name and value)."""
    if not payload.endswith(b"\0"):
        raise MilterProtocolError("malformed", f"{what}: string not NUL-terminated")
    return payload[:-1].split(b"\0")


def decode_macros(payload: bytes) -> tuple[bytes, dict[str, str]]:
    """(command the macros are for, {name without braces: value})."""
    if not payload:
        raise MilterProtocolError("malformed", "macro packet without a command code")
    stage, rest = payload[:1], payload[1:]
    if not rest:
        return stage, {}
    parts = decode_strings(rest, "macros")
    if len(parts) % 2:
        raise MilterProtocolError("malformed", "macros: a name without a value")
    macros: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        name = parts[i].decode("ascii", "replace")
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        macros[name] = parts[i + 1].decode("utf-8", "replace")
    return stage, macros


@dataclass(frozen=True, slots=True)
class Connect:
    """SMFIC_CONNECT: the SMTP client as the MTA saw it."""

    hostname: str  # the client's verified name, or "[ip]" when it has none
    family: bytes  # FAMILY_*
    port: int
    address: str  # IP address or socket path; "" for FAMILY_UNKNOWN


def decode_connect(payload: bytes) -> Connect:
    end = payload.find(b"\0")
    if end < 0 or end + 2 > len(payload):
        raise MilterProtocolError("malformed", "connect: no host name and address family")
    hostname = payload[:end].decode("utf-8", "replace")
    family = payload[end + 1 : end + 2]
    if family == FAMILY_UNKNOWN:
        return Connect(hostname, family, 0, "")
    if family not in (FAMILY_UNIX, FAMILY_INET, FAMILY_INET6):
        raise MilterProtocolError("malformed", f"connect: unknown address family {family!r}")
    rest = payload[end + 2 :]
    if len(rest) < _PORT.size + 1 or not rest.endswith(b"\0"):
        raise MilterProtocolError("malformed", "connect: port or address missing")
    (port,) = _PORT.unpack_from(rest)
    address = rest[_PORT.size : -1]
    if b"\0" in address:
        raise MilterProtocolError("malformed", "connect: NUL inside the address")
    return Connect(hostname, family, int(port), address.decode("ascii", "replace"))


# --- encoding milter replies ------------------------------------------------------


def encode_optneg(version: int, actions: int, protocol: int, macros: dict[int, str]) -> bytes:
    """Our OPTNEG reply; ``macros`` asks for the macros we read at each stage (v6)."""
    payload = _OPTNEG.pack(version, actions, protocol)
    for stage, names in sorted(macros.items()):
        payload += _INDEX.pack(stage) + names.encode("ascii") + b"\0"
    return encode(OPTNEG, payload)


def encode_replycode(reply: str) -> bytes:
    """SMFIR_REPLYCODE: "550 5.7.1 text" as the MTA should answer the client.

    Sendmail reads the text as a format string and Postfix undoubles ``%%``,
    so a literal ``%`` goes on the wire doubled.
    """
    clean = reply.replace("\0", " ").replace("\r", " ").replace("\n", " ").replace("%", "%%")
    return encode(REPLYCODE, clean.encode("utf-8", "replace") + b"\0")


def _header_payload(index: int, name: bytes, value: bytes) -> bytes:
    return _INDEX.pack(index) + name + b"\0" + value + b"\0"


def encode_insheader(index: int, name: bytes, value: bytes) -> bytes:
    """SMFIR_INSHEADER: index 0 is the top of the header, above the MTA's own Received:."""
    return encode(INSHEADER, _header_payload(index, name, value))


def encode_chgheader(index: int, name: bytes, value: bytes) -> bytes:
    """SMFIR_CHGHEADER: the ``index``-th field named ``name`` (from 1); empty value deletes."""
    return encode(CHGHEADER, _header_payload(index, name, value))
