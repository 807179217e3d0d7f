"""RAR member content from libarchive's ``bsdtar``, bounded in bytes and time.

There is no RAR decompressor on the package registries we could run in-process
(``rarfile`` parses headers and shells out for compressed data), so a child
process does it: ``bsdtar -cf - --format pax @-`` reads the archive on stdin
and writes its members, decompressed, as one pax tar stream on stdout. One
process per archive, not per member (bsdtar starts in ~5 ms, unar in ~85 ms;
a solid archive is decompressed once). bsdtar reads RAR 4 and RAR 5, solid
RAR 5 included; RAR 4 *solid* archives it refuses, and their members are
reported unreadable.

Every byte that comes out of the pipe is charged to the message's budget, and
every read waits at most until the budget's deadline: past either the child is
killed and the archive is a bomb. The archive reaches the child through an
anonymous in-memory file (``memfd_create``), never a named file on disk.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from policies._archives import ArchiveBombError, Budget, WantFull, read_head

__all__ = ["Extracted", "Extraction", "extract"]

_TOOL = "bsdtar"
_ERR_LIMIT = 300


@dataclass(frozen=True, slots=True)
class Extracted:
    data: bytes  # the head, or the whole member when it is itself a container
    complete: bool


@dataclass(slots=True)
class Extraction:
    members: dict[str, Extracted] = field(default_factory=dict)
    problem: str = ""  # why some or all members could not be extracted, in words


class _BoundedPipe(io.RawIOBase):
    """The child's stdout: each read charged to the budget and bounded by its deadline."""

    def __init__(self, fd: int, where: str, budget: Budget) -> None:
        super().__init__()
        self._fd = fd
        self._where = where
        self._budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self._budget.deadline - time.monotonic()
        ready = select.select([self._fd], [], [], left)[0] if left > 0 else []
        if not ready:
            raise ArchiveBombError(f"{self._where}: inspection exceeded the time limit")
        data = os.read(self._fd, len(buffer))
        buffer[: len(data)] = data
        self._budget.take(len(data), self._where)
        return len(data)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[IO[bytes]]:
    """An anonymous file holding ``data``, positioned at 0, for a child's stdin."""
    if hasattr(os, "memfd_create"):
        fh: IO[bytes] = os.fdopen(os.memfd_create("rar", os.MFD_CLOEXEC), "w+b")
    else:  # not Linux: an unnamed temporary file
        fh = tempfile.TemporaryFile()  # noqa: SIM115  # closed by the with below
    with fh:
        fh.write(data)
        fh.flush()
        fh.seek(0)
        yield fh


def extract(data: bytes, name: str, budget: Budget, want_full: WantFull) -> Extraction:
    """Members of the RAR ``data`` by name; raises ArchiveBombError past the budget."""
    tool = shutil.which(_TOOL)
    if tool is None:
        return Extraction(problem="no RAR extractor: install bsdtar (Debian: libarchive-tools)")
    out = Extraction()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    with _memory_file(data) as stdin, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [tool, "-c", "-f", "-", "--format", "pax", "@-"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
        assert proc.stdout is not None
        finished = False
        try:
            pipe = _BoundedPipe(proc.stdout.fileno(), name, budget)
            with tarfile.open(fileobj=pipe, mode="r|") as tf:
                for ti in tf:
                    if not ti.isfile():
                        continue
                    fh = tf.extractfile(ti)
                    if fh is None:
                        continue
                    content = read_head(fh, ti.size)
                    if len(content) < ti.size and want_full(ti.name, content):
                        content += fh.read()  # already charged, byte by byte, by the pipe
                    out.members[ti.name] = Extracted(content, len(content) >= ti.size)
            finished = True
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            out.problem = f"extraction failed ({type(exc).__name__})"
        finally:
            if finished:  # the stream ended: let bsdtar exit and say why it stopped, if it did
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, budget.deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.wait()
        if proc.returncode not in (0, -9):
            err.seek(0)
            text = err.read(_ERR_LIMIT).decode("utf-8", "replace")
            line = next((ln for ln in text.splitlines() if ln.strip()), "")
            line = line.removeprefix("bsdtar: ").removeprefix("Error reading archive -: ")
            out.problem = (
                out.problem or line.strip().rstrip(".") or f"bsdtar exit {proc.returncode}"
            )
    return out
