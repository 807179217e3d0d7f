"""With ``server.workers`` > 1, /metrics counts what every worker did, not only worker 0."""

from __future__ import annotations

import re
import smtplib
import time
import urllib.request
from collections.abc import Callable

from gateway.cpus import usable_cpus
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer
from gateway.workers import merge

GatewayFactory = Callable[..., GatewayProcess]
Connect = Callable[..., smtplib.SMTP]

_WORKER_A = """# HELP gateway_messages_total Messages
# TYPE gateway_messages_total counter
gateway_messages_total{action="relay"} 3.0
# HELP gateway_quarantine_messages Quarantined
# TYPE gateway_quarantine_messages gauge
gateway_quarantine_messages 7.0
# HELP gateway_relay_duration_seconds Relay time
# TYPE gateway_relay_duration_seconds histogram
gateway_relay_duration_seconds_bucket{le="0.1"} 2.0
gateway_relay_duration_seconds_bucket{le="+Inf"} 3.0
gateway_relay_duration_seconds_count 3.0
gateway_relay_duration_seconds_sum 0.5
"""
_WORKER_B = _WORKER_A.replace(" 3.0", " 4.0").replace(" 2.0", " 1.0")


def test_merge_sums_counters_and_histograms_and_takes_the_largest_shared_gauge() -> None:
    fams = {f.name: f for f in merge([_WORKER_A, _WORKER_B])}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples
    }
    assert samples[("gateway_messages_total", (("action", "relay"),))] == 7.0
    assert samples[("gateway_relay_duration_seconds_bucket", (("le", "0.1"),))] == 3.0
    assert samples[("gateway_relay_duration_seconds_count", ())] == 7.0
    assert samples[("gateway_quarantine_messages", ())] == 7.0  # the same store: max, not sum


def _relayed(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(
        r'^gateway_messages_total\{action="(?:relay|add_header)",frontend="smtp"\} (\S+)$',
        text,
        re.M,
    )
    return sum(float(v) for v in found)


def test_metrics_of_two_workers_add_up_to_every_message_sent(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.workers": 2})
    assert gw.wait_for_event("gateway_started", after=1) is not None  # both workers up
    # Connections held open together: accepts spread over both workers' loops.
    clients = [connect(gw.smtp_port) for _ in range(12)]
    for client in clients:
        client.sendmail("a@sender.test", ["x@example.org"], b"Subject: t\r\n\r\nhi\r\n")
    for client in clients:
        client.quit()
    sent = len(clients)
    assert gw.metrics_port is not None
    deadline = time.monotonic() + 10
    while _relayed(gw.metrics_port) < sent and time.monotonic() < deadline:
        time.sleep(0.2)  # snapshots are at most a second old
    assert _relayed(gw.metrics_port) == sent
    assert gw.stop() == 0


def test_workers_auto_starts_one_worker_per_usable_cpu(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    cpus = usable_cpus()
    gw = make_gateway(sink, {"server.workers": "auto"})
    if cpus > 1:
        (started,) = gw.events("supervisor_started")
        assert (started["workers"], started["setting"]) == (cpus, "auto")
        assert gw.wait_for_event("gateway_started", after=cpus - 1) is not None  # all up
    else:
        assert gw.events("supervisor_started") == []  # one CPU: a single process
    with connect(gw.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], b"Subject: t\r\n\r\nhi\r\n")
    assert len(sink.wait_for(1)) == 1
    assert gw.stop() == 0


def test_a_scrape_counts_every_message_answered_before_it(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    """No second-old snapshots: worker 0 asks every worker for one when it is scraped."""
    gw = make_gateway(sink, {"server.workers": 2})
    assert gw.wait_for_event("gateway_started", after=1) is not None
    assert gw.metrics_port is not None
    clients = [connect(gw.smtp_port) for _ in range(8)]
    for round_ in range(1, 4):
        for client in clients:
            client.sendmail("a@sender.test", ["x@example.org"], b"Subject: t\r\n\r\nhi\r\n")
        assert _relayed(gw.metrics_port) == round_ * len(clients)  # at once, no polling
    for client in clients:
        client.quit()
