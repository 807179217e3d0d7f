"""The deploy files are valid and say what operations relies on.

Syntax of every YAML/JSON/TOML file under deploy/, the alert rules through
promtool, each alert's runbook section in docs/operations.md, the probes and
hardening the Dockerfile, systemd unit and Kubernetes manifests promise.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.testing.require import require, require_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
OPERATIONS = REPO / "docs" / "operations.md"

YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
TOML_FILES = sorted(DEPLOY.rglob("*.toml"))

REQUIRED_ALERTS = {
    "GatewayDown",
    "GatewayDownstreamUnreachable",
    "GatewayHighTempfailRate",
    "GatewayPolicyTimeouts",
    "GatewayDNSFailures",
    "GatewayQuarantineGrowth",
}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them (lowercase, punctuation dropped, spaces to -)."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_file_parses(path: Path) -> None:
    """A syntax error in a compose/Kubernetes/Prometheus file fails here, not at deploy time."""
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs and all(d is not None for d in docs), f"{_rel(path)} has an empty document"


@pytest.mark.parametrize("path", JSON_FILES, ids=_rel)
def test_every_json_file_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


@pytest.mark.parametrize("path", TOML_FILES, ids=_rel)
def test_every_toml_file_parses(path: Path) -> None:
    assert tomllib.loads(path.read_text(encoding="utf-8"))


def test_deploy_tree_has_the_promised_files() -> None:
    for name in (
        "Dockerfile",
        "compose.yaml",
        "systemd/gateway.service",
        "postfix/before-queue/master.cf",
        "postfix/after-queue/main.cf",
        "postfix/after-queue/master.cf",
        "grafana/gateway-dashboard.json",
        "prometheus/alerts.yml",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/pdb.yaml",
    ):
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"


def test_alert_rules_pass_promtool() -> None:
    """`promtool check rules` (Debian's prometheus package) accepts the rules."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_behave_as_their_unit_tests_say() -> None:
    """`promtool test rules`: each alert fires on the series it is meant for, and only then."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    # The compose stack mounts alerts.yml at /etc/prometheus; point at the repo copy.
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml")),
        encoding="utf-8",
    )
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_required_alert_exists_with_severity_and_runbook_section() -> None:
    """Each alert names a severity and links a runbook section that exists in docs/operations.md."""
    rules = _alert_rules()
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - names}"
    anchors = _github_anchors(OPERATIONS.read_text(encoding="utf-8"))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations.get("summary"), f"{rule['alert']}: no summary"
        url = annotations.get("runbook_url", "")
        assert "/docs/operations.md#" in url, f"{rule['alert']}: runbook_url {url!r}"
        anchor = url.rsplit("#", 1)[1]
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: anchor {anchor!r}"
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no section #{anchor}"


def test_dashboard_covers_what_on_call_needs() -> None:
    """Throughput by action, symbols, auth, policy p50/p99, relay, DNS, quarantine, sessions."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = "\n".join(t["expr"] for p in panels for t in p["targets"])
    for needle in (
        "sum by (action) (rate(gateway_messages_total",
        "gateway_symbols_total",
        "gateway_auth_results_total",
        "histogram_quantile(0.5, sum by (policy, le) (rate(gateway_policy_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (policy, le) (rate(gateway_policy_duration_seconds_bucket",
        "gateway_relay_failures_total",
        "gateway_dns_queries_total",
        "gateway_quarantine_messages",
        "gateway_smtp_sessions_active",
    ):
        assert needle in exprs, f"dashboard lacks {needle}"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]


def test_grafana_provisioning_loads_the_dashboard_from_compose() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./grafana/gateway-dashboard.json"].startswith("/var/lib/grafana/dashboards/")
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/gateway.yml").read_text(encoding="utf-8")
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_wires_gateway_postfix_prometheus_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"gateway", "postfix", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile"
    config = tomllib.loads((DEPLOY / "compose/gateway.toml").read_text(encoding="utf-8"))
    assert config["relay"]["host"] == "postfix"
    assert config["metrics"]["listen"].startswith("0.0.0.0:")
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text(encoding="utf-8"))
    assert scrape["scrape_configs"][0]["job_name"] == "gateway"  # the alerts use job="gateway"


def test_dockerfile_runs_unprivileged_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^EXPOSE\s+25\s+9325\s*$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\\\n.*127\.0\.0\.1:9325/healthz", text, re.M)
    assert 'CMD ["run", "--config", "/etc/gateway/config.toml"]' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    copy_lines = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
    for copied in (src for line in copy_lines for src in line.split()[:-1]):
        assert (REPO / copied).exists(), f"Dockerfile copies missing {copied}"
        # The context is an allow-list: everything COPY needs must be let in.
        assert f"!{copied}" in ignore or f"!{copied}/**" in ignore, f"{copied} is .dockerignored"


def test_systemd_unit_is_hardened_and_reloads_with_sighup() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(
        "\n".join(
            line
            for line in (DEPLOY / "systemd/gateway.service").read_text().splitlines()
            if not line.startswith("#")
        )
    )
    service = parser["Service"]
    assert "python -m gateway run --config" in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"]
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/gateway" in service["ReadWritePaths"]
    for flag in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "DynamicUser"):
        assert service[flag] == "yes", flag


def _k8s() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_manifests_probe_readyz_and_healthz() -> None:
    docs = _k8s()
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == labels
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    config = tomllib.loads(docs["ConfigMap"]["data"]["config.toml"])
    _host, port = config["server"]["listen"].rsplit(":", 1)
    assert int(port) == ports["smtp"]
    assert int(config["metrics"]["listen"].rsplit(":", 1)[1]) == ports["metrics"]
    assert config["metrics"]["listen"].startswith("0.0.0.0:")


def test_postfix_snippets_name_the_documented_ports() -> None:
    """The integration tests swap exactly these ports; the docs quote them."""
    before = (DEPLOY / "postfix/before-queue/master.cf").read_text(encoding="utf-8")
    assert re.search(r"^smtp\s+inet\b.*\bsmtpd$", before, re.M)
    assert "-o smtpd_proxy_filter=127.0.0.1:10025" in before
    assert re.search(r"^127\.0\.0\.1:10026\s+inet\b", before, re.M)
    after_main = (DEPLOY / "postfix/after-queue/main.cf").read_text(encoding="utf-8")
    assert re.search(r"^content_filter = \S+:\[127\.0\.0\.1\]:10025$", after_main, re.M)
    after_master = (DEPLOY / "postfix/after-queue/master.cf").read_text(encoding="utf-8")
    transport = re.search(r"^content_filter = ([\w-]+):", after_main, re.M)
    assert transport and re.search(rf"^{transport.group(1)}\s+unix\b.*\bsmtp$", after_master, re.M)
    assert re.search(r"^127\.0\.0\.1:10026\s+inet\b", after_master, re.M)
    assert "-o content_filter=" in after_master  # the reinjection must not loop


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location("render_config", DEPLOY / "render_config.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_deploy_configs_match_the_example_plus_their_overrides() -> None:
    """compose/gateway.toml and the ConfigMap = config.example.toml + their overrides.

    Compared by value, not text: a comment or a new key (with its default) in
    config.example.toml leaves them correct; a changed value, a policy enabled or
    removed there does not. Fix with `make configs` (re-renders from the example).
    """
    render = _render_module()
    example = tomllib.loads((REPO / "config.example.toml").read_text(encoding="utf-8"))
    for path, overrides in (
        (DEPLOY / "compose/gateway.toml", render.COMPOSE),
        (DEPLOY / "kubernetes/configmap.yaml", render.KUBERNETES),
    ):
        if path.suffix == ".yaml":
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            deployed = tomllib.loads(doc["data"]["config.toml"])
        else:
            deployed = tomllib.loads(path.read_text(encoding="utf-8"))
        assert set(deployed.get("policies", {})) == set(example.get("policies", {})), (
            f"{_rel(path)} enables other policies than config.example.toml: run `make configs`"
        )
        expected = {**render.flatten(example), **overrides}
        actual = render.flatten(deployed)
        stale = sorted(
            key for key in actual.keys() & expected.keys() if actual[key] != expected[key]
        )
        gone = sorted(actual.keys() - expected.keys())
        assert not stale and not gone, (
            f"{_rel(path)} differs from config.example.toml + overrides "
            f"(changed: {stale}, not in the example: {gone}): run `make configs`"
        )


def test_render_keeps_comments_and_sets_commented_out_keys() -> None:
    render = _render_module()
    example = '[server]\nlisten = "0.0.0.0:25"   # where # SMTP listens\n# hostname = "x"  # name\n'
    out = render.render(example, {"server.listen": "127.0.0.1:2525", "server.hostname": "mx"})
    assert out == (
        '[server]\nlisten = "127.0.0.1:2525" # where # SMTP listens\nhostname = "mx"   # name\n'
    )
    assert "[dns]\ntimeout = 0.5" in render.render(example, {"dns.timeout": 0.5})


@pytest.mark.parametrize(
    "path",
    [DEPLOY / "compose/gateway.toml", DEPLOY / "demo/config.toml", None],
    ids=["compose", "demo", "kubernetes"],
)
def test_deploy_configs_pass_check_config(path: Path | None, tmp_path: Path) -> None:
    """`python -m gateway check-config` accepts every config we ship (policy options included)."""
    if path is None:
        doc = next(
            d
            for d in yaml.safe_load_all((DEPLOY / "kubernetes/configmap.yaml").read_text())
            if d["kind"] == "ConfigMap"
        )
        path = tmp_path / "config.toml"
        path.write_text(doc["data"]["config.toml"], encoding="utf-8")
    elif path.name == "config.toml" and path.parent.name == "demo":
        render = _render_module()
        example = (REPO / "config.example.toml").read_text(encoding="utf-8")
        overrides = render.flatten(tomllib.loads(path.read_text(encoding="utf-8")))
        path = tmp_path / "demo.toml"
        path.write_text(render.render(example, overrides), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_postfix_image_turns_the_snippet_into_a_working_master_cf(tmp_path: Path) -> None:
    """The compose Postfix image rewrites the before-queue snippet with sed; check the result."""
    dockerfile = (DEPLOY / "compose/postfix/Dockerfile").read_text(encoding="utf-8")
    expressions = re.findall(r"-e '([^']+)'", dockerfile)
    assert expressions, "no sed expressions found in compose/postfix/Dockerfile"
    snippet = DEPLOY / "postfix/before-queue/master.cf"
    result = subprocess.run(
        ["sed", *(arg for e in expressions for arg in ("-e", e)), str(snippet)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = result.stdout
    assert "-o smtpd_proxy_filter=gateway:10025" in out
    assert re.search(r"^10026\s+inet\b", out, re.M), "return smtpd must listen on the network"
    assert "mynetworks=127.0.0.0/8,172.16.0.0/12," in out
    assert re.search(r"^smtp\s+inet\b", out, re.M)
    # Debian's own "smtp inet" line is deleted by this exact pattern before appending.
    assert "sed -i '/^smtp      inet/d' /etc/postfix/master.cf" in dockerfile


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    """Strict schema check (kubernetes-validate, offline): a misspelt field fails here."""
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "kubernetes-validate not installed (pip install -e '.[dev]')")
    listed = yaml.safe_load((DEPLOY / "kubernetes/kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    for name in listed:
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text(encoding="utf-8")):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
