"""Fixtures for the reliability suite: a gateway subprocess per test, a private DNS server.

Every test here starts what it breaks (its own downstream, proxy, DNS server
and gateway), so faults never leak into other suites running in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess

ZONES = ("example.org", "sender.test")
SENDER = "alice@sender.test"
RCPT = "bob@example.org"


def sender_zone() -> dict[str, list[tuple[str, str]]]:
    """sender.test publishes SPF for loopback and DMARC p=reject (so DNS decides delivery)."""
    return {
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
        "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
        "ledger.sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
    }


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    """A private authoritative DNS server (tests switch outages on and off)."""
    with DNSServer(sender_zone(), zones=ZONES, ttl=1) as server:
        yield server


def overrides(
    relay_port: int, dns: DNSServer, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """No policies, relay to ``relay_port``, DNS from ``dns``, short timeouts."""
    base: dict[str, Any] = {
        "relay.host": "127.0.0.1",
        "relay.port": relay_port,
        "relay.timeout": 3.0,
        "dns.nameservers": [dns.address],
        "dns.timeout": 0.5,
        "policies": {},
        "scores": {},
    }
    base.update(extra or {})
    return base


GatewayFactory = Callable[..., GatewayProcess]


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
