"""ARC chain validation (RFC 8617) with keys from real DNS, as reported by the dmarc policy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from auth_helpers import arc_seal, key_records, message, rsa_key

from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.testing import make_context
from gateway.testing.dnsserver import DNSServer
from policies.arc import verify_arc


@pytest.fixture(scope="module")
def resolver_address() -> Iterator[str]:
    zone = key_records(("list.example", "arc", rsa_key()), ("relay.example", "arc", rsa_key()))
    with DNSServer(zone, zones=["example"], servfail=["arc._domainkey.sf.example"]) as server:
        yield server.address


@pytest.fixture
def resolver(resolver_address: str) -> CachingResolver:
    return CachingResolver(DNSConfig(nameservers=(resolver_address,), timeout=0.5))


async def test_unsealed_message_is_none(resolver: CachingResolver) -> None:
    outcome = await verify_arc(make_context(message(), resolver=resolver))
    assert (outcome.result, outcome.instances) == ("none", 0)


async def test_single_seal_passes_and_names_the_sealer(resolver: CachingResolver) -> None:
    raw = arc_seal(message(), "list.example", "list.example", "dmarc=pass header.from=a.example")
    outcome = await verify_arc(make_context(raw, resolver=resolver))
    assert (outcome.result, outcome.instances, outcome.sealer) == ("pass", 1, "list.example")
    assert [(r.method, r.result, r.prop("header.from")) for r in outcome.recorded] == [
        ("dmarc", "pass", "a.example")
    ]


async def test_two_hops_latest_sealer_counts(resolver: CachingResolver) -> None:
    """A list, then a forwarder: the chain passes and the latest sealer's results are read."""
    raw = arc_seal(message(), "list.example", "list.example", "dmarc=pass header.from=a.example")
    raw = arc_seal(
        raw, "relay.example", "relay.example", "arc=pass; dmarc=fail header.from=a.example"
    )
    outcome = await verify_arc(make_context(raw, resolver=resolver))
    assert (outcome.result, outcome.instances, outcome.sealer) == ("pass", 2, "relay.example")
    assert ("dmarc", "fail") in [(r.method, r.result) for r in outcome.recorded]


async def test_modified_after_sealing_fails(resolver: CachingResolver) -> None:
    raw = arc_seal(message(), "list.example", "list.example", "dmarc=pass")
    outcome = await verify_arc(
        make_context(raw.replace(b"See you.", b"Wire it."), resolver=resolver)
    )
    assert outcome.result == "fail"


async def test_forged_seal_domain_without_key_fails(resolver: CachingResolver) -> None:
    raw = arc_seal(message(), "nokey.example", "nokey.example", "dmarc=pass")
    outcome = await verify_arc(make_context(raw, resolver=resolver))
    assert outcome.result == "fail"


async def test_sealer_key_servfail_is_not_a_pass(resolver: CachingResolver) -> None:
    """RFC 8617 has no temperror for arc=: it reads fail, and the outcome says why."""
    raw = arc_seal(message(), "sf.example", "sf.example", "dmarc=pass")
    outcome = await verify_arc(make_context(raw, resolver=resolver))
    assert outcome.result == "fail" and outcome.temperror
    assert outcome.auth("192.0.2.1").properties == (("smtp.remote-ip", "192.0.2.1"),)


async def test_chain_too_costly_to_validate_fails(
    resolver: CachingResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARC sets x body size over the budget: arc=fail without hashing anything."""
    import policies.arc

    raw = arc_seal(message(), "list.example", "list.example", "dmarc=pass")
    raw = arc_seal(raw, "relay.example", "relay.example", "arc=pass")
    monkeypatch.setattr(policies.arc, "VERIFY_BUDGET_BYTES", 10)
    outcome = await verify_arc(make_context(raw, resolver=resolver))
    assert outcome.result == "fail" and "too costly" in outcome.reason
