"""Fixtures for the reliability suite: a gateway subprocess per test, a private DNS server.

Every test here starts what it breaks (its own downstream, proxy, DNS server
and gateway), so faults never leak into other suites running in parallel.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from rel_support import ZONES, GatewayFactory, sender_zone

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    """A private authoritative DNS server (tests switch outages on and off)."""
    with DNSServer(sender_zone(), zones=ZONES, ttl=1) as server:
        yield server


@pytest.fixture
def make_gateway() -> Iterator[GatewayFactory]:
    """``make_gateway(overrides, **GatewayProcess kwargs)``; stopped after the test."""
    started: list[GatewayProcess] = []

    def make(config: Mapping[str, Any], **kwargs: Any) -> GatewayProcess:
        gw = GatewayProcess(config, **kwargs)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.close()
