"""The quarantine: messages held back with their envelope and verdict, durably.

``put`` returns only when the message is durable, because the SMTP server
answers 250 right after it (never lose a message). Two backends behind one
small interface:

- ``local`` (default): one file per message under ``path/messages`` (written
  to a temporary name, fsync'd, renamed, directory fsync'd) plus a SQLite index
  (WAL, ``synchronous=FULL``) committed before ``put`` returns. Crash-consistent:
  on open, a file without an index row is moved to ``path/orphans`` (its
  sender was never told 250 and will retry; kept for inspection), a row
  without a file is dropped, and stale temporary files are removed.
- ``postgresql``: bytes in ``bytea`` with the envelope and verdict in one row,
  committed before ``put`` returns, so every node of a cluster sees the same
  quarantine. The schema is versioned and migrated by the gateway itself.

Every blocking call runs in a worker thread (local) or is async (psycopg 3):
the event loop never waits on a disk or a socket. Any failure to store is a
:class:`QuarantineError`, which the server answers with 451.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gateway.config import QuarantineConfig
from gateway.sqlitewal import enable_wal

if TYPE_CHECKING:
    import psycopg

    from gateway.engine import Evaluation

__all__ = [
    "HeldSymbol",
    "LocalQuarantine",
    "PostgresQuarantine",
    "QuarantineError",
    "QuarantineFilter",
    "QuarantineItem",
    "QuarantinePage",
    "QuarantineStore",
    "new_quarantine_item",
    "open_quarantine",
    "summarize",
    "valid_id",
]

log = logging.getLogger("gateway.quarantine")

_ID_RE = re.compile(r"^[0-9a-f]{12,40}$")
_WORD_RE = re.compile(r"[^\W_]{1,64}")  # letters and digits
_SETTING_RE = re.compile(r"^[a-z0-9_:.-]{1,128}$")
_HEADER_LIMIT = 65536  # bytes of the header section read for the subject and From
_SUMMARY_LIMIT = 998  # characters of subject / From kept (a header line's limit)
_ORPHAN_GRACE = 120.0  # seconds: a file younger than this may be a put() in progress elsewhere
_PG_TIMEOUT = 10.0  # seconds for any one PostgreSQL operation
_PURGE_CLAIM = 600.0  # seconds a purge holds the messages it is deleting (local backend)


@dataclass(frozen=True, slots=True)
class HeldSymbol:
    """One verdict symbol as stored with a quarantined message (its explanation)."""

    name: str
    score: float
    policy: str = ""
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": self.score,
            "policy": self.policy,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class QuarantineItem:
    id: str
    queue_id: str
    received_at: datetime
    client_ip: str | None
    helo: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    size: int
    score: float
    action: str
    reasons: tuple[str, ...]  # verdict reason first, then "SYMBOL=score" strings
    headers: tuple[str, ...]  # header fields to prepend when released (folded, no CRLF)
    # Added with the web UI (empty for messages stored before): what a person needs to
    # recognise a message and see why it was held. ``put`` fills subject and header_from
    # from the message's header when they are empty.
    subject: str = ""
    header_from: str = ""
    symbols: tuple[HeldSymbol, ...] = ()
    forced_by: str = ""  # the policy whose action floor decided, "" when the score did

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of ``quarantine list --json``."""
        return {
            "id": self.id,
            "queue_id": self.queue_id,
            "received_at": self.received_at.isoformat(),
            "client_ip": self.client_ip,
            "helo": self.helo,
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "size": self.size,
            "score": self.score,
            "action": self.action,
            "reasons": list(self.reasons),
            "subject": self.subject,
            "header_from": self.header_from,
            "forced_by": self.forced_by,
        }


@dataclass(frozen=True, slots=True)
class QuarantineFilter:
    """What ``search`` narrows the listing to; every field set must match (AND).

    ``text`` is words, each of which must appear in the subject, the From
    header or the envelope sender (PostgreSQL: as a whole word, through its
    full-text index; local: as a substring). ``symbol`` is a symbol name the
    verdict carried (messages stored before the web UI carry none).
    """

    rcpt: str | None = None
    sender: str | None = None  # the envelope sender, exactly (case-insensitive)
    min_score: float | None = None
    max_score: float | None = None
    symbol: str | None = None
    text: str | None = None
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before

    def words(self) -> list[str]:
        """The search words of ``text``: runs of letters and digits, at most eight."""
        return _WORD_RE.findall((self.text or "").lower())[:8]


@dataclass(frozen=True, slots=True)
class QuarantinePage:
    """One page of a newest-first listing; ``next`` is the cursor of the page after it."""

    items: list[QuarantineItem]
    next: str | None


class QuarantineError(Exception):
    """The store is unavailable, full or unwritable: the caller answers 451."""


class QuarantineStore(Protocol):
    async def put(self, item: QuarantineItem, raw: bytes) -> None:
        """Store; returns only when durable (fsync'd file + committed index / PG commit)."""
        ...

    async def get(self, id: str) -> tuple[QuarantineItem, bytes] | None: ...

    async def list(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        mail_from: str | None = None,
        rcpt: str | None = None,
    ) -> list[QuarantineItem]: ...

    async def search(
        self, filter: QuarantineFilter, *, limit: int = 50, cursor: str | None = None
    ) -> QuarantinePage:
        """Newest first, narrowed by ``filter``; keyset paging, so page 1,000 costs as
        little as page 1. ``cursor`` is a previous page's ``next``; a malformed one is
        a ValueError."""
        ...

    async def delete(self, id: str) -> bool: ...

    async def drop_recipients(self, id: str, rcpts: Sequence[str]) -> tuple[str, ...] | None:
        """Remove recipients (case-insensitive) from a message after a release to them.

        Returns the recipients still waiting; when none are left the message is
        deleted and ``()`` returned. None when there is no such message.
        """
        ...

    async def setting(self, name: str, default: bytes) -> bytes:
        """A value shared by every process and node of this quarantine, created once.

        Returns the stored value; the first caller stores ``default`` (nodes
        racing agree on one). Holds the digest link key and the digest claims.
        """
        ...

    async def claim(self, id: str, seconds: float = 600.0) -> bool:
        """Reserve a message for one release; False when another release holds it.

        Two operators (or nodes) releasing the same message at once must not
        deliver it twice. A claim lapses after ``seconds`` (a crashed release).
        """
        ...

    async def unclaim(self, id: str) -> None:
        """Give a claim back after a failed release, so it can be retried now."""
        ...

    async def count(self) -> int: ...

    async def purge(self, older_than: datetime, *, limit: int | None = None) -> int:
        """Delete messages received before ``older_than`` (retention); returns how many.

        At most ``limit`` (oldest first), so a scheduled purge works in bounded
        steps. A message claimed by a release is skipped: a failed release
        gives it back (``unclaim``) and must find it still there. Safe to run
        on several nodes at once: each message is deleted and counted once.
        """
        ...

    async def close(self) -> None: ...


def valid_id(id: str) -> bool:
    """Quarantine ids are lower-case hex: safe as file names, easy to paste."""
    return bool(_ID_RE.match(id))


def new_id(now: float | None = None) -> str:
    """Time-ordered (milliseconds, hex) plus 48 random bits: unique across nodes."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(6)}"


def new_quarantine_item(evaluation: Evaluation, raw_size: int) -> QuarantineItem:
    """The record of one evaluated message, ready for :meth:`QuarantineStore.put`."""
    env = evaluation.envelope
    verdict = evaluation.verdict
    reasons = [verdict.reason] if verdict.reason else [f"action {verdict.action.value}"]
    reasons.extend(f"{s.name}={s.score}" for s in verdict.symbols)
    return QuarantineItem(
        id=new_id(),
        queue_id=env.queue_id,
        received_at=env.received_at or datetime.now(UTC),
        client_ip=env.client_ip,
        helo=env.helo,
        mail_from=env.mail_from,
        rcpt_tos=tuple(env.rcpt_to),
        size=raw_size,
        score=float(verdict.score),
        action=verdict.action.value,
        reasons=tuple(reasons),
        headers=tuple(evaluation.headers),
        symbols=tuple(
            HeldSymbol(s.name, float(s.score), s.policy, s.detail) for s in verdict.symbols
        ),
        forced_by=verdict.forced_by or "",
    )


def summarize(item: QuarantineItem, raw: bytes) -> QuarantineItem:
    """``item`` with its subject and From taken from ``raw``'s header when not set yet.

    Decoded (RFC 2047), unfolded, control characters dropped and bounded: they
    are shown to people and searched, never trusted.
    """
    if item.subject or item.header_from:
        return item
    end = raw.find(b"\r\n\r\n", 0, _HEADER_LIMIT)
    head = raw[: end if end >= 0 else _HEADER_LIMIT]
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        subject, sender = str(msg.get("subject", "") or ""), str(msg.get("from", "") or "")
    except Exception:  # a hostile header the parser chokes on: nothing to show
        return item
    return replace(item, subject=_printable(subject), header_from=_printable(sender))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text).strip()[:_SUMMARY_LIMIT]


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("|".join(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed cursor: pass the `next` of a previous page") from None
    parts = text.split("|")
    if len(parts) != n or not valid_id(parts[-1]):
        raise ValueError("malformed cursor: pass the `next` of a previous page")
    return parts


def _check_setting(name: str) -> None:
    if not _SETTING_RE.match(name):
        raise ValueError(f"invalid setting name {name!r}")


def _remaining(rcpts: Sequence[str], drop: Sequence[str]) -> tuple[str, ...]:
    gone = {r.lower() for r in drop}
    return tuple(r for r in rcpts if r.lower() not in gone)


def open_quarantine(config: QuarantineConfig, base_dir: Path) -> QuarantineStore:
    """The configured store. Opening is lazy: nothing blocks here, errors surface on use."""
    if config.backend == "postgresql":
        return PostgresQuarantine(config.dsn)
    path = Path(config.path).expanduser()
    return LocalQuarantine(path if path.is_absolute() else base_dir / path)


def _check_paging(limit: int, offset: int) -> None:
    if limit < 1 or offset < 0:
        raise ValueError(f"limit must be >= 1 and offset >= 0, got {limit}, {offset}")


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# --- local: files + SQLite ---------------------------------------------------

_LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    client_ip TEXT,
    helo TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    mail_from_lc TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    size INTEGER NOT NULL,
    score REAL NOT NULL,
    action TEXT NOT NULL,
    reasons TEXT NOT NULL,
    headers TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_received_at ON items (received_at, id);
CREATE INDEX IF NOT EXISTS items_mail_from ON items (mail_from_lc);
CREATE TABLE IF NOT EXISTS rcpts (
    id TEXT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    rcpt_lc TEXT NOT NULL,
    PRIMARY KEY (rcpt_lc, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rcpts_id ON rcpts (id);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
# Columns added after the first release, created in place on open (all nullable).
_LOCAL_ADDED = (
    ("claimed_until", "REAL"),
    ("subject", "TEXT"),
    ("header_from", "TEXT"),
    ("symbols", "TEXT"),
    ("forced_by", "TEXT"),
)

_COLUMNS = (
    "id, queue_id, received_at, client_ip, helo, mail_from, rcpt_tos, size, score, action, "
    "reasons, headers, subject, header_from, symbols, forced_by"
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _symbols_json(symbols: Sequence[HeldSymbol]) -> str:
    return json.dumps([s.to_json() for s in symbols], ensure_ascii=False)


def _held_symbols(value: Any) -> tuple[HeldSymbol, ...]:
    """Stored symbols (JSON text or PostgreSQL's decoded jsonb); none for older rows."""
    if not value:
        return ()
    data = json.loads(value) if isinstance(value, str) else value
    return tuple(
        HeldSymbol(str(d["name"]), float(d["score"]), str(d["policy"]), str(d["detail"]))
        for d in data
    )


def _local_row(row: Sequence[Any]) -> QuarantineItem:
    return QuarantineItem(
        id=row[0],
        queue_id=row[1],
        received_at=datetime.fromtimestamp(row[2], UTC),
        client_ip=row[3],
        helo=row[4],
        mail_from=row[5],
        rcpt_tos=tuple(json.loads(row[6])),
        size=row[7],
        score=row[8],
        action=row[9],
        reasons=tuple(json.loads(row[10])),
        headers=tuple(json.loads(row[11])),
        subject=row[12] or "",
        header_from=row[13] or "",
        symbols=_held_symbols(row[14]),
        forced_by=row[15] or "",
    )


class LocalQuarantine:
    """Files (one per message) plus a SQLite index under one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages = path / "messages"
        self.orphans = path / "orphans"
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._open_lock = threading.Lock()

    # All _sync methods run in a worker thread (asyncio.to_thread).

    def _open_sync(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        with self._open_lock:  # the first puts may arrive together
            if self._db is None:
                self._db = self._connect()
            return self._db

    def _existing(self) -> sqlite3.Connection | None:
        """The index for reading; None (an empty quarantine) when nothing was ever stored.

        Reading never creates directories: ``quarantine list`` with a mistyped
        path should show nothing, not leave an empty store behind.
        """
        if self._db is None and not (self.path / "index.sqlite").exists():
            return None
        return self._open_sync()

    def _connect(self) -> sqlite3.Connection:
        self.messages.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path / "index.sqlite", timeout=10.0, isolation_level=None, check_same_thread=False
        )
        try:
            enable_wal(db, 10.0)
            db.execute("PRAGMA synchronous=FULL")  # commit = durable, even in WAL mode
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_LOCAL_SCHEMA)
            # An index created by an older version: upgraded by one process, the others
            # (opening at the same moment) wait for it and find the columns there.
            db.execute("BEGIN IMMEDIATE")
            try:
                columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
                for name, kind in _LOCAL_ADDED:
                    if name not in columns:
                        db.execute(f"ALTER TABLE items ADD COLUMN {name} {kind}")
                db.execute("CREATE INDEX IF NOT EXISTS items_score ON items (score)")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._repair(db)
        except BaseException:
            db.close()
            raise
        return db

    def _repair(self, db: sqlite3.Connection) -> None:
        """Reconcile files and index after a crash (see the module docstring).

        Other processes (the gateway, a CLI, the scheduled purge) may put and
        delete meanwhile: the rows are read before the files are listed, so a
        message put in between is a young file (left alone), never a row
        without its file; a file deleted in between is skipped.
        """
        now = time.time()
        rows = {r[0] for r in db.execute("SELECT id FROM items")}
        files: dict[str, Path] = {}
        for entry in self.messages.iterdir():
            name = entry.name
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue  # renamed or deleted by another process just now
            if name.startswith(".tmp-"):
                if age > _ORPHAN_GRACE:
                    entry.unlink(missing_ok=True)
                    log.warning("quarantine_tmp_removed", extra={"file": name})
            elif name.endswith(".eml") and valid_id(name[:-4]):
                files[name[:-4]] = entry
        for id in sorted(rows - files.keys()):
            db.execute("DELETE FROM items WHERE id = ?", (id,))
            log.warning("quarantine_row_without_file_dropped", extra={"quarantine_id": id})
        for id in sorted(files.keys() - rows):
            entry = files[id]
            try:
                if now - entry.stat().st_mtime <= _ORPHAN_GRACE:
                    continue  # possibly a put() of another process between rename and commit
                self.orphans.mkdir(exist_ok=True)
                entry.rename(self.orphans / entry.name)
            except FileNotFoundError:
                continue  # deleted by another process meanwhile
            log.warning("quarantine_file_without_row_moved", extra={"quarantine_id": id})

    def _file(self, id: str) -> Path:
        return self.messages / f"{id}.eml"

    def _put_sync(self, item: QuarantineItem, raw: bytes) -> None:
        item = summarize(item, raw)
        db = self._open_sync()
        final = self._file(item.id)
        tmp = self.messages / f".tmp-{item.id}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(raw)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, final)
        _fsync_dir(self.messages)  # the rename itself is durable now
        try:
            with self._lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute(
                        f"INSERT INTO items ({_COLUMNS}, mail_from_lc) "  # noqa: S608
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            item.id,
                            item.queue_id,
                            _aware(item.received_at).timestamp(),
                            item.client_ip,
                            item.helo,
                            item.mail_from,
                            json.dumps(list(item.rcpt_tos)),
                            item.size,
                            item.score,
                            item.action,
                            json.dumps(list(item.reasons)),
                            json.dumps(list(item.headers)),
                            item.subject,
                            item.header_from,
                            _symbols_json(item.symbols),
                            item.forced_by,
                            item.mail_from.lower(),
                        ),
                    )
                    db.executemany(
                        "INSERT OR IGNORE INTO rcpts (id, rcpt_lc) VALUES (?, ?)",
                        [(item.id, r.lower()) for r in item.rcpt_tos],
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except BaseException:
            final.unlink(missing_ok=True)  # never acknowledged: the sender retries
            raise

    def _get_sync(self, id: str) -> tuple[QuarantineItem, bytes] | None:
        if not valid_id(id):
            return None
        db = self._existing()
        if db is None:
            return None
        with self._lock:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE id = ?",  # noqa: S608
                (id,),
            ).fetchone()
        if row is None:
            return None
        try:
            raw = self._file(id).read_bytes()
        except FileNotFoundError:
            return None  # deleted meanwhile
        return _local_row(row), raw

    def _list_sync(
        self, limit: int, offset: int, mail_from: str | None, rcpt: str | None
    ) -> list[QuarantineItem]:
        db = self._existing()
        if db is None:
            return []
        where: list[str] = []
        args: list[Any] = []
        if mail_from is not None:
            where.append("mail_from_lc = ?")
            args.append(mail_from.lower())
        if rcpt is not None:
            where.append("id IN (SELECT id FROM rcpts WHERE rcpt_lc = ?)")
            args.append(rcpt.lower())
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT {_COLUMNS} FROM items {clause} "  # noqa: S608
            "ORDER BY received_at DESC, id DESC LIMIT ? OFFSET ?"
        )
        with self._lock:
            rows = db.execute(sql, (*args, limit, offset)).fetchall()
        return [_local_row(r) for r in rows]

    def _search_sync(self, f: QuarantineFilter, limit: int, cursor: str | None) -> QuarantinePage:
        db = self._existing()
        if db is None:
            return QuarantinePage([], None)
        where: list[str] = []
        args: list[Any] = []
        if cursor is not None:
            stamp, after = decode_cursor(cursor, 2)
            try:
                args.extend((float(stamp), after))
            except ValueError:
                raise ValueError("malformed cursor: pass the `next` of a previous page") from None
            where.append("(received_at, id) < (?, ?)")
        if f.sender is not None:
            where.append("mail_from_lc = ?")
            args.append(f.sender.lower())
        if f.rcpt is not None:
            where.append("id IN (SELECT id FROM rcpts WHERE rcpt_lc = ?)")
            args.append(f.rcpt.lower())
        if f.min_score is not None:
            where.append("score >= ?")
            args.append(f.min_score)
        if f.max_score is not None:
            where.append("score <= ?")
            args.append(f.max_score)
        if f.since is not None:
            where.append("received_at >= ?")
            args.append(_aware(f.since).timestamp())
        if f.until is not None:
            where.append("received_at < ?")
            args.append(_aware(f.until).timestamp())
        if f.symbol is not None:
            where.append(
                "EXISTS (SELECT 1 FROM json_each(items.symbols) "
                "WHERE json_extract(value, '$.name') = ?)"
            )
            args.append(f.symbol.upper())
        for word in f.words():
            where.append(
                "(lower(coalesce(subject, '')) LIKE ? "
                "OR lower(coalesce(header_from, '')) LIKE ? OR mail_from_lc LIKE ?)"
            )
            pattern = f"%{word}%"  # letters and digits: nothing to escape
            args.extend((pattern, pattern, pattern))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT {_COLUMNS}, received_at FROM items {clause} "  # noqa: S608
            "ORDER BY received_at DESC, id DESC LIMIT ?"
        )
        with self._lock:
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        # The cursor carries the stored REAL itself: exact, unlike a datetime round trip.
        last = rows[-1] if more else None
        next_cursor = encode_cursor(repr(last[16]), last[0]) if last is not None else None
        return QuarantinePage([_local_row(r) for r in rows], next_cursor)

    def _drop_recipients_sync(self, id: str, rcpts: Sequence[str]) -> tuple[str, ...] | None:
        db = self._existing()
        if db is None or not valid_id(id):
            return None
        with self._lock:
            row = db.execute("SELECT rcpt_tos FROM items WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            remaining = _remaining(json.loads(row[0]), rcpts)
            if remaining:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute(
                        "UPDATE items SET rcpt_tos = ? WHERE id = ?",
                        (json.dumps(list(remaining)), id),
                    )
                    db.executemany(
                        "DELETE FROM rcpts WHERE id = ? AND rcpt_lc = ?",
                        [(id, r.lower()) for r in rcpts],
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                return remaining
        self._delete_sync(id)
        return ()

    def _setting_sync(self, name: str, default: bytes) -> bytes:
        db = self._open_sync()
        with self._lock:
            db.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, default),
            )
            (value,) = db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return bytes(value)

    def _delete_sync(self, id: str) -> bool:
        if not valid_id(id):
            return False
        db = self._existing()
        if db is None:
            return False
        # The file goes first: a crash in between leaves a row without a file,
        # which the next open drops; the other order would leave an orphan file.
        existed = self._file(id).exists()
        self._file(id).unlink(missing_ok=True)
        if existed:
            _fsync_dir(self.messages)
        with self._lock:
            cur = db.execute("DELETE FROM items WHERE id = ?", (id,))
        return existed or cur.rowcount > 0

    def _claim_sync(self, id: str, seconds: float) -> bool:
        if not valid_id(id):
            return False
        db = self._existing()
        if db is None:
            return False
        now = time.time()
        with self._lock:
            cur = db.execute(
                "UPDATE items SET claimed_until = ? WHERE id = ? "
                "AND (claimed_until IS NULL OR claimed_until < ?)",
                (now + seconds, id, now),
            )
        return cur.rowcount == 1

    def _unclaim_sync(self, id: str) -> None:
        db = self._existing()
        if db is None:
            return
        with self._lock:
            db.execute("UPDATE items SET claimed_until = NULL WHERE id = ?", (id,))

    def _count_sync(self) -> int:
        db = self._existing()
        if db is None:
            return 0
        with self._lock:
            (n,) = db.execute("SELECT count(*) FROM items").fetchone()
        return int(n)

    def _purge_sync(self, before: float, limit: int | None) -> int:
        db = self._existing()
        if db is None:
            return 0
        now = time.time()
        # Claimed in one statement, like a release claims: a release (another
        # process) cannot claim these now, and claimed ones are left alone.
        # Should the purge die midway, its claims lapse and a later purge retries.
        with self._lock:
            ids = [
                r[0]
                for r in db.execute(
                    "UPDATE items SET claimed_until = ? WHERE id IN ("
                    "SELECT id FROM items WHERE received_at < ? "
                    "AND (claimed_until IS NULL OR claimed_until < ?) "
                    "ORDER BY received_at LIMIT ?) RETURNING id",
                    (now + _PURGE_CLAIM, before, now, -1 if limit is None else limit),
                ).fetchall()
            ]
        if not ids:
            return 0
        # As in delete: files first, made durable with one directory fsync for the
        # batch, then the rows in one transaction (one commit, not one per message).
        for id in ids:
            self._file(id).unlink(missing_ok=True)
        _fsync_dir(self.messages)
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM items WHERE id = ?", [(id,) for id in ids])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return len(ids)

    def _close_sync(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineError(
                f"local quarantine at {self.path} failed: {type(exc).__name__}: {exc}; "
                "check that the directory exists, is writable and the disk is not full"
            ) from exc

    async def put(self, item: QuarantineItem, raw: bytes) -> None:
        if not valid_id(item.id):
            raise ValueError(f"invalid quarantine id {item.id!r}")
        await self._call(self._put_sync, item, raw)

    async def get(self, id: str) -> tuple[QuarantineItem, bytes] | None:
        result: tuple[QuarantineItem, bytes] | None = await self._call(self._get_sync, id)
        return result

    async def list(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        mail_from: str | None = None,
        rcpt: str | None = None,
    ) -> list[QuarantineItem]:
        _check_paging(limit, offset)
        items: list[QuarantineItem] = await self._call(
            self._list_sync, limit, offset, mail_from, rcpt
        )
        return items

    async def search(
        self, filter: QuarantineFilter, *, limit: int = 50, cursor: str | None = None
    ) -> QuarantinePage:
        _check_paging(limit, 0)
        page: QuarantinePage = await self._call(self._search_sync, filter, limit, cursor)
        return page

    async def delete(self, id: str) -> bool:
        return bool(await self._call(self._delete_sync, id))

    async def drop_recipients(self, id: str, rcpts: Sequence[str]) -> tuple[str, ...] | None:
        result: tuple[str, ...] | None = await self._call(self._drop_recipients_sync, id, rcpts)
        return result

    async def setting(self, name: str, default: bytes) -> bytes:
        _check_setting(name)
        return bytes(await self._call(self._setting_sync, name, default))

    async def claim(self, id: str, seconds: float = 600.0) -> bool:
        return bool(await self._call(self._claim_sync, id, seconds))

    async def unclaim(self, id: str) -> None:
        await self._call(self._unclaim_sync, id)

    async def count(self) -> int:
        return int(await self._call(self._count_sync))

    async def purge(self, older_than: datetime, *, limit: int | None = None) -> int:
        return int(await self._call(self._purge_sync, _aware(older_than).timestamp(), limit))

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)


# --- PostgreSQL ----------------------------------------------------------------

# The words ``search`` matches (``QuarantineFilter.text``): subject, From and sender, with
# address punctuation as word breaks. Queries repeat this expression so that the GIN
# index over it serves them.
_PG_WORDS = (
    "to_tsvector('simple'::regconfig, translate(lower(coalesce(subject, '') || ' ' || "
    "coalesce(header_from, '') || ' ' || mail_from), '@.<>\"+-_', '        '))"
)

# Each entry moves the schema one version forward; never edit a shipped one.
# Migrations only add (nullable columns, indexes): older nodes must keep working.
_PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE quarantine (
        id text PRIMARY KEY,
        queue_id text NOT NULL,
        received_at timestamptz NOT NULL,
        client_ip text,
        helo text NOT NULL,
        mail_from text NOT NULL,
        mail_from_lc text NOT NULL,
        rcpt_tos text[] NOT NULL,
        rcpt_lc text[] NOT NULL,
        size bigint NOT NULL,
        score double precision NOT NULL,
        action text NOT NULL,
        reasons text[] NOT NULL,
        headers text[] NOT NULL,
        raw bytea NOT NULL
    );
    CREATE INDEX quarantine_received_at ON quarantine (received_at DESC, id DESC);
    CREATE INDEX quarantine_mail_from ON quarantine (mail_from_lc, received_at DESC, id DESC);
    CREATE INDEX quarantine_rcpt ON quarantine USING gin (rcpt_lc);
    """,
    # 2: releases claim a message first, so two nodes never deliver it twice
    """
    ALTER TABLE quarantine ADD COLUMN claimed_until timestamptz;
    """,
    # 3: the web UI: what a person recognises (subject, From), the explanation
    # (symbols with details, the deciding floor), indexes for its filters, and
    # values shared by the nodes (the digest link key, digest claims)
    """
    ALTER TABLE quarantine ADD COLUMN subject text, ADD COLUMN header_from text,
        ADD COLUMN symbols jsonb, ADD COLUMN forced_by text;
    CREATE INDEX quarantine_score ON quarantine (score);
    CREATE INDEX quarantine_symbols ON quarantine USING gin (symbols jsonb_path_ops);
    CREATE INDEX quarantine_words ON quarantine USING gin ("""
    + _PG_WORDS
    + """);
    CREATE TABLE quarantine_settings (name text PRIMARY KEY, value bytea NOT NULL);
    """,
)

_PG_COLUMNS = (
    "id, queue_id, received_at, client_ip, helo, mail_from, rcpt_tos, size, score, action, "
    "reasons, headers, subject, header_from, symbols, forced_by"
)


def _pg_row(row: Sequence[Any]) -> QuarantineItem:
    return QuarantineItem(
        id=row[0],
        queue_id=row[1],
        received_at=_aware(row[2]),
        client_ip=row[3],
        helo=row[4],
        mail_from=row[5],
        rcpt_tos=tuple(row[6]),
        size=int(row[7]),
        score=float(row[8]),
        action=row[9],
        reasons=tuple(row[10]),
        headers=tuple(row[11]),
        subject=row[12] or "",
        header_from=row[13] or "",
        symbols=_held_symbols(row[14]),
        forced_by=row[15] or "",
    )


class _Pool:
    """A small async connection pool (psycopg_pool is not a dependency).

    Connections are opened on demand up to ``size``; one that saw an error is
    discarded, so a restarted server is picked up again by itself.
    """

    def __init__(self, dsn: str, size: int = 4) -> None:
        self.dsn = dsn
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        import psycopg

        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, connect_timeout=int(_PG_TIMEOUT), autocommit=False
                )
            ok = False
            try:
                yield conn
                ok = True
            finally:
                if ok and not self._closed and not conn.closed and not conn.broken:
                    self._idle.append(conn)
                else:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()


_WORD_PLAN_BUDGET = 250  # ms a word search gets on the planner's plan before the GIN-only one


class PostgresQuarantine:
    """The shared quarantine of a cluster: one row per message, bytes in ``bytea``."""

    def __init__(self, dsn: str, pool_size: int = 4) -> None:
        self.dsn = dsn
        self._pool = _Pool(dsn, pool_size)
        self._migrated = False
        self._migrate_lock = asyncio.Lock()

    def _where(self) -> str:
        # The DSN without credentials, for messages an operator reads.
        return re.sub(r"//[^@/]*@", "//", self.dsn)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        import psycopg

        try:
            async with asyncio.timeout(_PG_TIMEOUT):
                if not self._migrated:
                    await self._migrate()
                async with self._pool.connection() as conn:
                    yield conn
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise QuarantineError(
                f"PostgreSQL quarantine at {self._where()} failed: {type(exc).__name__}: "
                f"{str(exc).strip() or 'timed out'}"
            ) from exc

    async def _migrate(self) -> None:
        async with self._migrate_lock:
            if self._migrated:
                return
            async with self._pool.connection() as conn, conn.transaction():
                # Two nodes starting together: one migrates, the other waits.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.gateway_q'))"
                )
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version "
                    "(component text PRIMARY KEY, version integer NOT NULL)"
                )
                cur = await conn.execute(
                    "SELECT version FROM schema_version WHERE component = 'quarantine'"
                )
                row = await cur.fetchone()
                current = int(row[0]) if row else 0
                if current > len(_PG_MIGRATIONS):
                    # Migrations only add (nullable columns, indexes), so a node of the
                    # previous release keeps working during a rolling upgrade.
                    log.warning(
                        "quarantine_schema_newer",
                        extra={"version": current, "known": len(_PG_MIGRATIONS)},
                    )
                for version, sql in enumerate(_PG_MIGRATIONS[current:], start=current + 1):
                    await conn.execute(sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_version (component, version) "
                        "VALUES ('quarantine', %s) ON CONFLICT (component) "
                        "DO UPDATE SET version = EXCLUDED.version",
                        (version,),
                    )
                    log.info("quarantine_schema_migrated", extra={"version": version})
            self._migrated = True

    async def schema_version(self) -> int:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT version FROM schema_version WHERE component = 'quarantine'"
            )
            row = await cur.fetchone()
            await conn.rollback()
        return int(row[0]) if row else 0

    async def put(self, item: QuarantineItem, raw: bytes) -> None:
        if not valid_id(item.id):
            raise ValueError(f"invalid quarantine id {item.id!r}")
        item = summarize(item, raw)
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                (
                    f"INSERT INTO quarantine ({_PG_COLUMNS}, mail_from_lc, rcpt_lc, raw) "  # noqa: S608
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
                    "%s, %s, %s::jsonb, %s, %s, %s, %s)"
                ).encode(),
                (
                    item.id,
                    item.queue_id,
                    _aware(item.received_at),
                    item.client_ip,
                    item.helo,
                    item.mail_from,
                    list(item.rcpt_tos),
                    item.size,
                    item.score,
                    item.action,
                    list(item.reasons),
                    list(item.headers),
                    item.subject,
                    item.header_from,
                    _symbols_json(item.symbols),
                    item.forced_by,
                    item.mail_from.lower(),
                    [r.lower() for r in item.rcpt_tos],
                    raw,
                ),
            )
        # leaving transaction() committed; PostgreSQL's commit is durable (fsync'd WAL)

    async def get(self, id: str) -> tuple[QuarantineItem, bytes] | None:
        if not valid_id(id):
            return None
        async with self._conn() as conn:
            cur = await conn.execute(
                f"SELECT {_PG_COLUMNS}, raw FROM quarantine WHERE id = %s".encode(),  # noqa: S608
                (id,),
            )
            row = await cur.fetchone()
            await conn.rollback()
        if row is None:
            return None
        return _pg_row(row), bytes(row[16])

    async def list(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        mail_from: str | None = None,
        rcpt: str | None = None,
    ) -> list[QuarantineItem]:
        _check_paging(limit, offset)
        sql, args = self.list_query(limit=limit, offset=offset, mail_from=mail_from, rcpt=rcpt)
        async with self._conn() as conn:
            cur = await conn.execute(sql, args)
            rows = await cur.fetchall()
            await conn.rollback()
        return [_pg_row(r) for r in rows]

    @staticmethod
    def list_query(
        *, limit: int, offset: int, mail_from: str | None, rcpt: str | None
    ) -> tuple[bytes, tuple[Any, ...]]:
        """The listing's SQL: newest first, each filter served by its index."""
        where: list[str] = []
        args: list[Any] = []
        if mail_from is not None:
            where.append("mail_from_lc = %s")
            args.append(mail_from.lower())
        if rcpt is not None:
            where.append("rcpt_lc @> ARRAY[%s]::text[]")
            args.append(rcpt.lower())
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT {_PG_COLUMNS} FROM quarantine {clause} "  # noqa: S608
            "ORDER BY received_at DESC, id DESC LIMIT %s OFFSET %s"
        )
        return sql.encode(), (*args, limit, offset)

    async def search(
        self, filter: QuarantineFilter, *, limit: int = 50, cursor: str | None = None
    ) -> QuarantinePage:
        _check_paging(limit, 0)
        sql, args = self.search_query(filter, limit=limit, cursor=cursor)
        async with self._conn() as conn:
            rows = await self._search_rows(conn, sql, args, words=bool(filter.words()))
        more = len(rows) > limit
        items = [_pg_row(r) for r in rows[:limit]]
        last = items[-1] if more else None
        next_cursor = encode_cursor(last.received_at.isoformat(), last.id) if last else None
        return QuarantinePage(items, next_cursor)

    @staticmethod
    async def _search_rows(
        conn: psycopg.AsyncConnection[Any], sql: bytes, args: tuple[Any, ...], *, words: bool
    ) -> Sequence[Any]:
        """Run the search; a word search the planner got wrong is re-run through the GIN index.

        The planner cannot tell a word that matches nothing from a rare one: it may
        walk the time index through every row looking for 50 matches (5-9 s on a
        million rows). So a word search first gets :data:`_WORD_PLAN_BUDGET`; past
        it, the same query runs with index scans off, which leaves the GIN index's
        bitmap scan and a top-N sort of the matches (milliseconds for a rare word,
        and a common word never gets here: the time index finds it at once).
        """
        from psycopg.errors import QueryCanceled

        if words:
            try:
                await conn.execute(f"SET LOCAL statement_timeout = {_WORD_PLAN_BUDGET}")
                cur = await conn.execute(sql, args)
                rows = await cur.fetchall()
                await conn.rollback()
                return rows
            except QueryCanceled:
                await conn.rollback()
                log.info("quarantine_search_replanned", extra={"budget_ms": _WORD_PLAN_BUDGET})
            await conn.execute("SET LOCAL enable_indexscan = off")
        cur = await conn.execute(sql, args)
        rows = await cur.fetchall()
        await conn.rollback()
        return rows

    @staticmethod
    def search_query(
        f: QuarantineFilter, *, limit: int, cursor: str | None = None
    ) -> tuple[bytes, tuple[Any, ...]]:
        """The search's SQL: newest first by keyset, one page plus one row (is there more?).

        Served by the indexes of migrations 1 and 3 (``bench/quarantine_list.py``
        measures each filter on a million rows).
        """
        where: list[str] = []
        args: list[Any] = []
        if cursor is not None:
            stamp, after = decode_cursor(cursor, 2)
            try:
                args.extend((_aware(datetime.fromisoformat(stamp)), after))
            except ValueError:
                raise ValueError("malformed cursor: pass the `next` of a previous page") from None
            where.append("(received_at, id) < (%s, %s)")
        if f.sender is not None:
            where.append("mail_from_lc = %s")
            args.append(f.sender.lower())
        if f.rcpt is not None:
            where.append("rcpt_lc @> ARRAY[%s]::text[]")
            args.append(f.rcpt.lower())
        if f.min_score is not None:
            where.append("score >= %s")
            args.append(f.min_score)
        if f.max_score is not None:
            where.append("score <= %s")
            args.append(f.max_score)
        if f.since is not None:
            where.append("received_at >= %s")
            args.append(_aware(f.since))
        if f.until is not None:
            where.append("received_at < %s")
            args.append(_aware(f.until))
        if f.symbol is not None:
            where.append("symbols @> %s::jsonb")
            args.append(json.dumps([{"name": f.symbol.upper()}]))
        words = f.words()
        if words:
            # Whole words: the planner estimates them from the index's statistics, so a
            # rare word is looked up in the GIN index and a common one read along the
            # time index. A prefix ("invo:*") it cannot estimate: one that matched
            # nothing walked a million rows in 5 s (bench/quarantine_list.py).
            # Words are letters and digits only: nothing in them is tsquery syntax.
            where.append(f"{_PG_WORDS} @@ to_tsquery('simple'::regconfig, %s)")
            args.append(" & ".join(words))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT {_PG_COLUMNS} FROM quarantine {clause} "  # noqa: S608
            "ORDER BY received_at DESC, id DESC LIMIT %s"
        )
        return sql.encode(), (*args, limit + 1)

    async def delete(self, id: str) -> bool:
        if not valid_id(id):
            return False
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM quarantine WHERE id = %s", (id,))
            return cur.rowcount > 0

    async def drop_recipients(self, id: str, rcpts: Sequence[str]) -> tuple[str, ...] | None:
        if not valid_id(id):
            return None
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT rcpt_tos FROM quarantine WHERE id = %s FOR UPDATE", (id,)
            )
            row = await cur.fetchone()
            if row is None:
                return None
            remaining = _remaining(row[0], rcpts)
            if not remaining:
                await conn.execute("DELETE FROM quarantine WHERE id = %s", (id,))
                return ()
            await conn.execute(
                "UPDATE quarantine SET rcpt_tos = %s, rcpt_lc = %s WHERE id = %s",
                (list(remaining), [r.lower() for r in remaining], id),
            )
            return remaining

    async def setting(self, name: str, default: bytes) -> bytes:
        _check_setting(name)
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO quarantine_settings (name, value) VALUES (%s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, default),
            )
            cur = await conn.execute(
                "SELECT value FROM quarantine_settings WHERE name = %s", (name,)
            )
            row = await cur.fetchone()
        assert row is not None
        return bytes(row[0])

    async def claim(self, id: str, seconds: float = 600.0) -> bool:
        if not valid_id(id):
            return False
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE quarantine SET claimed_until = now() + make_interval(secs => %s) "
                "WHERE id = %s AND (claimed_until IS NULL OR claimed_until < now())",
                (seconds, id),
            )
            return cur.rowcount == 1

    async def unclaim(self, id: str) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("UPDATE quarantine SET claimed_until = NULL WHERE id = %s", (id,))

    async def count(self) -> int:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT count(*) FROM quarantine")
            row = await cur.fetchone()
            await conn.rollback()
        return int(row[0]) if row else 0

    async def purge(self, older_than: datetime, *, limit: int | None = None) -> int:
        # FOR UPDATE SKIP LOCKED: nodes purging at once take disjoint rows and never
        # wait on each other; a row a release is claiming right now is skipped, and
        # one whose claim committed first fails the claimed_until test on re-check.
        # LIMIT NULL is no limit.
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM quarantine WHERE id IN ("
                "SELECT id FROM quarantine WHERE received_at < %s "
                "AND (claimed_until IS NULL OR claimed_until < now()) "
                "ORDER BY received_at LIMIT %s FOR UPDATE SKIP LOCKED)",
                (_aware(older_than), limit),
            )
            return cur.rowcount

    async def close(self) -> None:
        await self._pool.close()


def retention_cutoff(config: QuarantineConfig, now: datetime | None = None) -> datetime:
    """Messages received before this are past ``quarantine.retention_days``."""
    return (now or datetime.now(UTC)) - timedelta(days=config.retention_days)
