"""DMARC aggregate reports: rua parsing, rows, the store's caps, the XML, sending.

DNS answers come from the real test DNS server, reports go over real SMTP to
the sink; the XML is checked against RFC 7489's schema (lxml) and read back
with parsedmarc, a third-party report parser (docs/dmarc-reports.md).
"""

from __future__ import annotations

import email
import email.policy
import gzip
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
import redis.asyncio
from lxml import etree

from gateway import metrics
from gateway.api import AuthResult
from gateway.config import Config, DNSConfig, RelayConfig, config_from_mapping
from gateway.dmarcreports.rows import PolicyPublished, Row, rows_for
from gateway.dmarcreports.sender import ReportSender
from gateway.dmarcreports.store import (
    LocalReportStore,
    RedisReportStore,
    ReportStore,
    open_report_store,
)
from gateway.dmarcreports.xml import build_xml
from gateway.dns import CachingResolver
from gateway.relay import Relay
from gateway.testing.dnsserver import DNSServer
from gateway.testing.require import require
from gateway.testing.sink import SinkServer
from policies.dmarc import MAX_RUA, parse_record, parse_rua

XSD = Path(__file__).parent / "data" / "rfc7489-rua.xsd"
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
DAY = 86_400
T0 = (int(time.time()) // DAY - 1) * DAY  # yesterday's UTC midnight: Redis keys must not expire
ZONE = {
    "_dmarc.example.com": [
        (
            "TXT",
            "v=DMARC1; p=reject; sp=quarantine; adkim=s; pct=100; "
            "rua=mailto:dmarc@example.com, https://reports.example.com/in, "
            "mailto:agg@thirdparty.test!50k, mailto:agg@unverified.test",
        )
    ],
    "example.com._report._dmarc.thirdparty.test": [("TXT", "v=DMARC1")],
    "_dmarc.thirdparty.test": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.flood.test": [
        ("TXT", "v=DMARC1; p=none; rua=" + ",".join(f"mailto:r{i}@flood.test" for i in range(40)))
    ],
    "_dmarc.norua.test": [("TXT", "v=DMARC1; p=none")],
}


# -- rua ---------------------------------------------------------------------


def test_rua_keeps_the_first_ten_uris_of_a_hostile_list_and_counts_the_rest() -> None:
    uris, dropped = parse_rua(",".join(f"mailto:a{i}@example.com" for i in range(50)))
    assert len(uris) == MAX_RUA
    assert dropped == 40
    assert uris[0].address == "a0@example.com"


def test_rua_parses_size_suffixes_and_keeps_other_schemes_for_the_sender_to_refuse() -> None:
    uris, dropped = parse_rua(
        "mailto:a@example.com!10m, mailto:b@example.com!512, mailto:c@example.com!1k,"
        " https://example.com/rua, mailto:d@example.com!lots"
    )
    assert dropped == 0
    assert [u.max_size for u in uris] == [10 << 20, 512, 1024, None, None]
    assert uris[3].scheme == "https" and uris[3].address == ""


@pytest.mark.parametrize(
    "value",
    [
        "mailto:",
        "mailto:@example.com",
        "mailto:a b@example.com",
        "mailto:a@",
        "mailto:a@" + "x" * 300 + ".com",
        "mailto:a%40b@example.com",  # an @ in the local part once decoded
        "no-scheme@example.com",
        "mailto:a@example.com" + "!" + "9" * 5000,
    ],
)
def test_malformed_rua_uris_are_dropped_and_counted(value: str) -> None:
    uris, dropped = parse_rua(value)
    assert (uris, dropped) == ((), 1)


def test_record_keeps_pct_and_rua_and_ignores_absurd_pct() -> None:
    rec = parse_record(
        "example.com", "v=DMARC1; p=none; pct=" + "9" * 5000 + "; rua=mailto:x@y.test"
    )
    assert rec is not None
    assert rec.pct == 100
    assert rec.rua[0].address == "x@y.test"


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(ZONE, zones=["com", "test"]) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> CachingResolver:
    return CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=2.0))


def _config(tmp_path: Path, **reports: Any) -> Config:
    data = {
        "server": {"accepted_domains": ["example.org"], "hostname": "mx.example.org"},
        "state": {"path": str(tmp_path / "state.sqlite")},
        "dmarc_reports": {
            "enabled": True,
            "org_name": "Example Org <&>",
            "email": "dmarc-noreply@example.org",
            **reports,
        },
    }
    return config_from_mapping(data, tmp_path / "gateway.toml")


@pytest.fixture(params=["local", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReportStore]:
    if request.param == "local":
        local = LocalReportStore(tmp_path / "state.sqlite")
        yield local
        await local.close()
        return
    admin = redis.asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        await admin.ping()
    except (redis.RedisError, OSError) as exc:
        await admin.aclose()
        require(False, f"Redis at {REDIS_URL} unreachable: {exc}")  # fails under CI=true
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    remote = RedisReportStore(REDIS_URL, prefix)
    try:
        yield remote
    finally:
        await remote.close()
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


def _row(ip: str = "192.0.2.1", selector: str = "s1", **kw: Any) -> Row:
    from gateway.dmarcreports.rows import DKIMEntry, Override, SPFEntry

    fields: dict[str, Any] = {
        "source_ip": ip,
        "header_from": "example.com",
        "disposition": "reject",
        "dkim_aligned": "fail",
        "spf_aligned": "fail",
        "reasons": (Override("local_policy", "monitor <only> & co"),),
        "dkim": (DKIMEntry("example.com", selector, "fail"),),
        "spf": (SPFEntry("example.com", "mfrom", "softfail"),),
    }
    fields.update(kw)
    return Row(**fields)


POLICY = PolicyPublished("example.com", "s", "r", "reject", "quarantine", 100)


async def _add(store: ReportStore, row: Row, policy: PolicyPublished = POLICY, **caps: int) -> bool:
    return await store.add(
        T0,
        policy,
        row,
        max_rows=caps.get("max_rows", 100),
        max_domains=caps.get("max_domains", 100),
        expires=T0 + 30 * DAY,
    )


# -- store -------------------------------------------------------------------


async def test_equal_rows_are_counted_in_one_row(store: ReportStore) -> None:
    for _ in range(3):
        assert await _add(store, _row())
    assert await _add(store, _row(ip="2001:db8::1"))
    report = await store.report(T0, "example.com")
    assert report is not None
    assert sorted((r.source_ip, n) for r, n in report.rows) == [
        ("192.0.2.1", 3),
        ("2001:db8::1", 1),
    ]
    assert report.policy == POLICY
    assert await store.intervals() == [T0]
    assert await store.domains(T0) == ["example.com"]


async def test_a_flood_of_distinct_rows_is_capped_per_domain_and_counted(
    store: ReportStore,
) -> None:
    stored = [await _add(store, _row(ip=f"198.51.100.{i}"), max_rows=5) for i in range(12)]
    assert stored.count(True) == 5
    assert await _add(store, _row(ip="198.51.100.0"), max_rows=5)  # a known row still counts
    report = await store.report(T0, "example.com")
    assert report is not None
    assert len(report.rows) == 5
    assert report.dropped == 7


async def test_domains_past_the_cap_are_counted_not_stored(store: ReportStore) -> None:
    for i in range(6):
        policy = PolicyPublished(f"d{i}.test")
        await _add(store, _row(header_from=f"d{i}.test"), policy, max_domains=4)
    assert len(await store.domains(T0)) == 4
    assert await store.dropped_domains(T0) == 2


async def test_the_sending_lease_is_exclusive_and_marks_settle_domains(store: ReportStore) -> None:
    token = await store.lock(60)
    assert token is not None
    assert await store.lock(60) is None
    await store.unlock(token)
    again = await store.lock(60)
    assert again is not None
    await store.unlock(again)
    await store.mark(T0, "example.com", "sent", T0 + 30 * DAY)
    assert await store.marks(T0) == {"example.com": "sent"}
    assert [await store.count_destination(1, "A@x.test", time.time() + DAY) for _ in range(2)] == [
        1,
        2,
    ]


# -- rows from a verdict -----------------------------------------------------


async def test_rows_report_the_disposition_overrides_and_raw_results(
    resolver: CachingResolver,
) -> None:
    auth = (
        AuthResult("spf", "pass", properties=(("smtp.mailfrom", "bounce@mail.example.com"),)),
        AuthResult("dkim", "pass", properties=(("header.d", "example.com"), ("header.s", "s1"))),
        AuthResult("dkim", "fail", properties=(("header.d", "esp.test"), ("header.s", "k"))),
        AuthResult(
            "dmarc",
            "pass",
            properties=(("header.from", "example.com"), ("polrec.domain", "example.com")),
        ),
    )
    ((policy, row),) = await rows_for(
        resolver=resolver,
        auth=auth,
        symbols=[],
        action="relay",
        client_ip="192.0.2.7",
        mail_from="bounce@mail.example.com",
        helo="mail.example.com",
    )
    assert (policy.p, policy.sp, policy.adkim) == ("reject", "quarantine", "s")
    assert row.disposition == "none"
    assert row.dkim_aligned == "pass"
    assert row.spf_aligned == "pass"  # aspf=r: mail.example.com aligns with example.com
    assert [(d.domain, d.selector, d.result) for d in row.dkim] == [
        ("example.com", "s1", "pass"),
        ("esp.test", "k", "fail"),
    ]
    failing = AuthResult(
        "dmarc",
        "fail",
        properties=(("header.from", "sub.example.com"), ("polrec.domain", "example.com")),
    )
    ((_, row),) = await rows_for(
        resolver=resolver,
        auth=(
            failing,
            AuthResult("spf", "pass", properties=(("smtp.mailfrom", "postmaster@list.test"),)),
        ),
        symbols=[("DMARC_ARC_OVERRIDE", "list.test recorded dmarc=pass")],
        action="relay",
        client_ip="192.0.2.8",
        mail_from="",
        helo="list.test",
    )
    assert (row.header_from, row.disposition) == ("sub.example.com", "none")
    assert [(r.type, r.comment) for r in row.reasons] == [
        ("trusted_forwarder", "list.test recorded dmarc=pass")
    ]
    # a null sender: SPF checked the HELO name (RFC 7208 §2.4), reported with scope helo
    assert [(s.domain, s.scope, s.result) for s in row.spf] == [("list.test", "helo", "pass")]


# -- XML -----------------------------------------------------------------------


async def test_the_report_is_valid_against_the_rfc_schema_and_parsedmarc_reads_it(
    tmp_path: Path,
) -> None:
    store = LocalReportStore(tmp_path / "s.sqlite")
    try:
        for _ in range(4):
            await _add(store, _row(selector="sel<&>"))
        await _add(store, _row(ip="2001:db8::5", disposition="none", dkim=(), reasons=()))
        for i in range(3):
            await _add(store, _row(ip=f"203.0.113.{i}"), max_rows=2)
        report = await store.report(T0, "example.com")
    finally:
        await store.close()
    assert report is not None
    cfg = _config(tmp_path).dmarc_reports
    xml = build_xml(cfg, report)
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    doc = etree.fromstring(xml)
    assert schema.validate(doc), schema.error_log
    assert doc.findtext("report_metadata/org_name") == "Example Org <&>"
    assert "3 message(s) not counted" in (doc.findtext("report_metadata/error") or "")
    parsed: Any = parsedmarc.parse_aggregate_report_file(
        gzip.compress(xml), offline=True, always_use_local_files=True
    )
    assert parsed["policy_published"]["domain"] == "example.com"
    assert parsed["policy_published"]["p"] == "reject"
    assert parsed["report_metadata"]["begin_date"].startswith("20")
    counts = {r["source"]["ip_address"]: r["count"] for r in parsed["records"]}
    assert counts == {"192.0.2.1": 4, "2001:db8::5": 1}
    first = next(r for r in parsed["records"] if r["count"] == 4)
    assert first["auth_results"]["dkim"][0]["selector"] == "sel<&>"
    assert first["policy_evaluated"]["disposition"] == "reject"
    assert first["policy_evaluated"]["policy_override_reasons"][0]["type"] == "local_policy"


# -- sending -------------------------------------------------------------------


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_send_delivers_gzip_reports_to_verified_mailto_destinations_only(
    tmp_path: Path, resolver: CachingResolver
) -> None:
    with SinkServer() as sink:
        config = _config(tmp_path)
        config = config_from_mapping(
            {
                "server": {"accepted_domains": ["example.org"], "hostname": "mx.example.org"},
                "relay": {"host": sink.host, "port": sink.port, "verify_recipients": False},
                "state": {"path": str(tmp_path / "state.sqlite")},
                "dmarc_reports": {
                    "enabled": True,
                    "org_name": "Example Org",
                    "email": "dmarc-noreply@example.org",
                },
            },
            tmp_path / "gateway.toml",
        )
        store = open_report_store(config)
        relay = Relay(RelayConfig(host=sink.host, port=sink.port), "mx.example.org")
        sender = ReportSender(lambda: config, store, lambda: resolver, lambda: relay)
        unverified = _value("gateway_dmarc_reports_total", outcome="skipped", reason="unverified")
        try:
            await _add(store, _row())
            for domain in ("flood.test", "norua.test"):
                await _add(store, _row(header_from=domain), PolicyPublished(domain))
            early = await sender.send_due(T0 + DAY - 1)  # the interval is not over yet
            assert early == []
            outcomes = await sender.send_due(T0 + DAY + 600)
            again = await sender.send_due(T0 + DAY + 1200)
        finally:
            await relay.close()
            await store.close()
        got = sink.wait_for(12)
    summary = {(o.domain, o.destination, o.outcome, o.reason) for o in outcomes}
    assert ("example.com", "mailto:dmarc@example.com", "sent", "ok") in summary
    assert ("example.com", "mailto:agg@thirdparty.test", "sent", "ok") in summary
    assert ("example.com", "https://reports.example.com/in", "skipped", "not_mailto") in summary
    assert ("example.com", "mailto:agg@unverified.test", "skipped", "unverified") in summary
    assert ("flood.test", "", "skipped", "rua_dropped") in summary
    assert ("norua.test", "", "skipped", "no_rua") in summary
    assert again == []  # settled: never sent twice
    assert (
        _value("gateway_dmarc_reports_total", outcome="skipped", reason="unverified")
        == unverified + 1
    )
    by_rcpt = {d.rcpt_tos[0]: d for d in got}
    assert len(by_rcpt) == 12  # 2 for example.com, the first 10 of flood.test's 40
    mail = email.message_from_bytes(by_rcpt["dmarc@example.com"].data, policy=email.policy.default)
    assert mail["Subject"].startswith(
        "Report Domain: example.com Submitter: example.org Report-ID: <"
    )
    (part,) = [p for p in mail.iter_attachments()]
    assert part.get_content_type() == "application/gzip"
    assert part.get_filename().startswith(f"example.org!example.com!{T0}!{T0 + DAY - 1}!")
    xml = gzip.decompress(part.get_content())
    assert etree.XMLSchema(etree.parse(str(XSD))).validate(etree.fromstring(xml))
    parsed: Any = parsedmarc.parse_report_email(
        by_rcpt["dmarc@example.com"].data, offline=True, always_use_local_files=True
    )
    assert parsed["report_type"] == "aggregate"
    assert parsed["report"]["policy_published"]["domain"] == "example.com"
