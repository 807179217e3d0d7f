"""The message as the MTA holds it, rebuilt from milter chunks, and the header edits back.

Postfix sends each header field as name and value (continuation lines joined
by a bare LF, the value's leading space kept when ``SMFIP_HDR_LEADSPC`` was
negotiated), then end-of-header, then the body in chunks with CRLF line ends.
:class:`MessageBuilder` puts exactly those bytes back together in wire form
(CRLF everywhere, the empty line between header and body), so a DKIM
signature that verifies at the MTA verifies in the engine.

:func:`header_edits` turns the gateway's header surgery into milter edits:
the untrusted incoming fields (``X-Spam-*``, ``Authentication-Results`` with
our authserv-id) deleted by name and index, our fields inserted at the top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.headers import iter_fields

__all__ = ["Budget", "HeaderEdit", "MessageBuilder", "header_edits"]


class Budget(Protocol):
    """Message bytes held in memory across every session (``server.max_data_memory``)."""

    def take(self, n: int) -> bool: ...
    def give(self, n: int) -> None: ...


class MessageBuilder:
    """One message's bytes, bounded by ``max_size`` and the shared :class:`Budget`.

    Over ``max_size`` or out of budget the builder drops what it holds and
    only counts from then on (``too_big`` / ``no_memory``): the MTA still
    sends the rest, and the reply at end of message refuses it.
    """

    def __init__(self, max_size: int, budget: Budget, *, leading_space: bool) -> None:
        self.max_size = max_size
        self.budget = budget
        self.leading_space = leading_space
        self.size = 0
        self.too_big = False
        self.no_memory = False
        self.in_body = False
        self._parts: list[bytes] = []
        self._held = 0  # bytes taken from the budget

    @property
    def failed(self) -> bool:
        return self.too_big or self.no_memory

    def header(self, name: bytes, value: bytes) -> None:
        if not self.leading_space and value[:1] not in (b" ", b"\t"):
            # The MTA ate one space after the colon; "Subject:x" cannot be told apart.
            value = b" " + value
        if b"\n" in value:
            value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._add(name + b":" + value + b"\r\n")

    def end_of_header(self) -> None:
        self.in_body = True
        self._add(b"\r\n")

    def body(self, chunk: bytes) -> None:
        if not self.in_body:  # no EOH step (negotiated away by an older MTA): the separator
            self.end_of_header()
        self._add(chunk)

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.failed:
            return
        if self.size > self.max_size:
            self.too_big = True
            self.release()
            return
        if not self.budget.take(len(data)):
            self.no_memory = True
            self.release()
            return
        self._held += len(data)
        self._parts.append(data)

    def finish(self) -> bytes:
        """The whole message (header, empty line, body) as the MTA has it."""
        if not self.in_body:
            self.end_of_header()
        raw = b"".join(self._parts)
        self._parts = [raw]
        return raw

    def release(self) -> None:
        """Give the bytes back to the budget (after the hand-off, on abort, on close)."""
        self._parts = []
        if self._held:
            self.budget.give(self._held)
            self._held = 0


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """One header change: insert at ``index`` (0 = top) or, with ``delete``, remove the
    ``index``-th field called ``name`` (from 1, counted as the MTA received them)."""

    name: bytes
    value: bytes
    index: int
    delete: bool = False


def header_edits(
    raw: bytes,
    drop: Callable[[bytes, bytes], bool],
    fields: Sequence[str],
    *,
    leading_space: bool,
) -> list[HeaderEdit]:
    """Deletions of the fields ``drop`` picks, then insertions of ``fields`` at the top.

    Deletions go last field first: removing one renumbers the same-named
    fields after it (in Postfix), never the ones before. Insertions at index
    0 go in reverse, so the fields end up in the order given; the deletions'
    indices were counted before any insertion, which is why they go first.
    """
    edits: list[HeaderEdit] = []
    seen: dict[bytes, int] = {}
    for start, end, name in iter_fields(raw):
        if not name:
            continue
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        if drop(name, raw[start:end]):
            edits.append(HeaderEdit(name, b"", seen[key], delete=True))
    edits.reverse()
    for text in reversed(fields):
        label, _, value = text.partition(":")
        # Continuation lines travel joined by a bare LF, as the MTA sends them to us.
        body = value.replace("\r\n", "\n")
        if not leading_space:
            body = body.removeprefix(" ")
        edits.append(HeaderEdit(label.encode("ascii"), body.encode("utf-8"), 0))
    return edits
