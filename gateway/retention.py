"""Quarantine retention, enforced by the running gateway: a purge every ``purge_interval``.

Admins expect the ``quarantine.retention_days`` they configured to hold
without a cron job (amavisd and Proxmox clean their quarantine daily). The
purge runs as a task in the server's event loop (the stores never block it),
first ``min(purge_interval, 60 s)`` after start, then every interval;
``purge_interval = 0`` turns it off and leaves ``gateway quarantine purge``
to cron. A failure is logged (``quarantine_purge_failed``) and retried at the
next interval; it never stops the server. After a reload the new interval and
retention apply from the next wake-up.

One process per gateway purges (the single process, or worker 0 of
``server.workers``); cluster nodes sharing PostgreSQL may all purge, the
store makes that safe (each message deleted and counted once, claimed
releases skipped: :meth:`~gateway.quarantine.QuarantineStore.purge`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from gateway import metrics
from gateway.config import QuarantineConfig
from gateway.housekeeping import Housekeeper
from gateway.quarantine import QuarantineStore, retention_cutoff

__all__ = ["RetentionPurger"]

log = logging.getLogger("gateway.retention")

_FIRST_DELAY = 60.0  # seconds after start at most: starting (or a restart loop) is not slowed
_BATCH = 500  # messages per store call: a stop waits for one batch, never a whole backlog


class RetentionPurger(Housekeeper):
    """Purges ``store`` on the schedule of the current config (read at every wake-up)."""

    def __init__(
        self,
        store: QuarantineStore,
        config: Callable[[], QuarantineConfig],
        *,
        batch: int = _BATCH,
    ) -> None:
        super().__init__()
        self.store = store
        self.config = config
        self.batch = batch

    async def _run(self) -> None:
        last = time.monotonic()
        first = True
        while not self._stopping:
            interval = self.config().purge_interval
            due = None
            if interval > 0:
                due = last + (min(interval, _FIRST_DELAY) if first else interval)
            if not await self.sleep_until(None if due is None else due - time.monotonic()):
                continue  # stopping, or woken by a reload: recompute the schedule
            await self.purge()
            last = time.monotonic()
            first = False

    async def purge(self) -> int | None:
        """One purge of everything past retention now; the count, or None when it failed."""
        config = self.config()
        cutoff = retention_cutoff(config, datetime.now(UTC))
        started = time.monotonic()
        total = 0
        try:
            while not self._stopping:
                n = await self.store.purge(cutoff, limit=self.batch)
                total += n
                metrics.QUARANTINE_PURGED.inc(n)
                if n < self.batch:
                    break
        except Exception as exc:  # the store's QuarantineError or anything else: retry later
            metrics.QUARANTINE_PURGE_FAILURES.inc()
            log.error(
                "quarantine_purge_failed",
                extra={
                    "error": f"{type(exc).__name__}: {exc}",
                    "count": total,
                    "cutoff": cutoff.isoformat(),
                    "retry_in": config.purge_interval,
                },
            )
            return None
        if total:  # before the log line: whoever reads it sees the gauge already current
            with contextlib.suppress(Exception):
                metrics.QUARANTINE_MESSAGES.set(await self.store.count())
        log.info(
            "quarantine_purged",
            extra={
                "count": total,
                "cutoff": cutoff.isoformat(),
                "retention_days": config.retention_days,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return total
