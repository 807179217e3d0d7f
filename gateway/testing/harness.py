"""A running gateway for tests: as a real subprocess, or in-process for speed.

Both variants write a config built from ``config.example.toml`` (the shipped
default) with dotted-key overrides, always listening on ephemeral loopback
ports with state and quarantine under a private directory::

    with SinkServer() as sink, GatewayProcess({"relay.port": sink.port}) as gw:
        smtplib.SMTP("127.0.0.1", gw.smtp_port).sendmail(...)

    async with running_gateway({"relay.port": sink.port}) as gw:
        ...  # gw.smtp_port, gw.metrics_port, gw.reload(), gw.running.gateway

``GatewayProcess`` runs ``python -m gateway run --config PATH`` and learns the
bound ports from its ``gateway_started`` log line; ``extra_pythonpath`` puts
directories (e.g. a third-party policy with its ``.dist-info``) on the
subprocess's ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal as _signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.testing.dnsserver import DNSServer
    from gateway.testing.sink import SinkServer

__all__ = [
    "GatewayFailed",
    "GatewayProcess",
    "RunningGatewayHandle",
    "build_config",
    "dump_toml",
    "example_config_path",
    "loopback_overrides",
    "running_gateway",
    "write_config",
]

_REPO = Path(__file__).resolve().parents[2]

# Used when config.example.toml is not found (an installed package without the repo).
_FALLBACK_BASE: dict[str, Any] = {
    "server": {"hostname": "mx.example.org", "accepted_domains": ["example.org"]},
    "relay": {"host": "127.0.0.1", "port": 10026},
}


class GatewayFailed(RuntimeError):
    """The gateway did not start (or died); the message carries its log."""


def example_config_path() -> Path | None:
    """The repo's ``config.example.toml``, when running from a checkout."""
    path = _REPO / "config.example.toml"
    return path if path.is_file() else None


def loopback_overrides(
    sink: SinkServer, dns: DNSServer, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Test defaults: relay to ``sink``, DNS from ``dns``, no policies; ``extra`` on top."""
    return {
        "relay.host": sink.host,
        "relay.port": sink.port,
        "relay.timeout": 5.0,
        "dns.nameservers": [dns.address],
        "dns.timeout": 2.0,
        "policies": {},
        "scores": {},
        **(extra or {}),
    }


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def build_config(
    overrides: Mapping[str, Any] | None, workdir: Path, base: Path | None = None
) -> dict[str, Any]:
    """The config document: base file, test-safe defaults, then ``overrides``.

    Test-safe defaults: loopback port 0 for SMTP and metrics, no web UI (a test
    enables it with ``"web.listen": "127.0.0.1:0"``), quarantine and state under
    ``workdir``, JSON logs, one process (``server.workers = 1``, where the
    shipped config says "auto": a test counts, scrapes, signals and kills one
    process; one that wants workers says so).
    """
    base = base or example_config_path()
    data: dict[str, Any] = (
        tomllib.loads(base.read_text(encoding="utf-8"))
        if base is not None
        else json.loads(json.dumps(_FALLBACK_BASE))
    )
    defaults: dict[str, Any] = {
        "server.listen": "127.0.0.1:0",
        "server.workers": 1,
        "server.hostname": "mx.example.org",
        "server.accepted_domains": ["example.org"],
        "metrics.listen": "127.0.0.1:0",
        "web.listen": "",  # the example config's fixed port would clash between tests
        "quarantine.backend": "local",
        "quarantine.path": str(workdir / "quarantine"),
        "state.backend": "local",
        "state.path": str(workdir / "state.sqlite"),
        "log.format": "json",
        "log.level": "info",
    }
    for key, value in {**defaults, **dict(overrides or {})}.items():
        _set_dotted(data, key, value)
    return data


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            raise ValueError("TOML cannot hold inf/nan here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for config documents (tables of scalars, arrays, sub-tables)."""
    lines: list[str] = []

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in node.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_key(k)} = {_value(v)}")
        if prefix and (scalars or not tables):
            lines.append("")
        for k, v in tables.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", data)
    return "\n".join(lines) + "\n"


def write_config(
    overrides: Mapping[str, Any] | None, workdir: Path, base: Path | None = None
) -> Path:
    """Write ``workdir/gateway.toml`` and return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gateway.toml"
    path.write_text(dump_toml(build_config(overrides, workdir, base)), encoding="utf-8")
    return path


class GatewayProcess:
    """``python -m gateway run`` as a subprocess on ephemeral ports."""

    def __init__(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        workdir: Path | None = None,
        base: Path | None = None,
        extra_pythonpath: Sequence[str | Path] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gateway-test-"))
        self.base = base
        self.overrides: dict[str, Any] = dict(overrides or {})
        self.config_path = write_config(self.overrides, self.workdir, base)
        self.extra_pythonpath = [str(p) for p in extra_pythonpath]
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.smtp_port = 0
        self.milter_port = 0  # with milter.listen on TCP
        self.metrics_port: int | None = None
        self.web_port = 0  # with web.listen
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._new_line = threading.Condition(self._lock)
        self._reader: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> GatewayProcess:
        env = {**os.environ, **self.env}
        paths = [*self.extra_pythonpath, str(_REPO)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,  # one process group: kill() reaches every worker
        )
        self._reader = threading.Thread(target=self._read, name="gateway-log", daemon=True)
        self._reader.start()
        started = self._wait_started()
        if started is None:
            self.kill()
            raise GatewayFailed("gateway did not start:\n" + "\n".join(self.log_lines()[-50:]))
        self.smtp_port = int(started["smtp_port"] or 0)
        self.milter_port = int(started.get("milter_port") or 0)
        port = started.get("metrics_port")
        self.metrics_port = int(port) if port is not None else None
        self.web_port = int(started.get("web_port") or 0)
        return self

    def _wait_started(self) -> dict[str, Any] | None:
        """The ``gateway_started`` event of the single process, or of worker 0."""
        end = time.monotonic() + self.start_timeout
        seen = 0
        while True:
            event = self.wait_for_event(
                "gateway_started", timeout=max(0.0, end - time.monotonic()), after=seen
            )
            if event is None or not event.get("worker"):
                return event
            seen += 1

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._new_line:
                self._lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def scrape(self) -> str:
        """The gateway's ``/metrics`` (Prometheus text)."""
        if not self.metrics_port:
            raise GatewayFailed("the gateway serves no metrics (metrics.listen is empty)")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode("utf-8")
        return text

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of ``/metrics``: ``metric("x_total", reason="y")``, None if absent."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. ``signal.SIGHUP``) to the gateway."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL when it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return self.proc.returncode
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the gateway and, with ``server.workers`` > 1, its workers too."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, _signal.SIGKILL)  # its own process group (see start)
        self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- config and logs -------------------------------------------------------

    def rewrite_config(self, overrides: Mapping[str, Any], *, replace: bool = False) -> Path:
        """Write a new config (merged with the current overrides) for a SIGHUP reload."""
        self.overrides = dict(overrides) if replace else {**self.overrides, **overrides}
        return write_config(self.overrides, self.workdir, self.base)

    def write_raw_config(self, text: str) -> None:
        """Replace the config file with ``text`` verbatim (e.g. an invalid one)."""
        self.config_path.write_text(text, encoding="utf-8")

    def log_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far (those named ``name``, when given)."""
        out = []
        for line in self.log_lines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    def wait_for_event(
        self,
        name: str,
        *,
        timeout: float = 10.0,
        after: int = 0,
        match: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Block until the ``after``-th+1 event ``name`` (with the fields in ``match``)
        appears; None on timeout or exit. Prefer ``match`` (a queue id, a sender) to
        counting: the log reader may not have read an earlier test's event yet."""
        end = time.monotonic() + timeout
        want = dict(match or {})
        with self._new_line:
            while True:
                found = [
                    e
                    for e in self._events_locked()
                    if e.get("event") == name and all(e.get(k) == v for k, v in want.items())
                ]
                if len(found) > after:
                    return found[after]
                if (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and (self._reader is None or not self._reader.is_alive())
                ):
                    return None
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                self._new_line.wait(min(remaining, 0.2))

    def _events_locked(self) -> list[dict[str, Any]]:
        out = []
        for line in self._lines:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out


class RunningGatewayHandle:
    """What ``running_gateway`` yields: ports, config path and the live objects."""

    def __init__(self, running: Any, workdir: Path, config_path: Path) -> None:
        from gateway.server import RunningGateway

        assert isinstance(running, RunningGateway)
        self.running = running
        self.workdir = workdir
        self.config_path = config_path
        self.smtp_port: int = running.smtp_port
        self.metrics_port: int | None = running.metrics_port
        self.web_port: int = running.web_port or 0

    async def reload(self) -> bool:
        return await self.running.reload()

    def rewrite_config(self, overrides: Mapping[str, Any], base: Path | None = None) -> Path:
        return write_config(overrides, self.workdir, base)


@contextlib.asynccontextmanager
async def running_gateway(
    overrides: Mapping[str, Any] | None = None,
    *,
    workdir: Path | None = None,
    base: Path | None = None,
    grace: float = 5.0,
) -> AsyncIterator[RunningGatewayHandle]:
    """The gateway in the current event loop (no subprocess, no signal handlers)."""
    from gateway.server import start

    own = workdir is None
    path_dir = Path(workdir or tempfile.mkdtemp(prefix="gateway-test-"))
    config_path = write_config(overrides, path_dir, base)
    running = await start(config_path)
    try:
        yield RunningGatewayHandle(running, path_dir, config_path)
    finally:
        await running.stop(grace)
        if own:
            shutil.rmtree(path_dir, ignore_errors=True)
