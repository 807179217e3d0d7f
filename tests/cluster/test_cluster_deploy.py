"""The cluster deploy files (deploy/kubernetes/cluster, deploy/compose/cluster) hold together.

tests/deploy parses every YAML and TOML file under deploy/ (these included);
here: the Kubernetes manifests validate against the Kubernetes API schemas and
build with kustomize, the DSN and Redis URL come from a Secret (never a
ConfigMap), probes, anti-affinity and the PodDisruptionBudget are as
docs/cluster.md says, the init container's rendering gives a config that
`gateway check-config` accepts, and the compose file runs two gateway replicas
against Redis and PostgreSQL with paths that exist. No Docker engine or
Kubernetes API here: `docker compose config` and `kubectl apply` cannot run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from gateway.testing.require import require, require_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/kubernetes/cluster"
COMPOSE = REPO / "deploy/compose/cluster"
DEPLOY_PATHS = ("/etc/gateway-template/config.toml", "/etc/gateway/config.toml")


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    docs = []
    for name in kustomization["resources"]:
        docs.extend(yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")))
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_config_text() -> str:
    text: str = one("ConfigMap", "mail-gateway-cluster-config")["data"]["config.toml"]
    return text


def test_every_file_in_the_directory_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_manifests_validate_against_the_kubernetes_schemas_and_build_with_kustomize() -> None:
    """Strict: a misspelt or misplaced field fails here, not at `kubectl apply`."""
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "kubernetes-validate not installed (pip install -e .[dev])")
    version = "1.30.0"
    for doc in manifests():
        if doc["kind"] != "Kustomization":
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomize_builds_the_cluster_directory() -> None:
    """kubectl ships with this machine image (the cloud SDK's package); required in CI."""
    kubectl = require_tool("kubectl", "install the kubectl package")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(built.stdout))
    assert kinds == sorted(d["kind"] for d in manifests() if d["kind"] != "Kustomization")


def test_gateway_replicas_are_probed_spread_and_protected_by_a_disruption_budget() -> None:
    deployment = one("Deployment", "mail-gateway")
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
    assert pod["securityContext"]["runAsNonRoot"] is True
    pdb = one("PodDisruptionBudget", "mail-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1
    assert one("Service", "mail-gateway")["spec"]["selector"] == labels
    # Redis and PostgreSQL pods must not be picked up by the gateway's selectors.
    for name in ("mail-gateway-redis", "mail-gateway-postgres"):
        other = one("StatefulSet", name)["spec"]["template"]["metadata"]["labels"]
        assert not labels.items() <= other.items()
    config = tomllib.loads(gateway_config_text())
    assert int(config["server"]["listen"].rsplit(":", 1)[1]) == ports["smtp"]
    assert config["metrics"]["listen"] == f"0.0.0.0:{ports['metrics']}"


def test_dsn_and_redis_url_come_from_a_secret_never_from_the_configmap() -> None:
    config = tomllib.loads(gateway_config_text())
    assert config["quarantine"] == {**config["quarantine"], "backend": "postgresql"}
    assert config["quarantine"]["dsn"] == "${GATEWAY_QUARANTINE_DSN}"
    assert config["state"]["backend"] == "redis"
    assert config["state"]["url"] == "${GATEWAY_STATE_URL}"
    assert not re.search(r"://[^/\s\"]*:[^/\s\"]*@", gateway_config_text())  # no user:password@
    secret = one("Secret", "mail-gateway-backends")
    keys = set(secret["stringData"])
    refs = []
    for doc in manifests():
        text = yaml.safe_dump(doc)
        if doc["kind"] in {"Deployment", "StatefulSet", "CronJob"}:
            refs += re.findall(r"secretKeyRef:\n\s+key: (\S+)\n\s+name: (\S+)", text)
    assert refs and all(name == "mail-gateway-backends" and key in keys for key, name in refs)
    init = one("Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in init["env"]}
    assert from_secret == {
        "GATEWAY_QUARANTINE_DSN": "quarantine-dsn",
        "GATEWAY_STATE_URL": "state-url",
    }
    # The passwords in the DSN and URL are the ones the servers are started with.
    data = secret["stringData"]
    assert f":{data['postgres-password']}@mail-gateway-postgres:" in data["quarantine-dsn"]
    assert f":{data['redis-password']}@mail-gateway-redis:" in data["state-url"]


def render_script(container: dict[str, Any], tmp_path: Path) -> str:
    assert container["command"] == ["python", "-c"]
    script: str = container["args"][0]
    for path in DEPLOY_PATHS:
        assert path in script
        script = script.replace(path, str(tmp_path / path.lstrip("/")))
    return script


def test_the_init_container_writes_a_config_that_check_config_accepts(tmp_path: Path) -> None:
    """The ConfigMap's placeholders are replaced by the Secret's values, quoted for TOML."""
    template = tmp_path / "etc/gateway-template/config.toml"
    template.parent.mkdir(parents=True)
    template.write_text(gateway_config_text(), encoding="utf-8")
    (tmp_path / "etc/gateway").mkdir()
    init = one("Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    dsn = 'postgresql://gateway:p%40ss"w\\rd@db.example:5432/gateway?connect_timeout=5'
    url = "redis+sentinel://:s3cret@s1:26379,s2:26379/mymaster/0"
    result = subprocess.run(
        [sys.executable, "-c", render_script(init, tmp_path)],
        env={**os.environ, "GATEWAY_QUARANTINE_DSN": dsn, "GATEWAY_STATE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = tmp_path / "etc/gateway/config.toml"
    config = tomllib.loads(rendered.read_text(encoding="utf-8"))
    assert config["quarantine"]["dsn"] == dsn and config["state"]["url"] == url
    assert rendered.stat().st_mode & 0o077 == 0  # the passwords are readable by the owner only
    # The purge CronJob renders the same way before running `quarantine purge`.
    (purge,) = one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    head, _, tail = render_script(purge, tmp_path).rpartition("sys.exit(")
    assert head == render_script(init, tmp_path).rpartition("sys.exit(")[0]
    assert '"quarantine", "purge"' in tail


def test_cluster_configs_are_config_example_plus_the_cluster_overrides() -> None:
    """Fix with `python deploy/kubernetes/cluster/render.py` after editing config.example.toml."""
    result = subprocess.run(
        [sys.executable, str(K8S / "render.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_two_gateway_replicas_on_redis_and_postgres() -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"gateway", "postfix", "redis", "postgres"} <= set(services)
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    assert "container_name" not in gateway and "ports" not in gateway  # replicas cannot share
    assert {name: dep["condition"] for name, dep in gateway["depends_on"].items()} == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"]
    assert (
        gateway["environment"]["PGPASSWORD"]
        == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    )
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source} not declared"
        if build := service.get("build"):
            assert (COMPOSE / build["context"] / build["dockerfile"]).is_file(), name

    (mount,) = [v for v in gateway["volumes"] if v.endswith(":/etc/gateway/config.toml:ro")]
    config = tomllib.loads((COMPOSE / mount.split(":")[0]).read_text(encoding="utf-8"))
    # Postfix's proxy filter is rewritten to gateway:10025 (deploy/compose/postfix/Dockerfile).
    assert config["server"]["listen"] == "0.0.0.0:10025"
    assert config["relay"]["host"] == "postfix"
    assert config["quarantine"]["backend"] == "postgresql"
    assert config["quarantine"]["dsn"].startswith("postgresql://gateway@postgres:5432/gateway")
    assert config["state"] == {**config["state"], "backend": "redis", "url": "redis://redis:6379/0"}


def test_compose_gateway_config_passes_check_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", f"{COMPOSE}/gateway.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
