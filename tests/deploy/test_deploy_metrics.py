"""Every metric the dashboard and the alert rules query is exported by a running gateway.

A renamed metric would leave a panel blank and an alert silent forever; this
starts the real gateway (``python -m gateway run``), sends it one message,
scrapes ``/metrics`` and looks up each name the deploy files use. And every
series they select (name and label matchers) is there on a freshly started
gateway that has seen no mail, at zero (issue 14): a healthy gateway must
show 0, never "No data", and a ``rate()`` alert must tell zero from "not
scraped". A new counter a panel reads gets its label values from
``gateway.metrics.zero`` (or ``export_policies``) where they are known.
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
from prometheus_client.parser import text_string_to_metric_families

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
        for i, target in enumerate(panel.get("targets", [])):
            exprs[f"dashboard panel {panel['title']!r} target {i}"] = target["expr"]
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


@pytest.fixture(scope="module")
def fresh_scrape() -> Iterator[str]:
    """/metrics of a real gateway with the shipped config, just started, no mail yet
    (``workers = "auto"`` as shipped: with several CPUs, the workers' merged view)."""
    overrides = {"server.workers": "auto"}
    with (
        DNSServer(zones=("example.org", "sender.test")) as dns,
        SinkServer() as sink,
        GatewayProcess(
            {**overrides, "relay.port": sink.port, "dns.nameservers": [dns.address]}
        ) as gw,
    ):
        assert gw.metrics_port, "the gateway must serve metrics"
        base = f"http://127.0.0.1:{gw.metrics_port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:  # noqa: S310 -- http://127.0.0.1 built here
            yield response.read().decode()


Matcher = tuple[str, str, str]  # (label, operator, value)

_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*")
    |(?P<range>\[[^\]]*\])
    |(?P<matchers>\{[^}]*\})
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<var>\$\w+)
    |(?P<number>\d+(?:\.\d+)?(?:e\d+)?)
    |(?P<other>\S)""",
    re.X,
)
_WITH_LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATORS = {"and", "or", "unless", "bool", "offset"}
_AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk"}
_AGGREGATIONS |= {"bottomk", "quantile", "count_values", "limitk", "limit_ratio"}
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _selectors(expr: str) -> list[tuple[str, list[Matcher]]]:
    """The vector selectors of a PromQL expression: (metric name, label matchers).

    A small tokenizer for the PromQL the deploy files use: identifiers followed by
    "(" are functions or aggregations, the parenthesised list after by/without/
    on/ignoring/group_* holds label names, and Grafana's ``label_values(m, label)``
    selects ``m``.
    """
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", expr)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    out: list[tuple[str, list[Matcher]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in _WITH_LABEL_LIST and nxt[1] == "(":
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")") + 1
            continue
        keyword = text in _OPERATORS or text in _AGGREGATIONS
        if kind == "ident" and not keyword and nxt[1] != "(":
            matchers: list[Matcher] = []
            if nxt[0] == "matchers":
                matchers = _MATCHER.findall(nxt[1])
                i += 1
            out.append((text, matchers))
        i += 1
    return out


def _matches(labels: dict[str, str], matchers: list[Matcher]) -> bool:
    """PromQL matcher semantics (regexes fully anchored; a missing label is "")."""
    for name, op, value in matchers:
        if name in TARGET_LABELS:
            continue  # Prometheus adds these at scrape time
        have = labels.get(name, "")
        value = value.replace("\\\\", "\\")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


def test_selector_parsing_finds_names_and_matchers() -> None:
    expr = (
        'sum by (instance, policy) (rate(gateway_policy_runs_total{outcome="timeout",'
        'instance=~"$instance"}[10m])) / sum by (instance) (rate(gateway_x_total[5m])) > 0.01'
        ' or absent(up{job="gateway"}) and on (instance) label_values(gateway_build_info, instance)'
    )
    assert _selectors(expr) == [
        (
            "gateway_policy_runs_total",
            [("outcome", "=", "timeout"), ("instance", "=~", "$instance")],
        ),
        ("gateway_x_total", []),
        ("up", [("job", "=", "gateway")]),
        ("gateway_build_info", []),
    ]
    assert _matches(
        {"code": "451", "stage": "data"}, [("code", "=~", "4.."), ("stage", "=", "data")]
    )
    assert not _matches({"code": "4510"}, [("code", "=~", "4..")])
    assert _matches({}, [("result", "!=", "hit")])


def test_every_series_the_dashboard_and_alerts_select_exists_on_a_fresh_gateway(
    fresh_scrape: str,
) -> None:
    """Zero, not absent: each selector matches a series before any mail was seen."""
    samples = [
        (s.name, s.labels)
        for family in text_string_to_metric_families(fresh_scrape)
        for s in family.samples
    ]
    missing = []
    count = 0
    for where, expr in _exprs().items():
        for name, matchers in _selectors(expr):
            count += 1
            if name in PROMETHEUS_OWN:
                continue
            if not any(n == name and _matches(labels, matchers) for n, labels in samples):
                shown = ",".join(f'{k}{op}"{v}"' for k, op, v in matchers)
                missing.append(f"{where}: {name}{{{shown}}}")
    assert count >= 25, "the dashboard and the alert rules should select far more series"
    assert not missing, "absent on a fresh gateway:\n" + "\n".join(missing)


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
    relayed = r'^gateway_messages_total\{action="(relay|add_header)",frontend="smtp"\} 1\.0$'
    assert re.search(relayed, scrape, re.M)


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
