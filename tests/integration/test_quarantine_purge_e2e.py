"""The running gateway enforces ``quarantine.retention_days`` itself, every ``purge_interval``.

Messages are put into the gateway's own local quarantine through the store
API with an old ``received_at``; the gateway (a real subprocess) purges them
on its schedule. Every wait is for a log event, never for a time.
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.quarantine import LocalQuarantine, QuarantineItem
from gateway.server import start
from gateway.testing.harness import GatewayProcess, write_config
from gateway.testing.quarantine import held_item
from gateway.testing.sink import SinkServer

GatewayFactory = Callable[..., GatewayProcess]
Connect = Callable[..., smtplib.SMTP]

RAW = b"From: a@sender.test\r\nSubject: held\r\n\r\nbody\r\n"
SHORT = 0.2  # seconds between purges in these tests


def held(days_old: float) -> QuarantineItem:
    return held_item(
        len(RAW),
        received_at=datetime.now(UTC) - timedelta(days=days_old),
        helo="mx.sender.test",
        mail_from="a@sender.test",
    )


def put(workdir: Path, *items: QuarantineItem) -> None:
    async def go() -> None:
        store = LocalQuarantine(workdir / "quarantine")
        for it in items:
            await store.put(it, RAW)
        await store.close()

    asyncio.run(go())


def held_ids(workdir: Path) -> set[str]:
    async def go() -> set[str]:
        store = LocalQuarantine(workdir / "quarantine")
        try:
            return {i.id for i in await store.list(limit=1000)}
        finally:
            await store.close()

    return asyncio.run(go())


def metric(port: int | None, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


def test_gateway_purges_messages_past_retention_keeps_fresh_ones_and_says_so(
    make_gateway: GatewayFactory, sink: SinkServer, tmp_path: Path
) -> None:
    old, recent, fresh = held(40), held(5), held(0)
    put(tmp_path, old, recent, fresh)
    gw = make_gateway(sink, {"quarantine.purge_interval": SHORT}, workdir=tmp_path)
    event = gw.wait_for_event("quarantine_purged", match={"count": 1})
    assert event is not None, gw.log_lines()[-20:]
    assert event["retention_days"] == 30
    cutoff = datetime.fromisoformat(event["cutoff"])
    assert old.received_at < cutoff < recent.received_at
    assert held_ids(tmp_path) == {recent.id, fresh.id}
    assert metric(gw.metrics_port, "gateway_quarantine_purged_total") == 1.0
    assert metric(gw.metrics_port, "gateway_quarantine_messages") == 2.0
    # A reload with a shorter retention applies at the next purge.
    gw.rewrite_config({"quarantine.retention_days": 3})
    gw.signal(signal.SIGHUP)
    event = gw.wait_for_event("quarantine_purged", match={"count": 1, "retention_days": 3})
    assert event is not None, gw.log_lines()[-20:]
    assert held_ids(tmp_path) == {fresh.id}
    assert gw.stop() == 0


def test_interval_zero_leaves_purging_to_cron_until_a_reload_sets_one(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect, tmp_path: Path
) -> None:
    old = held(40)
    put(tmp_path, old)
    gw = make_gateway(sink, {"quarantine.purge_interval": 0}, workdir=tmp_path)
    with connect(gw.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], b"Subject: t\r\n\r\nhi\r\n")
    assert gw.wait_for_event("message_processed") is not None
    assert gw.events("quarantine_purged") == [] and held_ids(tmp_path) == {old.id}
    gw.rewrite_config({"quarantine.purge_interval": SHORT})
    gw.signal(signal.SIGHUP)
    assert gw.wait_for_event("config_reloaded") is not None
    # The first purge ever finds the old message: nothing purged it before the reload.
    first = gw.wait_for_event("quarantine_purged")
    assert first is not None and first["count"] == 1
    assert held_ids(tmp_path) == set()
    assert gw.stop() == 0


def test_a_failing_purge_is_logged_retried_and_the_gateway_keeps_serving(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect, tmp_path: Path
) -> None:
    index = tmp_path / "quarantine" / "index.sqlite"
    index.parent.mkdir(parents=True)
    index.write_bytes(b"this is not an SQLite database, " * 64)
    gw = make_gateway(sink, {"quarantine.purge_interval": SHORT}, workdir=tmp_path)
    failed = gw.wait_for_event("quarantine_purge_failed", after=1)  # the second: a retry
    assert failed is not None, gw.log_lines()[-20:]
    assert failed["level"] == "error" and "not a database" in failed["error"]
    with connect(gw.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], b"Subject: t\r\n\r\nhi\r\n")
    assert len(sink.messages) == 1
    assert gw.stop() == 0


def test_with_two_workers_worker_zero_purges(
    make_gateway: GatewayFactory, sink: SinkServer, tmp_path: Path
) -> None:
    old = held(40)
    put(tmp_path, old)
    gw = make_gateway(
        sink, {"server.workers": 2, "quarantine.purge_interval": SHORT}, workdir=tmp_path
    )
    assert gw.wait_for_event("quarantine_purged", match={"count": 1}) is not None
    assert held_ids(tmp_path) == set()
    assert gw.stop() == 0


async def test_only_the_single_process_or_worker_zero_runs_the_purge(tmp_path: Path) -> None:
    """Pre-forked workers share one quarantine: one purger per gateway is enough."""
    path = write_config({"quarantine.purge_interval": 0}, tmp_path)
    for worker, purges in ((None, True), (0, True), (1, False)):
        running = await start(path, worker=worker)
        try:
            assert (running.purger is not None) is purges, worker
        finally:
            await running.stop(0)
