"""The life cycle every periodic task of ``gateway run`` shares (purge, digests, DMARC reports).

Each task is one asyncio task in the server's event loop, woken at its next
due time or early by a reload (SIGHUP: recompute the schedule from the new
config), and stopped with a bound: a stop waits for the work in progress at
most :data:`STOP_TIMEOUT` seconds, then cancels it. Subclasses write
``_run`` with :meth:`Housekeeper.sleep_until` as their only wait.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["STOP_TIMEOUT", "Housekeeper"]

STOP_TIMEOUT = 30.0  # seconds stop() waits for the work in progress before cancelling


class Housekeeper:
    """start / reconfigured / stop around a subclass's ``_run`` loop."""

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def reconfigured(self) -> None:
        """The config changed (SIGHUP): recompute the schedule now, not after the old one."""
        self._wake.set()

    async def stop(self) -> None:
        """Finish the work in progress (bounded), then end; never leaves work behind."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait([self._task], timeout=STOP_TIMEOUT)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def sleep_until(self, delay: float | None) -> bool:
        """Wait ``delay`` seconds (None: until woken); True when the time came, False when
        stopping or woken early by a reload (the caller recomputes its schedule)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if delay is None else max(0.0, delay)):
                await self._wake.wait()
            return False
        return not self._stopping
