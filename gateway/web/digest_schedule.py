"""The daily digest, sent by the running gateway at ``web.digest_time`` (UTC).

Proxmox sends its spam report once a day without a cron job; so does the
gateway when ``web.digest_time = "HH:MM"`` is set (empty: never, leaving
``gateway quarantine digest --send`` to cron). One process per gateway runs
the schedule (the single process, or worker 0 of ``server.workers``), and
one node per cluster sends each day's digests: the first to write the day's
marker into the quarantine (``setting("digest-run:<date>")``, a first-writer-
wins row in the shared PostgreSQL store) sends, the others skip. A node that
restarts after the hour does not send that day's digests twice. A failure is
logged and counted; it never stops the server.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from gateway.config import Config
from gateway.housekeeping import Housekeeper
from gateway.quarantine import QuarantineStore
from gateway.web.digest import DigestRun, send_digests
from gateway.web.links import link_key

__all__ = ["DigestSchedule", "next_due"]

log = logging.getLogger("gateway.digest")

_WINDOW = timedelta(hours=24)  # a daily digest lists the day's held mail


def next_due(now: datetime, hhmm: str) -> datetime:
    """The next ``HH:MM`` UTC strictly after ``now``."""
    hour, minute = (int(x) for x in hhmm.split(":"))
    due = now.astimezone(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return due if due > now else due + timedelta(days=1)


class DigestSchedule(Housekeeper):
    """Sends the day's digests at the current config's ``web.digest_time``."""

    def __init__(self, store: QuarantineStore, config: Callable[[], Config]) -> None:
        super().__init__()
        self.store = store
        self.config = config

    async def _run(self) -> None:
        while not self._stopping:
            hhmm = self.config().web.digest_time
            due = next_due(datetime.now(UTC), hhmm) if hhmm else None
            delay = None if due is None else (due - datetime.now(UTC)).total_seconds()
            if not await self.sleep_until(delay) or due is None:
                continue  # stopping, or woken by a reload: recompute
            await self.run_once(due.date())

    async def run_once(self, day: date) -> DigestRun | None:
        """Send ``day``'s digests unless another node did; None when skipped or failed."""
        mine = secrets.token_hex(8).encode()
        try:
            owner = await self.store.setting(f"digest-run:{day.isoformat()}", mine)
            if owner != mine:
                log.info("digest_skipped", extra={"day": day.isoformat(), "by": "another node"})
                return None
            config = self.config()
            key = await link_key(config.web, config.base_dir, self.store)
            run = await send_digests(
                config, self.store, key, since=datetime.now(UTC) - _WINDOW, send=True
            )
        except Exception as exc:  # store down, bad base_url, anything: log, try tomorrow
            log.error(
                "digest_run_failed",
                extra={"day": day.isoformat(), "error": f"{type(exc).__name__}: {exc}"},
            )
            return None
        log.info(
            "digest_run",
            extra={"day": day.isoformat(), "sent": run.sent, "failed": run.failed},
        )
        return run
