"""Throwaway Redis and PostgreSQL servers for cluster tests, started from the binaries.

Outage tests must stop and restart the shared services, which would disturb
every other suite using the machine's own servers. So each test gets its own
``redis-server`` and its own PostgreSQL cluster (``initdb`` + ``pg_ctl``, run as
the ``postgres`` user when the tests run as root) in a temporary directory, on
free loopback ports, removed afterwards. Missing binaries skip locally and fail
under ``CI=true`` (``gateway.testing.require``).

- ``redis_server``: a running :class:`ThrowawayRedis` (``.url``, ``.stop()``, ``.start()``).
- ``pg_server``: a running :class:`ThrowawayPostgres` (``.dsn``, ``.stop()``, ``.start()``);
  ``pg_server_with_password``: the same with password authentication.
- ``dns_server``: an authoritative DNSServer, so no test asks the system resolver.
- ``sink``: the recording downstream.
- ``node_overrides``: config overrides for a node: relay -> sink, DNS -> dns_server,
  exactly the given policies.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import loopback_overrides
from gateway.testing.require import require
from gateway.testing.services import ThrowawayRedis, free_port, wait_for_port
from gateway.testing.sink import SinkServer


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class ThrowawayPostgres:
    """A private PostgreSQL cluster (initdb) in a temp dir on loopback: trust or password auth.

    As root the server must run as another user: the ``postgres`` account,
    through ``runuser``; the directory is owned by it.
    """

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        assert initdb and pg_ctl
        self.pg_ctl = pg_ctl
        self.port = free_port()
        self.workdir = workdir
        self.data = workdir / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(workdir, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        auth = ["-A", "trust"]
        if password is not None:  # password authentication, as a production server has
            pwfile = workdir / "pwfile"
            pwfile.write_text(password + "\n")
            if self.prefix:
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
        self._run(initdb, "-D", str(self.data), *auth, "-U", "postgres", "--no-sync")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.prefix, *args], capture_output=True, timeout=60, check=False, cwd=self.workdir
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.decode(errors='replace')}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.workdir} -c fsync=on"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.workdir / "log"), "-o", options,
            "-w", "-t", "30", "start",
        )  # fmt: skip
        wait_for_port(self.port, None, "postgres")

    def stop(self) -> None:
        """Fast shutdown: open sessions are cut, committed data stays (a real outage)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()


@pytest.fixture
def redis_server() -> Iterator[ThrowawayRedis]:
    require(shutil.which("redis-server"), "redis-server not installed (apt install redis-server)")
    with tempfile.TemporaryDirectory(prefix="gw-redis-") as tmp:
        server = ThrowawayRedis(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def _require_pg_binaries() -> None:
    require(
        _pg_bin("initdb") and _pg_bin("pg_ctl"),
        "PostgreSQL server binaries not installed (apt install postgresql)",
    )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            require(False, "running as root but there is no postgres user to run the server")


@contextlib.contextmanager
def throwaway_postgres(password: str | None = None) -> Iterator[ThrowawayPostgres]:
    """A started private PostgreSQL, stopped and removed on exit."""
    _require_pg_binaries()
    with tempfile.TemporaryDirectory(prefix="gw-pg-") as tmp:
        server = ThrowawayPostgres(Path(tmp), password)
        server.start()
        try:
            yield server
        finally:
            server.close()


@pytest.fixture
def pg_server() -> Iterator[ThrowawayPostgres]:
    with throwaway_postgres() as server:
        yield server


PG_PASSWORD = "s3cret-for-tests"


@pytest.fixture
def pg_server_with_password() -> Iterator[ThrowawayPostgres]:
    """Password authentication (scram-sha-256) for user postgres, password ``PG_PASSWORD``."""
    with throwaway_postgres(PG_PASSWORD) as server:
        yield server


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(zones=("example.org", "sender.test")) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


Overrides = Callable[..., dict[str, Any]]


@pytest.fixture
def node_overrides(sink: SinkServer, dns_server: DNSServer) -> Overrides:
    """``node_overrides(policies, {"state.backend": ...})``: relay -> sink, DNS -> test server."""

    def make(policies: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        fixed = {"relay.verify_recipients": False, "policies": dict(policies)}
        return loopback_overrides(sink, dns_server, {**fixed, **(extra or {})})

    return make
