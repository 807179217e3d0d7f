"""The metrics module: contract names exist, helpers count, the HTTP endpoint serves them."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import handoff, metrics
from gateway.api import Action, AuthResult, Result, Symbol
from gateway.engine import Envelope, Evaluation
from gateway.pipeline import PipelineRun, PolicyRun
from gateway.verdict import ScoredSymbol, Verdict

CONTRACT = {
    "gateway_messages_total",
    "gateway_auth_results_total",
    "gateway_policy_duration_seconds",
    "gateway_smtp_sessions_active",
    "gateway_relay_failures_total",
    "gateway_quarantine_messages",
}


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


def _sample(name: str, labels: dict[str, str]) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def _evaluation() -> Evaluation:
    run = PipelineRun(
        (
            PolicyRun("spf", Result(auth=(AuthResult("spf", "pass"),)), 0.01, "ok"),
            PolicyRun("slow", Result(symbols=(Symbol("POLICY_TIMEOUT"),)), 2.0, "timeout"),
        )
    )
    verdict = Verdict(
        action=Action.TEMPFAIL,
        score=Decimal("0.00"),
        required=Decimal("5.00"),
        symbols=(ScoredSymbol("POLICY_TIMEOUT", Decimal("0.00"), "slow", "", "timed out"),),
        reason="policy slow timed out",
        forced_by="slow",
        auth=(AuthResult("spf", "pass"),),
    )
    env = Envelope("192.0.2.1", "helo.test", "a@b.test", ("c@example.org",), "Q1")
    return Evaluation(env, verdict, run, ())


async def test_endpoint_serves_contract_metric_names_in_prometheus_text() -> None:
    async def ready() -> tuple[bool, str]:
        return True, ""

    endpoint = await metrics.start_http("127.0.0.1:0", ready)
    try:
        assert endpoint.port > 0
        status, headers, body = await _get(endpoint.port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        names = set()
        for family in text_string_to_metric_families(body.decode()):
            names.update(s.name for s in family.samples)
            names.add(family.name)
        assert names | {n + "_total" for n in names} >= CONTRACT
        assert "gateway_build_info" in names
    finally:
        await endpoint.close()


async def test_healthz_is_ok_and_readyz_follows_the_readiness_callback() -> None:
    state = {"ok": False}

    async def ready() -> tuple[bool, str]:
        return (True, "") if state["ok"] else (False, "downstream 127.0.0.1:10026 unreachable")

    endpoint = await metrics.start_http("127.0.0.1:0", ready)
    try:
        assert (await _get(endpoint.port, "/healthz"))[0] == 200
        status, _, body = await _get(endpoint.port, "/readyz")
        assert status == 503 and b"unreachable" in body
        state["ok"] = True
        status, _, body = await _get(endpoint.port, "/readyz")
        assert status == 200
        assert (await _get(endpoint.port, "/nope"))[0] == 404
        assert (await _get(endpoint.port, "/metrics", "POST"))[0] == 405
    finally:
        await endpoint.close()


async def test_readyz_is_503_when_the_readiness_check_raises() -> None:
    async def ready() -> tuple[bool, str]:
        raise ConnectionError("boom")

    endpoint = await metrics.start_http("127.0.0.1:0", ready)
    try:
        status, _, body = await _get(endpoint.port, "/readyz")
        assert status == 503 and b"ConnectionError" in body
    finally:
        await endpoint.close()


async def test_garbage_and_silent_clients_do_not_break_the_endpoint() -> None:
    async def ready() -> tuple[bool, str]:
        return True, ""

    endpoint = await metrics.start_http("127.0.0.1:0", ready)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"x" * 20000)  # over the head limit, no terminator
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        silent = await asyncio.open_connection("127.0.0.1", endpoint.port)
        assert (await _get(endpoint.port, "/healthz"))[0] == 200  # served while one idles
        silent[1].close()
    finally:
        await endpoint.close()


def test_record_evaluation_counts_policies_symbols_and_auth_but_not_the_action() -> None:
    before_runs = _sample("gateway_policy_runs_total", {"policy": "slow", "outcome": "timeout"})
    before_sym = _sample("gateway_symbols_total", {"symbol": "POLICY_TIMEOUT"})
    before_auth = _sample("gateway_auth_results_total", {"method": "spf", "result": "pass"})
    before_dur = _sample("gateway_policy_duration_seconds_count", {"policy": "spf"})
    before_msg = _sample("gateway_messages_total", {"action": "tempfail", "frontend": "smtp"})
    handoff.record_evaluation(_evaluation())
    assert _sample("gateway_policy_runs_total", {"policy": "slow", "outcome": "timeout"}) == (
        before_runs + 1
    )
    assert _sample("gateway_symbols_total", {"symbol": "POLICY_TIMEOUT"}) == before_sym + 1
    assert _sample("gateway_auth_results_total", {"method": "spf", "result": "pass"}) == (
        before_auth + 1
    )
    assert _sample("gateway_policy_duration_seconds_count", {"policy": "spf"}) == before_dur + 1
    smtp_tempfail = {"action": "tempfail", "frontend": "smtp"}
    assert _sample("gateway_messages_total", smtp_tempfail) == before_msg
    metrics.record_action("tempfail", "smtp")
    assert _sample("gateway_messages_total", smtp_tempfail) == before_msg + 1


def test_no_metric_has_a_label_that_could_carry_an_address_or_subject() -> None:
    forbidden = {"client", "ip", "mail_from", "rcpt", "sender", "recipient", "subject", "helo"}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            assert not forbidden & set(sample.labels), family.name


async def test_a_flood_of_idle_connections_is_capped_and_the_endpoint_recovers() -> None:
    async def ready() -> tuple[bool, str]:
        return True, ""

    endpoint = await metrics.start_http("127.0.0.1:0", ready)
    idle = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(80)]

    async def closed_by_server(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 1.0) == b""
        except TimeoutError:
            return False  # still held open, waiting for a request

    try:
        closed = await asyncio.gather(*(closed_by_server(r) for r, _ in idle))
        assert sum(closed) == len(idle) - metrics._MAX_CLIENTS
    finally:
        for _, writer in idle:
            writer.close()
    await asyncio.sleep(0.1)
    assert (await _get(endpoint.port, "/healthz"))[0] == 200
    await endpoint.close()


def test_zero_exports_every_combination_of_known_label_values_at_zero() -> None:
    from prometheus_client import CollectorRegistry, Counter

    counter = Counter("zero_demo", "demo", ["stage", "code"], registry=CollectorRegistry())
    metrics.zero(counter, stage=("mail", "rcpt"), code=("250", "451"))
    exported = {
        (s.labels["stage"], s.labels["code"]): s.value
        for f in counter.collect()
        for s in f.samples
        if s.name == "zero_demo_total"
    }
    assert exported == {
        ("mail", "250"): 0.0,
        ("mail", "451"): 0.0,
        ("rcpt", "250"): 0.0,
        ("rcpt", "451"): 0.0,
    }


def test_zero_needs_values_for_every_label() -> None:
    """A label added later without its values fails loudly, at import."""
    with pytest.raises(ValueError, match=r"labels are \('action', 'frontend'\)"):
        metrics.zero(metrics.MESSAGES, action=("relay",))


def test_known_counters_are_exported_at_zero_before_anything_happened() -> None:
    from gateway import relay, smtp  # noqa: F401 -- importing them declares their label values

    for name, labels in (
        ("gateway_messages_total", {"action": "tempfail", "frontend": "smtp"}),
        ("gateway_relay_failures_total", {"reason": "unreachable"}),
        ("gateway_config_reloads_total", {"result": "invalid"}),
        ("gateway_smtp_sessions_refused_total", {"reason": "max_sessions_per_ip"}),
        ("gateway_smtp_replies_total", {"stage": "data", "code": "451"}),
        ("gateway_dns_queries_total", {"result": "temperror"}),
    ):
        assert metrics.REGISTRY.get_sample_value(name, labels) is not None, (name, labels)
