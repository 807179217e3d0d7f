"""Metrics across ``server.workers`` processes: one /metrics answer for the whole gateway.

Each worker is a whole gateway with its own in-process Prometheus registry.
Every worker writes a snapshot of its registry (Prometheus text) into a
directory the supervisor created before forking, once a second and when it
stops; worker 0, which serves ``/metrics``, answers with its live registry
merged with the other workers' latest snapshots: counters, histograms and
session gauges are summed, gauges that describe shared things (the quarantine
size, build info) take the largest value. A scrape first asks every worker
for a snapshot now (SIGUSR1, which the supervisor passes on to all of them)
and waits for them, up to half a second: it counts everything that happened
before it, not what a second-old snapshot held.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["MetricsShare", "merge", "prepare_share_dir", "remove_share_dir"]

log = logging.getLogger("gateway.workers")

SNAPSHOT_INTERVAL = 1.0  # seconds between a worker's snapshots
FRESH_WAIT = 0.5  # seconds a scrape waits for the other workers' fresh snapshots
# Gauges whose every worker reports the same shared quantity: take the largest, not the sum.
_MAX_GAUGES = frozenset(
    {"gateway_quarantine_messages", "gateway_build_info", "gateway_smtp_proxy_connection_limit"}
)

_share_dir: Path | None = None


def prepare_share_dir(user: str = "", group: str = "") -> Path:
    """Create the snapshot directory (in the supervisor, before forking workers).

    Workers drop privileges to ``server.user``/``server.group``: the directory
    is theirs, so they can write to it (an unknown account is reported by the
    worker's own privilege drop).
    """
    global _share_dir
    _share_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    if user and os.geteuid() == 0:
        with contextlib.suppress(KeyError, OSError):
            account = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else account.pw_gid
            os.chown(_share_dir, account.pw_uid, gid)
    return _share_dir


def remove_share_dir() -> None:
    """Remove the snapshot directory (in the supervisor, after the workers exited)."""
    global _share_dir
    if _share_dir is not None:
        shutil.rmtree(_share_dir, ignore_errors=True)
        _share_dir = None


def merge(texts: Iterable[str]) -> list[Metric]:
    """Prometheus text expositions of several workers -> one set of metric families."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in acc:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(acc[key], s.value)  # the oldest worker's start
                elif fam.type == "gauge" and fam.name in _MAX_GAUGES:
                    acc[key] = max(acc[key], s.value)
                else:
                    acc[key] += s.value
    out = []
    for name, fam in families.items():
        fam.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
        out.append(fam)
    return out


class _Merged:
    """A collector over already merged families (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class MetricsShare:
    """One worker's side: write snapshots; worker 0 also renders the merged view."""

    def __init__(self, registry: CollectorRegistry, index: int, directory: Path) -> None:
        self.registry = registry
        self.index = index
        self.directory = directory
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_worker(cls, registry: CollectorRegistry, index: int) -> MetricsShare | None:
        """The share for worker ``index``, or None when not running under a supervisor."""
        if _share_dir is None:
            return None
        return cls(registry, index, _share_dir)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        # A scrape on worker 0 asks for a snapshot now (through the supervisor).
        loop.add_signal_handler(signal.SIGUSR1, self._write_now)
        self._write_now()  # from the start: a scrape knows this worker exists

    def _write_now(self) -> None:
        try:
            self.write()
        except OSError as exc:
            log.warning("metrics_snapshot_failed", extra={"error": str(exc)})

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a late request must not kill us
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            self.write()  # the final counts of a draining worker

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            try:
                self.write()
            except OSError as exc:  # a full /tmp must not stop the worker
                log.warning("metrics_snapshot_failed", extra={"error": str(exc)})

    def write(self) -> None:
        """Replace this worker's snapshot atomically (a reader never sees half a file)."""
        path = self.directory / f"worker-{self.index}.prom"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        # The first line (a comment to Prometheus' parser) says when, in time.time_ns().
        tmp.write_bytes(b"# written_ns %d\n" % time.time_ns() + generate_latest(self.registry))
        tmp.replace(path)

    async def render_fresh(self) -> bytes:
        """:meth:`render` after every worker wrote a snapshot for this scrape (bounded wait)."""
        asked = time.time_ns()
        with contextlib.suppress(OSError):
            os.kill(os.getppid(), signal.SIGUSR1)  # the supervisor passes it to every worker
        step = 0.005  # files of other processes: polled, nothing to await
        for _ in range(round(FRESH_WAIT / step)):
            if self._snapshots_since(asked):
                break
            await asyncio.sleep(step)
        return self.render()

    def _snapshots_since(self, ns: int) -> bool:
        """Has every other worker's snapshot been written since ``ns`` (its first line)?"""
        for path in self.directory.glob("worker-*.prom"):
            if path.name == f"worker-{self.index}.prom":
                continue
            try:
                with path.open("rb") as f:
                    stamp = f.readline().split()
                if len(stamp) != 3 or int(stamp[2]) < ns:
                    return False
            except (OSError, ValueError):
                continue
        return True

    def render(self) -> bytes:
        """This worker's live registry merged with every other worker's latest snapshot."""
        texts = [generate_latest(self.registry).decode("utf-8")]
        for path in sorted(self.directory.glob("worker-*.prom")):
            if path.name == f"worker-{self.index}.prom":
                continue
            with contextlib.suppress(OSError, UnicodeDecodeError):
                texts.append(path.read_text(encoding="utf-8"))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge(texts)))
        return generate_latest(registry)
