"""WAL mode for SQLite files that several processes open at once.

Switching a database to WAL takes an exclusive lock, and SQLite may answer
"database is locked" at once instead of waiting for the busy timeout when
two connections convert or recover the same new file together (pre-forked
workers starting, the CLI opening beside the server). Seen in CI under load
as a worker's first state write failing. So the switch is retried until the
caller's timeout.
"""

from __future__ import annotations

import sqlite3
import time

__all__ = ["enable_wal"]

_RETRY_PAUSE = 0.02  # seconds between attempts


def enable_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Put ``db`` in WAL mode, retrying for up to ``timeout`` seconds while it is locked.

    Blocking: call it where blocking is allowed (the stores' worker threads).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE)
