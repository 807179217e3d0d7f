"""The MTA side of the milter protocol, for tests: what Postfix's smtpd/cleanup send.

:class:`MilterClient` speaks to a milter over TCP or a unix socket with plain
blocking sockets. ``message()`` sends a whole message the way Postfix does
(each header field as name and value with bare-LF continuation lines, the
leading space kept only when negotiated, end of header, the body in 64 KB
chunks with CRLF line ends) and returns the replies to end of message.
``raw()`` sends arbitrary bytes, for hostile-packet tests. :func:`apply_edits`
applies header edits with Postfix's semantics, to check a milter's edits
without an MTA.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ALL_PROTOCOL", "Edit", "EomReply", "MilterClient", "apply_edits", "split_fields"]

ALL_ACTIONS = 0x1FF  # what Postfix 3.x offers: every SMFIF_* through SETSYMLIST
ALL_PROTOCOL = 0x1FFFFF  # every SMFIP_* step flag, NR_* and HDR_LEADSPC
CHUNK = 65535  # MILTER_CHUNK_SIZE
_NR = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000, b"U": 0x20000}
_NR.update({b"L": 0x80, b"N": 0x40000, b"B": 0x80000})
_FINAL = frozenset(b"acdrty")  # accept, continue, discard, reject, tempfail, replycode


@dataclass(frozen=True, slots=True)
class Edit:
    """A header edit the milter asked for: ``kind`` is "insert" or "change"."""

    kind: str
    index: int
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class EomReply:
    """The replies to end of message: the edits, then the final command (and its text)."""

    edits: tuple[Edit, ...]
    final: bytes  # b"a", b"c", b"d", b"y", ...
    text: str = ""  # for b"y": the SMTP reply


def split_fields(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(header fields as (name, value-after-colon with LF continuations), body) of a
    CRLF message, as Postfix's cleanup holds them."""
    end = raw.find(b"\r\n\r\n")
    head, body = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 4 :])
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name.rstrip(b" \t"), value))
    return fields, body


class MilterClient:
    """One connection to a milter; ``address`` is (host, port) or a socket path."""

    def __init__(self, address: tuple[str, int] | str, timeout: float = 30.0) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""
        self.protocol = 0
        self.actions = 0
        self.version = 0
        self.macro_lists: dict[int, str] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- packets ------------------------------------------------------------------

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, cmd: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(payload) + 1) + cmd + payload)

    def recv(self) -> tuple[bytes, bytes] | None:
        """The next packet from the milter, or None when it closed the connection."""
        while True:
            if len(self.buf) >= 4:
                (length,) = struct.unpack("!I", self.buf[:4])
                if len(self.buf) >= 4 + length:
                    packet = self.buf[4 : 4 + length]
                    self.buf = self.buf[4 + length :]
                    return packet[:1], packet[1:]
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data

    def closed_by_peer(self) -> bool:
        """True once the milter closed the connection (waits up to the socket timeout)."""
        try:
            return self.recv() is None
        except ConnectionError:
            return True

    def step(self, cmd: bytes, payload: bytes = b"") -> tuple[bytes, bytes] | None:
        """Send one step; read the reply unless that step was negotiated no-reply."""
        self.send(cmd, payload)
        if self.protocol & _NR.get(cmd, 0):
            return None
        reply = self.recv()
        if reply is None:
            raise ConnectionError(f"milter closed the connection after {cmd!r}")
        return reply

    # -- the conversation -------------------------------------------------------

    def negotiate(
        self, version: int = 6, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL
    ) -> tuple[int, int, int]:
        self.send(b"O", struct.pack("!III", version, actions, protocol))
        reply = self.recv()
        if reply is None or reply[0] != b"O":
            raise ConnectionError(f"no option negotiation reply: {reply!r}")
        self.version, self.actions, self.protocol = struct.unpack("!III", reply[1][:12])
        rest = reply[1][12:]
        while len(rest) >= 5:
            (stage,) = struct.unpack("!I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            self.macro_lists[stage] = names.decode()
        return self.version, self.actions, self.protocol

    def macros(self, stage: bytes, values: Mapping[str, str]) -> None:
        if values:
            payload = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
            self.send(b"D", stage + payload)

    def connect(
        self, hostname: str = "client.test", address: str = "192.0.2.10", port: int = 40000
    ) -> None:
        family = b"6" if ":" in address else b"4"
        payload = hostname.encode() + b"\0" + family + struct.pack("!H", port)
        self.step(b"C", payload + address.encode() + b"\0")

    def helo(self, name: str) -> None:
        self.step(b"H", name.encode() + b"\0")

    def mail(self, sender: str, *args: str) -> None:
        self.step(b"M", b"".join(a.encode() + b"\0" for a in (f"<{sender}>", *args)))

    def rcpt(self, recipient: str) -> None:
        self.step(b"R", f"<{recipient}>".encode() + b"\0")

    def content(self, raw: bytes, eom_macros: Mapping[str, str] | None = None) -> EomReply:
        """Header fields, end of header, body chunks and end of message, as Postfix sends them."""
        fields, body = split_fields(raw)
        leadspc = bool(self.protocol & 0x100000)
        for name, value in fields:
            if not leadspc and value.startswith(b" "):
                value = value[1:]
            self.step(b"L", name + b"\0" + value + b"\0")
        self.step(b"N")
        for start in range(0, len(body), CHUNK):
            self.step(b"B", body[start : start + CHUNK])
        self.macros(b"E", eom_macros or {})
        self.send(b"E")
        return self.eom_reply()

    def eom_reply(self) -> EomReply:
        edits: list[Edit] = []
        while True:
            reply = self.recv()
            if reply is None:
                raise ConnectionError("milter closed the connection at end of message")
            cmd, payload = reply
            if cmd in (b"i", b"m"):
                (index,) = struct.unpack("!I", payload[:4])
                name, value, _ = payload[4:].split(b"\0", 2)
                edits.append(Edit("insert" if cmd == b"i" else "change", index, name, value))
            elif cmd == b"p":
                continue
            elif cmd[0] in _FINAL:
                text = payload.rstrip(b"\0").decode() if cmd == b"y" else ""
                return EomReply(tuple(edits), cmd, text)
            else:
                raise ConnectionError(f"unexpected reply {cmd!r} at end of message")

    def message(
        self,
        raw: bytes,
        *,
        mail_from: str = "alice@sender.test",
        rcpt_to: Sequence[str] = ("bob@example.org",),
        queue_id: str = "4ABCDE1234",
    ) -> EomReply:
        """MAIL, RCPT..., the content and end of message (after CONNECT and HELO)."""
        self.macros(b"M", {"i": queue_id})
        self.mail(mail_from)
        for rcpt in rcpt_to:
            self.rcpt(rcpt)
        self.macros(b"N", {"i": queue_id})
        return self.content(raw, {"i": queue_id})

    def quit(self) -> None:
        self.send(b"Q")


def apply_edits(raw: bytes, edits: Sequence[Edit], *, leading_space: bool = True) -> bytes:
    """``raw`` with ``edits`` applied the way Postfix's cleanup does (no Received: of its own)."""
    fields, body = split_fields(raw)
    for edit in edits:
        value = edit.value if leading_space else b" " + edit.value
        if edit.kind == "insert":
            fields.insert(edit.index, (edit.name, value))
            continue
        count = 0
        for i, (name, _) in enumerate(fields):
            if name.lower() == edit.name.lower():
                count += 1
                if count == max(edit.index, 1):
                    if edit.value:
                        fields[i] = (name, value)
                    else:
                        del fields[i]
                    break
    head = b"".join(n + b":" + v.replace(b"\n", b"\r\n") + b"\r\n" for n, v in fields)
    return head + b"\r\n" + body
