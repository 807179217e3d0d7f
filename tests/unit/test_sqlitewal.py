"""Switching to WAL while another connection holds the file waits, it does not fail."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.sqlitewal import enable_wal


def test_the_switch_waits_for_a_lock_held_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    # timeout=0: no busy handler at all, so only enable_wal's own retries can succeed
    db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.execute("PRAGMA journal_mode=WAL")
    released = threading.Timer(0.2, holder.execute, args=("COMMIT",))
    released.start()
    enable_wal(db, timeout=30.0)
    released.join()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    holder.close()


def test_a_lock_never_released_fails_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(db, timeout=0.1)
    db.close()
    holder.execute("COMMIT")
    holder.close()
