"""config.example.toml is complete, commented and valid: the shipped default policy."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway import config as cfg
from gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"

SECTIONS = {
    "server": cfg.ServerConfig,
    "relay": cfg.RelayConfig,
    "dns": cfg.DNSConfig,
    "actions": cfg.ActionsConfig,
    "quarantine": cfg.QuarantineConfig,
    "state": cfg.StateConfig,
    "metrics": cfg.MetricsConfig,
    "pipeline": cfg.PipelineConfig,
    "log": cfg.LogConfig,
    "web": cfg.WebConfig,
    "milter": cfg.MilterConfig,
    "arc_seal": cfg.ArcSealConfig,
    "dmarc_reports": cfg.DmarcReportsConfig,
}


def _section_text(text: str, section: str) -> str:
    match = re.search(rf"^\[{section}\][^\n]*\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    assert match, f"[{section}] missing from config.example.toml"
    return match.group(1)


def test_check_config_passes_on_the_shipped_example() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout


def test_every_config_section_is_a_dataclass_listed_here() -> None:
    root_fields = {f.name for f in dataclasses.fields(cfg._Root)} - {"policies", "scores"}
    assert root_fields == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_appears_in_its_section_with_an_explanation(section: str) -> None:
    """Each dataclass field is written out (hostname commented, its default is this host)."""
    text = _section_text(EXAMPLE.read_text(), section)
    for f in dataclasses.fields(SECTIONS[section]):
        line = re.search(rf"^#?\s*{f.name}\s*=.*$", text, re.M)
        assert line, f"{section}.{f.name} missing from config.example.toml"
        assert "#" in line.group(0).lstrip("# "), f"{section}.{f.name} has no explanation"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_written_values_equal_the_code_defaults(section: str) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    table = data.get(section, {})
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name not in table or f.name == "accepted_domains":
            continue  # accepted_domains has no default: the example sets example.org
        if (section, f.name) == ("web", "listen"):
            continue  # off by default; the example turns it on, on loopback (issue 16)
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING
            default = f.default_factory()
        value = table[f.name]
        if isinstance(default, tuple):
            value = tuple(value)
        assert value == default, f"{section}.{f.name}: example {value!r} != default {default!r}"


def test_shipped_defaults_are_the_documented_embedded_ones() -> None:
    config = load_config(EXAMPLE)
    assert config.server.accepted_domains == ("example.org",)
    assert (config.relay.host, config.relay.port) == ("127.0.0.1", 10026)
    assert config.quarantine.backend == "local"
    assert config.quarantine.path.startswith("/var/lib/gateway")
    assert config.state.backend == "local"
    assert config.state.path.startswith("/var/lib/gateway")
    assert config.metrics.listen.startswith("127.0.0.1:")


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_quarantine_purge_interval_is_zero_or_a_finite_number_of_seconds(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "config.toml"
    text = EXAMPLE.read_text().replace("purge_interval = 3600.0", f"purge_interval = {value}")
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as info:
        load_config(path)
    assert [p for p in info.value.problems if p.startswith("quarantine.purge_interval: ")]
    path.write_text(text.replace(f"purge_interval = {value}", "purge_interval = 0"))
    assert load_config(path).quarantine.purge_interval == 0.0


def test_a_proxy_budget_below_the_per_ip_limit_is_refused_naming_the_key(tmp_path: Path) -> None:
    """Every client behind a proxy shares its connections: a smaller budget is a mistake."""
    path = tmp_path / "config.toml"
    text = EXAMPLE.read_text().replace("proxy_max_connections = 1000", "proxy_max_connections = 10")
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as info:
        load_config(path)
    assert [p for p in info.value.problems if p.startswith("server.proxy_max_connections: ")]
    path.write_text(text.replace("proxy_header_timeout = 5.0", "proxy_header_timeout = 0"))
    with pytest.raises(cfg.ConfigError) as info:
        load_config(path)
    assert [p for p in info.value.problems if p.startswith("server.proxy_header_timeout: ")]


def test_workers_is_a_number_or_auto(tmp_path: Path) -> None:
    from gateway.cpus import usable_cpus

    path = tmp_path / "config.toml"
    text = re.sub(r"^workers = \S+", "workers = WORKERS", EXAMPLE.read_text(), flags=re.M)
    path.write_text(text.replace("WORKERS", '"auto"'))
    assert load_config(path).server.worker_count == usable_cpus()
    path.write_text(text.replace("WORKERS", "3"))
    assert load_config(path).server.worker_count == 3
    for bad in ('"many"', "0"):
        path.write_text(text.replace("WORKERS", bad))
        with pytest.raises(cfg.ConfigError) as info:
            load_config(path)
        (problem,) = info.value.problems
        assert problem.startswith("server.workers: ") and '"auto"' in problem, problem


def test_web_keys_are_validated_with_their_names(tmp_path: Path) -> None:
    from gateway.web.hashes import hash_secret

    good = hash_secret("pw", n=2**10)
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        '[server]\naccepted_domains = ["example.org"]\n[web]\nlisten = "127.0.0.1:0"\n'
        f'admin_password_hash = "{good}"\napi_token_hashes = ["{good}"]\n',
        encoding="utf-8",
    )
    assert load_config(cfg).web.admin_password_hash == good
    for key, value, words in (
        ("admin_password_hash", '"plain-password"', "hash-password"),
        ("api_token_hashes", '["scrypt$1$2$3$x$y"]', "api_token_hashes[0]"),
        ("base_url", '"quarantine.example.org"', "https://"),
        ("digest_time", '"25:00"', "HH:MM"),
        ("link_expiry_days", "0", "1..365"),
        ("tls_cert", '"cert.pem"', "together"),
        ("listen", '"nowhere"', "host:port"),
    ):
        cfg.write_text(
            f'[server]\naccepted_domains = ["example.org"]\n[web]\n{key} = {value}\n',
            encoding="utf-8",
        )
        with pytest.raises(ConfigError) as err:
            load_config(cfg)
        line = "\n".join(err.value.problems)
        assert f"web.{key}" in line and words in line, line


def _listeners(smtp: str, milter: str) -> str:
    text = EXAMPLE.read_text()
    text = text.replace('listen = "0.0.0.0:25"', f'listen = "{smtp}"', 1)
    return re.sub(r'(?m)^(\[milter\][^\n]*\n)listen = ""', rf'\1listen = "{milter}"', text, count=1)


def test_milter_listen_and_a_milter_only_node(tmp_path: Path) -> None:
    """[milter] listen takes host:port or unix:/absolute/path; SMTP can be off, not both."""
    path = tmp_path / "config.toml"
    for smtp, milter, key in (
        ("0.0.0.0:25", "unix:relative.sock", "milter.listen: "),
        ("0.0.0.0:25", "127.0.0.1", "milter.listen: "),
        ("", "", "server.listen: "),
    ):
        path.write_text(_listeners(smtp, milter))
        with pytest.raises(cfg.ConfigError) as info:
            load_config(path)
        assert [p for p in info.value.problems if p.startswith(key)], info.value.problems
    path.write_text(_listeners("", "unix:/run/gateway/milter.sock"))
    config = load_config(path)
    assert (config.server.listen, config.milter.listen) == ("", "unix:/run/gateway/milter.sock")
