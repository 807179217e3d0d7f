"""Shared fixtures for end-to-end tests: real DNS, a real downstream, a real gateway.

- ``dns_server``: an authoritative DNSServer for the test domains (session-wide).
- ``sink`` / ``module_sink``: the recording downstream (``gateway.testing.sink``).
- ``make_gateway``: starts ``python -m gateway run`` subprocesses with dotted-key
  overrides on top of the test defaults (relay -> the sink, DNS -> dns_server,
  no policies unless given) and stops them after the test.
- ``policy_plugin``: a genuinely installed third-party policy distribution (a
  package module plus ``<name>.dist-info`` with METADATA and entry_points.txt)
  in a directory to put on the gateway's PYTHONPATH.
"""

from __future__ import annotations

import smtplib
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess, loopback_overrides
from gateway.testing.sink import SinkServer

TEST_ZONES = ("example.org", "sender.test", "other.test", "example.com")


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DNSServer]:
    """Authoritative for the test zones: every lookup gets a fast, definite answer."""
    with DNSServer(zones=TEST_ZONES) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


@pytest.fixture(scope="module")
def module_sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def make_gateway(dns_server: DNSServer) -> Iterator[GatewayFactory]:
    """``make_gateway(sink, {"server.max_recipients": 2}, extra_pythonpath=[...])``."""
    started: list[GatewayProcess] = []

    def make(
        sink: SinkServer,
        overrides: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> GatewayProcess:
        gw = GatewayProcess(loopback_overrides(sink, dns_server, overrides), **kwargs)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.close()


@pytest.fixture(scope="module")
def module_gateway(module_sink: SinkServer, dns_server: DNSServer) -> Iterator[GatewayProcess]:
    """One policy-free gateway shared by a module's tests (fast); the sink is reset per test."""
    with GatewayProcess(loopback_overrides(module_sink, dns_server)) as gw:
        yield gw


@pytest.fixture
def fresh_sink(module_sink: SinkServer) -> Iterator[SinkServer]:
    """The module sink, emptied and with default replies."""
    module_sink.clear()
    module_sink.data_reply = None
    module_sink.rcpt_replies = {}
    yield module_sink
    module_sink.data_reply = None
    module_sink.rcpt_replies = {}


def smtp_client(port: int, *, ehlo: bool = True, timeout: float = 10.0) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
    if ehlo:
        client.ehlo("client.sender.test")
    return client


@pytest.fixture(scope="session")
def connect() -> Callable[..., smtplib.SMTP]:
    """``connect(port)``: an smtplib client that already said EHLO client.sender.test."""
    return smtp_client


PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A third-party test policy distribution, installed through its entry points."""
    import asyncio

    from gateway.api import Action, Context, Policy, Result, Symbol, SymbolDef


    class RaisingPolicy(Policy):
        name = "gwtest_raise"
        symbols = {}

        async def check(self, ctx: Context) -> Result:
            raise RuntimeError("secret internal detail /etc/passwd")


    class HangingPolicy(Policy):
        name = "gwtest_hang"
        symbols = {}

        async def check(self, ctx: Context) -> Result:
            await asyncio.sleep(3600)
            return Result()


    class SlowPolicy(Policy):
        name = "gwtest_slow"
        symbols = {}

        async def check(self, ctx: Context) -> Result:
            await asyncio.sleep(1.0)
            return Result()


    class VerdictPolicy(Policy):
        """Acts on a ``X-Test-Verdict: reject|quarantine|tempfail|spam`` header."""

        name = "gwtest_verdict"
        symbols = {
            "GWTEST_SPAM": SymbolDef(6.0, "test message asked to look like spam"),
            "GWTEST_SEEN": SymbolDef(0.0, "the test policy ran"),
        }

        async def check(self, ctx: Context) -> Result:
            want = str(ctx.message.get("X-Test-Verdict", "")).strip().lower()
            if want == "reject":
                return Result(force=Action.REJECT, reason="test policy says no",
                              symbols=(Symbol("GWTEST_SEEN"),))
            if want == "quarantine":
                return Result(force=Action.QUARANTINE, symbols=(Symbol("GWTEST_SEEN"),))
            if want == "tempfail":
                return Result(force=Action.TEMPFAIL, reason="test policy wants a retry",
                              symbols=(Symbol("GWTEST_SEEN"),))
            if want == "spam":
                return Result(symbols=(Symbol("GWTEST_SPAM", detail="asked"),))
            return Result(symbols=(Symbol("GWTEST_SEEN"),))
    '''
)


@pytest.fixture(scope="session")
def policy_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding an installed distribution ``gwtest-policies`` (for PYTHONPATH)."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "gwtest_policies.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    dist = root / "gwtest_policies-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gwtest-policies\nVersion: 1.0\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[gateway.policies]\n"
        "gwtest_raise = gwtest_policies:RaisingPolicy\n"
        "gwtest_hang = gwtest_policies:HangingPolicy\n"
        "gwtest_verdict = gwtest_policies:VerdictPolicy\n"
        "gwtest_slow = gwtest_policies:SlowPolicy\n",
        encoding="utf-8",
    )
    (dist / "RECORD").write_text("", encoding="utf-8")
    return root
