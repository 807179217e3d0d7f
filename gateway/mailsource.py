"""Where stored mail comes from: files, directories, Maildir, mbox, the quarantine.

``learn`` and ``replay`` read the same sources. :func:`walk` yields cheap
references (:class:`Item`, a path and an offset, or a quarantine id) and
:class:`Problem` lines for what cannot be read; :func:`read_item` fetches one
message's bytes. An mbox is scanned in fixed-size chunks for its ``From ``
lines, never loaded whole, and each message in it is capped at the gateway's
``server.max_message_size``: a 10 GB mbox costs a few MB of memory.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

__all__ = [
    "QUARANTINE",
    "Item",
    "Problem",
    "Source",
    "label_of",
    "looks_like_mail",
    "mbox_spans",
    "read_file_item",
    "walk",
]

QUARANTINE = "quarantine:"  # the path that names the config's quarantine store
LABELS = ("spam", "ham")
_CHUNK = 1 << 20  # bytes of an mbox scanned per read
_HEAD = rb"^(?:From |[\x21-\x39\x3b-\x7e]{1,128}:)"  # an mbox line or a header field name
_MAIL_START = re.compile(_HEAD)


@dataclass(frozen=True, slots=True)
class Source:
    """One PATH argument and the label its messages carry (``spam``, ``ham`` or empty)."""

    path: str
    label: str = ""


@dataclass(frozen=True, slots=True)
class Item:
    """One message to read, by reference: small enough to send to a worker process.

    ``kind`` is ``file`` (the whole file), ``mbox`` (``length`` bytes at
    ``offset``, its ``From `` line included) or ``quarantine`` (``ref`` is the id).
    """

    name: str  # what reports show: the path, "path#n" in an mbox, "quarantine:<id>"
    kind: Literal["file", "mbox", "quarantine"]
    ref: str
    label: str = ""
    offset: int = 0
    length: int = 0


@dataclass(frozen=True, slots=True)
class Problem:
    """Something named on the command line that yields no message, and why."""

    name: str
    reason: str


def label_of(path: str) -> str:
    """``spam`` or ``ham`` for a path named so (``spam/``, ``ham.mbox``), else empty."""
    stem = Path(path.rstrip("/")).stem.lower()
    return stem if stem in LABELS else ""


def looks_like_mail(data: bytes) -> bool:
    """Does ``data`` start like a message (a header field) or an mbox (``From ``)?"""
    return bool(_MAIL_START.match(data[:200]))


def walk(sources: Sequence[Source], limit: int) -> Iterator[Item | Problem]:
    """Every message under ``sources``, in a stable order; quarantine ids are not listed here.

    A directory is walked in name order (hidden entries skipped; in a Maildir
    only ``cur`` and ``new``), an mbox is split into its messages, anything
    else is one message. ``limit`` is the largest message read.
    """
    for source in sources:
        path = Path(source.path)
        if not path.exists():
            yield Problem(source.path, "no such file or directory")
        elif path.is_dir():
            for file in _files(path):
                yield from _file_items(file, source.label, limit)
        else:
            yield from _file_items(path, source.label, limit)


def _files(root: Path) -> Iterator[Path]:
    for top, dirs, files in os.walk(root, onerror=None):
        here = set(dirs)
        if {"cur", "new"} <= here:  # a Maildir: tmp holds mail still being delivered
            dirs[:] = ["cur", "new"]
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                yield Path(top) / f


def _file_items(path: Path, label: str, limit: int) -> Iterator[Item | Problem]:
    name = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open() for ever
            yield Problem(name, "not a regular file")
            return
        with open(path, "rb") as fh:
            head = fh.read(5)
            if head == b"From ":
                yield from _mbox_items(fh, name, label, limit)
                return
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        yield Problem(name, f"cannot read: {exc.strerror or exc}")
        return
    if size > limit:
        yield Problem(name, f"{size} bytes, over server.max_message_size ({limit})")
    elif size == 0:
        yield Problem(name, "empty file")
    else:
        yield Item(name, "file", name, label)


def _mbox_items(fh: BinaryIO, name: str, label: str, limit: int) -> Iterator[Item | Problem]:
    fh.seek(0)
    for n, (start, end) in enumerate(mbox_spans(fh), 1):
        where = f"{name}#{n}"
        if end - start > limit + 1024:  # the From line and separator on top of the message
            yield Problem(where, f"{end - start} bytes, over server.max_message_size ({limit})")
        else:
            yield Item(where, "mbox", name, label, start, end - start)


def mbox_spans(fh: BinaryIO, chunk: int = _CHUNK) -> Iterator[tuple[int, int]]:
    """(start, end) byte offsets of each message of an mbox, its ``From `` line included.

    Reads ``chunk`` bytes at a time; a ``From `` line is one at the start of
    the file or after a newline (mboxo/mboxrd quote body lines as ``>From``).
    """
    base = 0
    tail = b"\n"  # as if a line ended before the file: a From line at offset 0 counts
    start: int | None = None
    while True:
        data = fh.read(chunk)
        if not data:
            break
        window = tail + data
        origin = base - len(tail)
        pos = window.find(b"\nFrom ")
        while pos >= 0:
            offset = origin + pos + 1
            if start is not None:
                yield start, offset
            start = offset
            pos = window.find(b"\nFrom ", pos + 1)
        base += len(data)
        tail = window[-5:]
    if start is not None and base > start:
        yield start, base


def read_file_item(item: Item) -> bytes:
    """The bytes of a ``file`` or ``mbox`` item: an mbox message without its ``From `` line."""
    with open(item.ref, "rb") as fh:
        if item.kind == "file":
            return fh.read()
        fh.seek(item.offset)
        data = fh.read(item.length)
    first = data.find(b"\n")
    body = data[first + 1 :] if first >= 0 else b""
    # The blank line before the next From line is the separator, not the message's.
    if body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    elif body.endswith(b"\n\n"):
        body = body[:-1]
    return body
