"""Every metric the dashboard and the alert rules query is exported by a running gateway.

A renamed metric would leave a panel blank and an alert silent forever; this
starts the real gateway (``python -m gateway run``), sends it one message,
scrapes ``/metrics`` and looks up each name the deploy files use.
"""

from __future__ import annotations

import json
import re
import smtplib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Series Prometheus itself makes (not exported by the gateway).
PROMETHEUS_OWN = {"up"}


def _exprs() -> dict[str, str]:
    """Every PromQL expression in the dashboard and the alert rules, by where it is."""
    exprs: dict[str, str] = {}
    dash = json.loads((DEPLOY / "grafana/gateway-dashboard.json").read_text(encoding="utf-8"))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard panel {panel['title']!r}"] = target["expr"]
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            exprs[f"dashboard variable {variable['name']}"] = variable["definition"]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = rule["expr"]
    return exprs


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers before ``{`` or ``[`` or alone."""
    names = set(re.findall(r"\b(gateway_[a-z0-9_]+)", expr))
    names |= {n for n in re.findall(r"\b([a-z_][a-z0-9_]*)\{", expr) if n in PROMETHEUS_OWN}
    return names


def _exported(text: str) -> set[str]:
    """Series names a scrape can return: TYPE'd families plus histogram/summary suffixes."""
    names: set[str] = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(family)
        if kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        elif kind == "summary":
            names |= {f"{family}_sum", f"{family}_count"}
        elif kind == "counter" and not family.endswith("_total"):
            names.add(f"{family}_total")
    return names


@pytest.fixture(scope="module")
def scrape() -> Iterator[str]:
    """/metrics of a real gateway after it relayed one message."""
    with (
        DNSServer(zones=("example.org", "sender.test")) as dns,
        SinkServer() as sink,
        GatewayProcess({"relay.port": sink.port, "dns.nameservers": [dns.address]}) as gw,
    ):
        assert gw.metrics_port, "the gateway must serve metrics"
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as client:
            client.sendmail(
                "alice@sender.test",
                ["bob@example.org"],
                b"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: hi\r\n"
                b"Message-ID: <m1@sender.test>\r\n\r\nHello Bob.\r\n",
            )
        sink.wait_for(1)
        base = f"http://127.0.0.1:{gw.metrics_port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:  # noqa: S310 -- http://127.0.0.1 built here
            yield response.read().decode()


def test_deploy_files_query_metrics_at_all() -> None:
    names = set().union(*(_metric_names(e) for e in _exprs().values()))
    assert len(names) >= 10, names


def test_every_metric_in_dashboard_and_alerts_is_exported(scrape: str) -> None:
    """A name the gateway does not export would be a blank panel or a silent alert."""
    exported = _exported(scrape) | PROMETHEUS_OWN
    missing = {
        where: sorted(_metric_names(expr) - exported)
        for where, expr in _exprs().items()
        if _metric_names(expr) - exported
    }
    assert not missing, f"not exported by the gateway: {missing}"


def test_the_relayed_message_shows_up_in_the_throughput_metrics(scrape: str) -> None:
    """The dashboard's headline panel has data after one message."""
    assert re.search(r'^gateway_messages_total\{action="(relay|add_header)"\} 1\.0$', scrape, re.M)


def _labels_by_family() -> dict[str, set[str]]:
    """Label names of every metric gateway.metrics defines, keyed by series name."""
    from gateway import metrics

    out: dict[str, set[str]] = {}
    for collector in list(metrics.REGISTRY._collector_to_names):  # our own registry
        name = collector._name  # type: ignore[attr-defined]
        labels = set(collector._labelnames)  # type: ignore[attr-defined]
        for suffix in ("", "_total", "_sum", "_count"):
            out[name + suffix] = labels
        out[name + "_bucket"] = labels | {"le"}
    return out


TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time


def test_dashboard_and_alerts_only_use_labels_the_metrics_have() -> None:
    """`reason`, `outcome`, `stage`... must be real label names, or the query is silently empty."""
    families = _labels_by_family()
    problems = []
    for where, expr in _exprs().items():
        used_metrics = [m for m in _metric_names(expr) if m in families]
        for metric, matchers in re.findall(r"\b(gateway_[a-z0-9_]+)\{([^}]*)\}", expr):
            names = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
            unknown = names - families.get(metric, set()) - TARGET_LABELS
            if unknown:
                problems.append(f"{where}: {metric} has no label {sorted(unknown)}")
        available = set().union(TARGET_LABELS, *(families[m] for m in used_metrics))
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            unknown = {c.strip() for c in clause.split(",") if c.strip()} - available
            if unknown:
                problems.append(f"{where}: grouping by unknown label {sorted(unknown)}")
    assert not problems, "\n".join(problems)


def test_dashboard_panels_do_not_overlap() -> None:
    """Overlapping gridPos makes Grafana reshuffle the layout on load."""
    dash = json.loads((DEPLOY / "grafana/gateway-dashboard.json").read_text(encoding="utf-8"))
    cells: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
