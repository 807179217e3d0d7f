"""The report schedule inside ``gateway run``: send what is due at interval boundaries.

One process per gateway runs it (the only one, or worker 0, as the quarantine
purge); in a cluster on Redis every node runs it and the store's lease lets one
send. It wakes ``send_delay`` after each interval ends (UTC-aligned), and once
shortly after start to catch up on what a stopped gateway left. Reports that
failed temporarily (relay, DNS, store) are retried an hour later; a run cut
short by its time budget goes on a minute later. A failure is logged, never
stops the server. A reload (SIGHUP) re-reads the config at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.config import Config
from gateway.dmarcreports.recorder import interval_start
from gateway.dmarcreports.sender import ReportSender
from gateway.housekeeping import Housekeeper

__all__ = ["ReportScheduler"]

log = logging.getLogger("gateway.dmarcreports")

_FIRST_DELAY = 60.0  # seconds after start: catching up never slows a start or a restart loop
_RETRY_DELAY = 3600.0  # seconds before retrying reports that failed temporarily


class ReportScheduler(Housekeeper):
    def __init__(
        self,
        sender: ReportSender,
        config: Callable[[], Config],
        *,
        first_delay: float = _FIRST_DELAY,
    ) -> None:
        super().__init__()
        self.sender = sender
        self.config = config
        self.first_delay = first_delay

    def next_run(self, now: float) -> float:
        """``send_delay`` after the end of the interval in progress (or of the last one)."""
        cfg = self.config().dmarc_reports
        due = interval_start(cfg, now) + cfg.send_delay
        return due if due > now else due + cfg.interval

    async def _run(self) -> None:
        due = time.time() + self.first_delay
        while not self._stopping:
            enabled = self.config().dmarc_reports.enabled
            if not await self.sleep_until(due - time.time() if enabled else None):
                continue  # stopping, or woken by a reload: recompute
            retry = True
            try:
                outcomes = await self.sender.send_due()
                retry = any(o.retry for o in outcomes)
            except Exception as exc:
                log.error(
                    "dmarc_reports_send_failed", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
            now = time.time()
            due = self.next_run(now)
            if self.sender.unfinished:
                due = now + _FIRST_DELAY  # cut short at its time budget: go on shortly
            elif retry:
                due = min(due, now + _RETRY_DELAY)  # relay or DNS trouble: not a day late
