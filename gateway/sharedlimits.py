"""Session limits and the data memory budget held across ``server.workers`` processes.

Pre-forked workers share one listening socket and the kernel hands each
connection to whichever worker accepts first, so limits counted per process
would multiply by the number of workers (and a client's 21st session could
land on a worker that has seen only 10). The supervisor creates one table in
shared memory before forking; every worker counts in it, so
``server.max_sessions``, ``max_sessions_per_ip``, ``proxy_max_connections``
and ``max_data_memory`` hold for the whole gateway.

The table is a file mapped ``MAP_SHARED`` and unlinked at once (only the
inherited descriptor keeps it), guarded by a POSIX record lock (``lockf``) on
that descriptor: the kernel drops a lock whose holder dies, so a worker that
crashes mid-update cannot wedge the others. Counts are kept per worker, so
when the supervisor replaces a dead worker it first clears that worker's
share (:meth:`SharedCounters.reset_worker`) instead of leaking its sessions.

Layout: a header, per-worker session and data totals, then an open-addressing
hash table (linear probing, backward-shift deletion, so no tombstones pile up)
of 16-byte keys (BLAKE2b of the client key) each with a count per worker.
The table is sized for four times ``max_sessions`` at start; should it ever
fill (``max_sessions`` raised a lot by a reload), new sessions are refused
(421, ``max_sessions``) rather than counted wrongly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator

from gateway.budget import DataBudget
from gateway.smtp import SessionLimits

__all__ = ["SharedCounters", "SharedDataBudget", "SharedSessionLimits", "create", "current"]

_MAGIC = b"GWLIMIT1"
_HEADER = struct.Struct("<8sII")  # magic, workers, slots
_KEY = 16

_current: SharedCounters | None = None


def create(workers: int, max_sessions: int) -> SharedCounters:
    """Make the table (in the supervisor, before forking); workers find it with current()."""
    global _current
    slots = 4096
    while slots < 4 * max_sessions:
        slots *= 2
    _current = SharedCounters(workers, slots)
    return _current


def current() -> SharedCounters | None:
    """The table the supervisor created, or None in a single-process gateway."""
    return _current


class SharedCounters:
    """Counts by worker: sessions, data bytes, and per-key connections (client, proxy)."""

    def __init__(self, workers: int, slots: int) -> None:
        if slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self.workers = workers
        self.slots = slots
        self._counts = struct.Struct(f"<{workers}i")
        self._totals = struct.Struct(f"<{workers}q")
        self._slot_size = _KEY + self._counts.size
        self._sessions_at = _HEADER.size
        self._data_at = self._sessions_at + self._totals.size
        self._table_at = self._data_at + self._totals.size
        size = self._table_at + slots * self._slot_size
        fd, path = tempfile.mkstemp(prefix="gateway-limits-")
        try:
            os.unlink(path)  # the descriptor (inherited by the workers) keeps it
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HEADER.pack_into(self._map, 0, _MAGIC, workers, slots)

    # -- the lock ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    # -- per-worker totals ---------------------------------------------------

    def _total(self, at: int) -> int:
        return sum(self._totals.unpack_from(self._map, at))

    def _add(self, at: int, worker: int, n: int) -> None:
        pos = at + 8 * worker
        (value,) = struct.unpack_from("<q", self._map, pos)
        struct.pack_into("<q", self._map, pos, max(0, value + n))

    # -- the hash table ------------------------------------------------------

    def _slot(self, i: int) -> int:
        return self._table_at + i * self._slot_size

    def _key_at(self, i: int) -> bytes:
        at = self._slot(i)
        return bytes(self._map[at : at + _KEY])

    def _home(self, key: bytes) -> int:
        return int.from_bytes(key[8:], "little") & (self.slots - 1)

    def _find(self, key: bytes) -> tuple[int, bool]:
        """(slot, found): the key's slot, or the empty slot where it would go (-1: full)."""
        i = self._home(key)
        for _ in range(self.slots):
            have = self._key_at(i)
            if have == key:
                return i, True
            if not any(have):
                return i, False
            i = (i + 1) & (self.slots - 1)
        return -1, False

    def _sum(self, i: int) -> int:
        return sum(self._counts.unpack_from(self._map, self._slot(i) + _KEY))

    def _bump(self, i: int, worker: int, n: int) -> None:
        at = self._slot(i) + _KEY + 4 * worker
        (value,) = struct.unpack_from("<i", self._map, at)
        struct.pack_into("<i", self._map, at, max(0, value + n))

    def _delete(self, i: int) -> None:
        """Empty slot ``i``, moving later entries of its probe run back (Knuth's Algorithm R)."""
        mask = self.slots - 1
        j = i
        while True:
            j = (j + 1) & mask
            key = self._key_at(j)
            if not any(key):
                break
            home = self._home(key)
            # The entry at j may move to i unless its home lies cyclically in (i, j].
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                src, dst = self._slot(j), self._slot(i)
                self._map[dst : dst + self._slot_size] = self._map[src : src + self._slot_size]
                i = j
        at = self._slot(i)
        self._map[at : at + self._slot_size] = bytes(self._slot_size)

    @staticmethod
    def _hash(kind: str, key: str) -> bytes:
        digest = bytearray(hashlib.blake2b(f"{kind}:{key}".encode(), digest_size=_KEY).digest())
        digest[0] |= 1  # never all zero: that marks an empty slot
        return bytes(digest)

    def count(self, kind: str, key: str) -> int:
        """Connections counted for ``key`` (all workers)."""
        with self._locked():
            i, found = self._find(self._hash(kind, key))
            return self._sum(i) if found else 0

    # -- operations ----------------------------------------------------------

    def acquire_session(
        self, worker: int, key: str, max_total: int, max_per_key: int
    ) -> str | None:
        """Admit a session of client ``key``; None, or the refusal reason."""
        digest = self._hash("ip", key)
        with self._locked():
            if self._total(self._sessions_at) >= max_total:
                return "max_sessions"
            i, found = self._find(digest)
            if i < 0:
                return "max_sessions"  # the table is full: never count wrongly
            if found and self._sum(i) >= max_per_key:
                return "max_sessions_per_ip"
            if not found:
                at = self._slot(i)
                self._map[at : at + _KEY] = digest
            self._bump(i, worker, 1)
            self._add(self._sessions_at, worker, 1)
            return None

    def release_session(self, worker: int, key: str) -> None:
        with self._locked():
            self._add(self._sessions_at, worker, -1)
            self._release(worker, self._hash("ip", key))

    def acquire_key(self, worker: int, kind: str, key: str, limit: int) -> bool:
        """Count one more for ``key`` unless it already has ``limit``."""
        digest = self._hash(kind, key)
        with self._locked():
            i, found = self._find(digest)
            if i < 0 or (found and self._sum(i) >= limit):
                return False
            if not found:
                at = self._slot(i)
                self._map[at : at + _KEY] = digest
            self._bump(i, worker, 1)
            return True

    def release_key(self, worker: int, kind: str, key: str) -> None:
        with self._locked():
            self._release(worker, self._hash(kind, key))

    def _release(self, worker: int, digest: bytes) -> None:
        i, found = self._find(digest)
        if not found:
            return
        self._bump(i, worker, -1)
        if self._sum(i) == 0:
            self._delete(i)

    def take_data(self, worker: int, n: int, limit: int) -> bool:
        with self._locked():
            if self._total(self._data_at) + n > limit:
                return False
            self._add(self._data_at, worker, n)
            return True

    def give_data(self, worker: int, n: int) -> None:
        with self._locked():
            self._add(self._data_at, worker, -n)

    def sessions(self) -> int:
        with self._locked():
            return self._total(self._sessions_at)

    def data_used(self) -> int:
        with self._locked():
            return self._total(self._data_at)

    def reset_worker(self, worker: int) -> None:
        """Forget everything ``worker`` counted (the supervisor, after it died)."""
        with self._locked():
            struct.pack_into("<q", self._map, self._sessions_at + 8 * worker, 0)
            struct.pack_into("<q", self._map, self._data_at + 8 * worker, 0)
            live = []
            for i in range(self.slots):
                key = self._key_at(i)
                if any(key):
                    counts = list(self._counts.unpack_from(self._map, self._slot(i) + _KEY))
                    counts[worker] = 0
                    if any(counts):
                        live.append((key, counts))
            start = self._table_at
            self._map[start : start + self.slots * self._slot_size] = bytes(
                self.slots * self._slot_size
            )
            for key, counts in live:
                i, _ = self._find(key)
                at = self._slot(i)
                self._map[at : at + _KEY] = key
                self._counts.pack_into(self._map, at + _KEY, *counts)


class SharedSessionLimits(SessionLimits):
    """:class:`SessionLimits` counted in the supervisor's table, as worker ``worker``."""

    def __init__(self, table: SharedCounters, worker: int) -> None:
        super().__init__()
        self.table = table
        self.worker = worker

    def acquire(self, ip: str, max_total: int, max_per_ip: int) -> str | None:
        return self.table.acquire_session(self.worker, self.key(ip), max_total, max_per_ip)

    def release(self, ip: str) -> None:
        self.table.release_session(self.worker, self.key(ip))

    def acquire_proxy(self, peer: str, max_connections: int) -> bool:
        return self.table.acquire_key(self.worker, "proxy", peer, max_connections)

    def release_proxy(self, peer: str) -> None:
        self.table.release_key(self.worker, "proxy", peer)


class SharedDataBudget(DataBudget):
    """:class:`DataBudget` over the whole gateway; ``used`` is this worker's share."""

    def __init__(self, table: SharedCounters, worker: int, limit: int) -> None:
        super().__init__(limit)
        self.table = table
        self.worker = worker

    def take(self, n: int) -> bool:
        if not self.table.take_data(self.worker, n, self.limit):
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        n = min(n, self.used)
        self.table.give_data(self.worker, n)
        self.used -= n
