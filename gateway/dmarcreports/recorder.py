"""Recording for the reports, off the hand-off's path: never delays or fails a message.

:meth:`ReportRecorder.record` only schedules a task (at most ``max_pending``
at once; past that a message is counted as ``overload`` and not recorded, so a
slow store under a flood cannot pile up tasks). The task reads the policy
record back through the caching resolver, builds the rows and adds them to
the store under a deadline; every failure is logged and counted, none raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gateway import metrics
from gateway.api import Resolver
from gateway.config import DmarcReportsConfig
from gateway.dmarcreports.rows import rows_for
from gateway.dmarcreports.store import ReportStore
from gateway.engine import Evaluation
from policies._authcommon import org_aligned

__all__ = ["ReportRecorder", "excluded", "interval_start"]

log = logging.getLogger("gateway.dmarcreports")

_DEADLINE = 10.0  # seconds for one message's rows (DNS cache hits and one store call each)
_CLOSE_WAIT = 5.0  # seconds close() lets pending recordings finish


def interval_start(config: DmarcReportsConfig, now: float) -> int:
    """The UTC-aligned interval ``now`` falls in (the epoch is a UTC midnight)."""
    return int(now // config.interval) * config.interval


def excluded(config: DmarcReportsConfig, domain: str) -> bool:
    return any(org_aligned(domain, d) for d in config.exclude_domains)


class ReportRecorder:
    def __init__(
        self,
        config: DmarcReportsConfig,
        store: ReportStore,
        resolver: Resolver,
        *,
        max_pending: int = 256,
    ) -> None:
        self.config = config
        self.store = store
        self.resolver = resolver
        self.max_pending = max_pending
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, evaluation: Evaluation, action: str) -> None:
        """Schedule recording of a settled message (``action`` as the client was answered)."""
        if action == "tempfail":
            return  # not handled: the client will try again, count it then
        auth = evaluation.verdict.auth
        if not any(a.method == "dmarc" and a.result in ("pass", "fail") for a in auth):
            return
        if len(self._tasks) >= self.max_pending:
            metrics.DMARC_REPORT_RECORDS.labels(outcome="overload").inc()
            return
        task = asyncio.get_running_loop().create_task(self._record(evaluation, action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, evaluation: Evaluation, action: str) -> None:
        env = evaluation.envelope
        at = env.received_at.timestamp() if env.received_at else time.time()
        cfg = self.config
        interval = interval_start(cfg, at)
        expires = interval + cfg.interval + cfg.retention_days * 86_400
        try:
            async with asyncio.timeout(_DEADLINE):
                rows = await rows_for(
                    resolver=self.resolver,
                    auth=evaluation.verdict.auth,
                    symbols=[(s.name, s.detail) for s in evaluation.verdict.symbols],
                    action=action,
                    client_ip=env.client_ip or "0.0.0.0",  # noqa: S104 - unknown client: still a row
                    mail_from=env.mail_from,
                    helo=env.helo,
                )
                for policy, row in rows:
                    if excluded(cfg, policy.domain):
                        metrics.DMARC_REPORT_RECORDS.labels(outcome="excluded").inc()
                        continue
                    stored = await self.store.add(
                        interval,
                        policy,
                        row,
                        max_rows=cfg.max_rows_per_domain,
                        max_domains=cfg.max_domains,
                        expires=expires,
                    )
                    metrics.DMARC_REPORT_RECORDS.labels(
                        outcome="stored" if stored else "dropped"
                    ).inc()
        except Exception as exc:  # the store, DNS, a deadline: counted, never the message's problem
            metrics.DMARC_REPORT_RECORDS.labels(outcome="failed").inc()
            log.warning(
                "dmarc_report_record_failed",
                extra={"queue_id": env.queue_id, "error": f"{type(exc).__name__}: {exc}"},
            )

    async def close(self) -> None:
        """Let pending recordings finish (bounded), then close the store."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=_CLOSE_WAIT)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self.store.close()
