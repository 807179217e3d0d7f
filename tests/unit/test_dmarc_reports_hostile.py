"""DMARC reports against hostile records and failing services: every case bounded, counted.

Malformed or missing verification records, names too long to query, SERVFAIL,
tiny ``!size`` limits, a per-destination cap, excluded domains, a store that is
down while recording (never the message's problem), a flood of pending
recordings. Real DNS (the test server) and real SMTP (the sink) throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway import metrics
from gateway.api import Action, AuthResult
from gateway.config import Config, DNSConfig, RelayConfig, config_from_mapping
from gateway.dmarcreports.recorder import ReportRecorder
from gateway.dmarcreports.rows import PolicyPublished, Row
from gateway.dmarcreports.schedule import ReportScheduler
from gateway.dmarcreports.sender import ReportSender, SendOutcome
from gateway.dmarcreports.store import LocalReportStore, RedisReportStore
from gateway.dns import CachingResolver
from gateway.engine import Envelope, Evaluation
from gateway.pipeline import PipelineRun
from gateway.relay import Relay
from gateway.testing.dnsserver import DNSServer
from gateway.testing.sink import SinkServer
from gateway.verdict import Verdict

DAY = 86_400
T0 = (int(time.time()) // DAY - 1) * DAY
LONG_A = "a" * 63 + "." + "b" * 63 + ".test"
LONG_C = "c" * 63 + "." + "d" * 63 + ".test"
ZONE = {
    "_dmarc.badverify.test": [
        ("TXT", "v=DMARC1; p=none; rua=mailto:r@garbage.test,mailto:r@v2.test,mailto:r@fail.test")
    ],
    "badverify.test._report._dmarc.garbage.test": [("TXT", "this is not a DMARC record")],
    "badverify.test._report._dmarc.v2.test": [("TXT", "v=DMARC2")],
    f"_dmarc.{LONG_A}": [("TXT", f"v=DMARC1; p=none; rua=mailto:r@{LONG_C}")],
    "_dmarc.small.test": [("TXT", "v=DMARC1; p=none; rua=mailto:r@small.test!1k")],
    "_dmarc.busy.test": [("TXT", "v=DMARC1; p=none; rua=mailto:r@busy.test")],
    "_dmarc.skip.test": [("TXT", "v=DMARC1; p=none; rua=mailto:r@skip.test")],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    servfail = ["badverify.test._report._dmarc.fail.test"]
    with DNSServer(ZONE, zones=["test"], servfail=servfail) as server:
        yield server


def _config(tmp_path: Path, sink: SinkServer | None = None, **reports: Any) -> Config:
    data: dict[str, Any] = {
        "server": {"accepted_domains": ["example.org"], "hostname": "mx.example.org"},
        "state": {"path": str(tmp_path / "state.sqlite")},
        "dmarc_reports": {
            "enabled": True,
            "org_name": "Example Org",
            "email": "dmarc-noreply@example.org",
            **reports,
        },
    }
    if sink is not None:
        data["relay"] = {"host": sink.host, "port": sink.port}
    return config_from_mapping(data, tmp_path / "gateway.toml")


def _row(domain: str, ip: str = "192.0.2.1") -> Row:
    return Row(ip, domain, "none", "fail", "fail")


async def _send(
    tmp_path: Path, dns: DNSServer, domains: list[str], **reports: Any
) -> list[SendOutcome]:
    with SinkServer() as sink:
        config = _config(tmp_path, sink, **reports)
        store = LocalReportStore(tmp_path / "state.sqlite")
        resolver = CachingResolver(DNSConfig(nameservers=(dns.address,), timeout=2.0))
        relay = Relay(RelayConfig(host=sink.host, port=sink.port), "mx.example.org")
        sender = ReportSender(lambda: config, store, lambda: resolver, lambda: relay)
        try:
            for d in domains:
                for i in range(40):  # 40 rows: a report bigger than 1 KB gzip'd
                    await store.add(
                        T0,
                        PolicyPublished(d),
                        _row(d, f"198.51.100.{i}"),
                        max_rows=100,
                        max_domains=100,
                        expires=time.time() + DAY,
                    )
            return await sender.send_due(T0 + DAY + 3600)
        finally:
            await relay.close()
            await store.close()


def _reasons(outcomes: list[SendOutcome]) -> set[tuple[str, str, str]]:
    return {(o.destination, o.outcome, o.reason) for o in outcomes}


async def test_missing_malformed_and_failing_verification_records_skip_the_destination(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    outcomes = await _send(tmp_path, dns_server, ["badverify.test"])
    assert _reasons(outcomes) == {
        ("mailto:r@garbage.test", "skipped", "unverified"),
        ("mailto:r@v2.test", "skipped", "unverified"),
        ("mailto:r@fail.test", "skipped", "verify_temperror"),
    }


async def test_a_verification_name_longer_than_dns_allows_is_never_queried(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    outcomes = await _send(tmp_path, dns_server, [LONG_A])
    assert _reasons(outcomes) == {(f"mailto:r@{LONG_C}", "skipped", "name_too_long")}
    assert not [q for q in dns_server.queries if q[0].startswith(LONG_A + "._report")]


async def test_size_limits_and_the_daily_cap_per_destination_are_honoured(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    outcomes = await _send(
        tmp_path,
        dns_server,
        ["small.test", "busy.test", "skip.test"],
        max_per_destination_per_day=1,
        exclude_domains=["skip.test"],
        interval=3600,
    )
    assert _reasons(outcomes) == {
        ("mailto:r@small.test", "skipped", "too_large"),  # !1k: the message is larger
        ("mailto:r@busy.test", "sent", "ok"),
        ("", "skipped", "excluded"),
    }
    with SinkServer() as sink:
        config = _config(tmp_path, sink, max_per_destination_per_day=1, interval=3600)
        store = LocalReportStore(tmp_path / "state.sqlite")
        resolver = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=2.0))
        relay = Relay(RelayConfig(host=sink.host, port=sink.port), "mx.example.org")
        sender = ReportSender(lambda: config, store, lambda: resolver, lambda: relay)
        try:  # the next hour's report to the same address, the same UTC day
            hour = T0 + DAY + 3600
            await store.add(
                hour,
                PolicyPublished("busy.test"),
                _row("busy.test"),
                max_rows=10,
                max_domains=10,
                expires=time.time() + DAY,
            )
            later = await sender.send_due(T0 + DAY + 8000)
        finally:
            await relay.close()
            await store.close()
    assert ("mailto:r@busy.test", "skipped", "destination_limit") in _reasons(later)


def _evaluation(domain: str) -> Evaluation:
    auth = (
        AuthResult(
            "dmarc", "fail", properties=(("header.from", domain), ("polrec.domain", domain))
        ),
    )
    verdict = Verdict(Action.RELAY, Decimal(0), Decimal(5), (), "", None, auth)
    env = Envelope("192.0.2.9", "helo.test", "a@busy.test", ("b@example.org",), "Q1")
    return Evaluation(env, verdict, PipelineRun(()), ())  # type: ignore[arg-type]


def _records(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "gateway_dmarc_report_records_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_a_store_that_is_down_is_counted_and_never_raises_into_the_hand_off(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    config = _config(tmp_path)
    resolver = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=2.0))
    down = RedisReportStore("redis://127.0.0.1:1/0", "gwtest:")
    recorder = ReportRecorder(config.dmarc_reports, down, resolver)
    failed = _records("failed")
    recorder.record(_evaluation("busy.test"), "relay")
    await recorder.close()
    assert _records("failed") == failed + 1


async def test_pending_recordings_are_bounded_and_the_excess_is_counted(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    config = _config(tmp_path)
    resolver = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=2.0))
    store = LocalReportStore(tmp_path / "state.sqlite")
    recorder = ReportRecorder(config.dmarc_reports, store, resolver, max_pending=3)
    overload, stored = _records("overload"), _records("stored")
    for _ in range(10):
        recorder.record(_evaluation("busy.test"), "relay")
    recorder.record(_evaluation("busy.test"), "tempfail")  # will come again: not recorded
    await recorder.close()
    assert _records("overload") == overload + 7
    assert _records("stored") == stored + 3


def test_the_schedule_wakes_send_delay_after_each_utc_interval(tmp_path: Path) -> None:
    config = _config(tmp_path, interval=3600, send_delay=120)
    scheduler = ReportScheduler(None, lambda: config)  # type: ignore[arg-type]
    assert scheduler.next_run(T0 + 10) == T0 + 120
    assert scheduler.next_run(T0 + 121) == T0 + 3600 + 120


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("email", "", "dmarc-noreply@example.org"),
        ("org_name", "", "is required"),
        ("interval", 7000, "must divide a day"),
        ("exclude_domains", ["not a domain"], "must be a domain name"),
    ],
)
def test_config_names_the_bad_dmarc_reports_key(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _config(tmp_path, **{key: value})
    (line,) = err.value.problems
    assert line.startswith(f"dmarc_reports.{key}")
    assert message in line


def test_the_cli_refuses_a_config_with_reports_off(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main

    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    for action in ("preview", "send"):
        assert main(["dmarc-report", action, "--config", str(example)]) == 2
        assert "dmarc_reports.enabled is false" in capsys.readouterr().err


async def test_the_schedule_sends_what_a_stopped_gateway_left_soon_after_start(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    with SinkServer() as sink:
        config = _config(tmp_path, sink)
        store = LocalReportStore(tmp_path / "state.sqlite")
        resolver = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=2.0))
        relay = Relay(RelayConfig(host=sink.host, port=sink.port), "mx.example.org")
        sender = ReportSender(lambda: config, store, lambda: resolver, lambda: relay)
        scheduler = ReportScheduler(sender, lambda: config, first_delay=0.2)
        try:
            await store.add(  # yesterday's interval: due now
                T0,
                PolicyPublished("busy.test"),
                _row("busy.test"),
                max_rows=10,
                max_domains=10,
                expires=time.time() + DAY,
            )
            scheduler.start()
            (got,) = await asyncio.to_thread(sink.wait_for, 1)
            assert got.rcpt_tos == ("r@busy.test",)
            assert scheduler.next_run(time.time()) > time.time()
        finally:
            await scheduler.stop()
            await relay.close()
            await store.close()
    assert await _marks(tmp_path) == {"busy.test": "sent"}


async def _marks(tmp_path: Path) -> dict[str, str]:
    store = LocalReportStore(tmp_path / "state.sqlite")
    try:
        return await store.marks(T0)
    finally:
        await store.close()
