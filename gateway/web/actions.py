"""What a person can do to a quarantined message, once, for the API and the admin pages.

Each action finds the message, acts through the one release function or the
store's claim (two operators or nodes never act twice on one message), teaches
the classifier when ``quarantine.learn_on_release`` says so
(:func:`gateway.learning.learn_decision`), and for "allow/block sender" appends
the sender to the lists policy's file whose symbol is ``web.allow_list`` /
``web.block_list``, then reloads the config so every worker uses it.
Failures are :class:`ActionError` with the HTTP status and a message that
says what to do.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway import metrics
from gateway.learning import learn_decision
from gateway.quarantine import QuarantineError, QuarantineItem, valid_id
from gateway.release import ReleaseBusy, Released, ReleaseFailed
from gateway.web.context import WebContext

__all__ = ["ActionError", "Deleted", "delete_message", "held", "list_sender", "release_message"]

log = logging.getLogger("gateway.web")

_DELETE_CLAIM = 60.0  # seconds a delete holds its message (it only learns and deletes)


class ActionError(Exception):
    """The action did not happen (or only partly: the message says which)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Deleted:
    id: str
    learned: bool
    listed: str  # the entry added to the block list, "" when none


async def held(ctx: WebContext, id: str) -> tuple[QuarantineItem, bytes]:
    """The message ``id``; ActionError 404 when there is none (or ``id`` is no id)."""
    if not valid_id(id):
        raise ActionError(404, f"{id[:64]!r} is not a quarantine id")
    try:
        got = await ctx.quarantine.get(id)
    except QuarantineError as exc:
        raise ActionError(503, f"the quarantine is unavailable: {exc}") from None
    if got is None:
        raise ActionError(404, f"no quarantined message {id} (released, deleted or purged)")
    return got


async def release_message(
    ctx: WebContext, id: str, rcpts: Sequence[str] | None = None, *, allow_sender: bool = False
) -> tuple[Released, str]:
    """Deliver ``id`` to ``rcpts`` (default all); returns the result and the entry listed."""
    config = ctx.config()
    item, raw = await held(ctx, id)
    if rcpts is not None:
        _check_rcpts(item, rcpts)
    try:
        result = await ctx.release(config, ctx.quarantine, item, raw, rcpts)
    except ReleaseBusy as exc:
        raise ActionError(409, f"{exc}; try again in a minute") from None
    except ReleaseFailed as exc:
        raise ActionError(502, f"release failed, message kept in quarantine: {exc.said}") from None
    except QuarantineError as exc:
        raise ActionError(503, f"the quarantine is unavailable: {exc}") from None
    metrics.WEB_ACTIONS.labels("release").inc()
    log.info(
        "quarantine_released",
        extra={"id": id, "accepted": list(result.accepted), "via": "web"},
    )
    await _learn(ctx, id, raw, spam=False)
    listed = await list_sender(ctx, item, config.web.allow_list) if allow_sender else ""
    return result, listed


async def delete_message(
    ctx: WebContext,
    id: str,
    rcpts: Sequence[str] | None = None,
    *,
    as_spam: bool = False,
    block_sender: bool = False,
) -> Deleted:
    """Remove ``id`` without delivering, for ``rcpts`` (default all: the whole message);
    "as spam" teaches the classifier. The message goes when no recipient is left."""
    config = ctx.config()
    item, raw = await held(ctx, id)
    if rcpts is not None:
        _check_rcpts(item, rcpts)
    try:
        if not await ctx.quarantine.claim(id, _DELETE_CLAIM):
            raise ActionError(409, f"{id} is being released right now; look again in a minute")
        learned = False
        if as_spam:
            learned = await _learn(ctx, id, raw, spam=True)
        if rcpts is None:
            await ctx.quarantine.delete(id)
        elif await ctx.quarantine.drop_recipients(id, rcpts):
            await ctx.quarantine.unclaim(id)  # still held for the others
    except QuarantineError as exc:
        raise ActionError(503, f"the quarantine is unavailable: {exc}") from None
    metrics.WEB_ACTIONS.labels("delete_spam" if as_spam else "delete").inc()
    log.info(
        "quarantine_deleted",
        extra={"id": id, "as_spam": as_spam, "rcpts": list(rcpts or item.rcpt_tos), "via": "web"},
    )
    listed = await list_sender(ctx, item, config.web.block_list) if block_sender else ""
    return Deleted(id, learned, listed)


def _check_rcpts(item: QuarantineItem, rcpts: Sequence[str]) -> None:
    """ActionError 400 unless ``rcpts`` are some of ``item``'s recipients."""
    mine = {r.lower() for r in item.rcpt_tos}
    strangers = [r for r in rcpts if r.lower() not in mine]
    if strangers or not rcpts:
        raise ActionError(
            400,
            f"not recipients of {item.id}: {', '.join(strangers) or '(none given)'}; "
            f"it waits for {', '.join(item.rcpt_tos)}",
        )


async def _learn(ctx: WebContext, id: str, raw: bytes, *, spam: bool) -> bool:
    enabled = ctx.config().quarantine.learn_on_release
    return await learn_decision(ctx.quarantine, ctx.learner(), id, raw, spam=spam, enabled=enabled)


def _sender_of(item: QuarantineItem) -> str:
    """The address to list: the From header's (what lists match with DMARC), else MAIL FROM."""
    _, addr = email.utils.parseaddr(item.header_from)
    addr = addr.strip().lower()
    if "@" in addr and " " not in addr:
        return addr
    return item.mail_from.strip().lower()


async def list_sender(ctx: WebContext, item: QuarantineItem, symbol: str) -> str:
    """Append ``item``'s sender to the list file with ``symbol``; the entry, after a reload."""
    from policies.lists import parse_list

    config = ctx.config()
    entry = _sender_of(item)
    if not entry or "@" not in entry:
        raise ActionError(400, f"{item.id} has no sender address to list (null sender)")
    try:
        parse_list(entry, "sender")
    except ValueError:
        raise ActionError(400, f"{entry[:100]!r} is not an address a list can hold") from None
    specs = config.policies.get("lists", {}).get("lists", [])
    files = [s.get("file", "") for s in specs if isinstance(s, dict) and s.get("symbol") == symbol]
    if not files or not files[0]:
        raise ActionError(
            409,
            f"the message was handled, but no [[policies.lists.lists]] has symbol = "
            f'"{symbol}"; add one (or set web.allow_list / web.block_list) to list senders',
        )
    path = config.resolve_path(files[0])
    note = f"{entry}  # from quarantine {item.id}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
    try:
        added = await asyncio.to_thread(_append_entry, path, entry, note)
    except (OSError, ValueError) as exc:
        raise ActionError(
            500, f"the message was handled, but {path} could not be updated: {exc}"
        ) from None
    if added:
        kind = "allow_sender" if symbol == config.web.allow_list else "block_sender"
        metrics.WEB_ACTIONS.labels(kind).inc()
        log.info("sender_listed", extra={"entry": entry, "list": symbol, "file": str(path)})
        await ctx.reload()
    return entry


def _append_entry(path: Path, entry: str, line: str) -> bool:
    """Append ``line`` unless ``entry`` is listed already; durable before returning."""
    from policies.lists import parse_list

    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = ""
    if parse_list(current, str(path)).match_address(entry) == entry:
        return False
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        prefix = b"" if not current or current.endswith("\n") else b"\n"
        os.write(fd, prefix + line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True
