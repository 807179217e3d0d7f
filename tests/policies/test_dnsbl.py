"""DNS blocklists against zones served by the real test DNS server (UDP/TCP)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import pytest

from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.testing.context import make_context
from gateway.testing.dnsserver import DNSServer
from policies.dnsbl import DNSBLOptions, DNSBLPolicy, Zone, ip_query_name

ZEN = "zen.spamhaus.org"
DBL = "dbl.spamhaus.org"
SURBL = "multi.surbl.example"

CLEAN = "From: a@example.org\n\nhi\n"
MSG = """From: Spammer <offers@spammy-shop.com>
To: bob@example.org
Subject: offer

Visit http://www.listed-url.net/buy and http://clean.example.org/
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    records = {
        f"2.0.0.127.{ZEN}": [("A", "127.0.0.2")],  # the RFC 5782 test point
        f"9.113.33.45.{ZEN}": [("A", "127.0.0.4"), ("A", "127.0.0.10")],  # XBL + PBL
        f"10.113.33.45.{ZEN}": [("A", "127.255.255.254")],  # "query via public resolver"
        f"11.113.33.45.{ZEN}": [("A", "127.0.0.9")],
        f"12.113.33.45.{ZEN}": [("A", "127.0.0.42")],  # unknown code -> zone symbol
        f"13.113.33.45.{ZEN}": [("A", "10.0.0.1")],  # not a blocklist answer
        # 2001:db8::1 is documentation space, so it is not global; use 2001:4860::1
        ip_query_name(ipaddress.ip_address("2001:4860::1"), ZEN): [("A", "127.0.0.3")],
        f"spammy-shop.com.{DBL}": [("A", "127.0.1.2")],
        f"phishy-bank.com.{DBL}": [("A", "127.0.1.255")],  # DBL error code: ignored
        f"listed-url.net.{SURBL}": [("A", "127.0.0.72")],  # bits 8 (PH) + 64 (ABUSE)
    }
    with DNSServer(records, zones=[ZEN, DBL, SURBL], drop=[f"14.113.33.45.{ZEN}"]) as server:
        yield server


def options(**kw: object) -> DNSBLOptions:
    surbl = Zone(
        zone=SURBL,
        symbol="SURBL_LISTED",
        type="domain",
        bitmask=True,
        codes={"8": "SURBL_PHISH", "16": "SURBL_MALWARE", "64": "SURBL_ABUSE"},
        scores={"SURBL_PHISH": 4.5},
    )
    from policies.dnsbl import _dbl, _zen

    return DNSBLOptions(zones=(_zen(), _dbl(), surbl), **kw)  # type: ignore[arg-type]


async def run(
    dns: DNSServer,
    ip: str,
    raw: str = MSG,
    mail_from: str = "bounce@spammy-shop.com",
    **kw: object,
) -> dict[str, str]:
    resolver = CachingResolver(DNSConfig(nameservers=(dns.address,), timeout=1.0))
    policy = DNSBLPolicy(options(**kw))
    ctx = make_context(raw, resolver=resolver, client_ip=ip, mail_from=mail_from)
    result = await policy.check(ctx)
    return {s.name: s.detail for s in result.symbols}


def test_ipv4_and_ipv6_query_names_follow_rfc_5782() -> None:
    assert ip_query_name(ipaddress.ip_address("192.0.2.1"), ZEN) == f"1.2.0.192.{ZEN}"
    name = ip_query_name(ipaddress.ip_address("2001:db8::1"), "x.example")
    assert name == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.x.example"


async def test_zen_return_codes_map_to_their_symbols(dns: DNSServer) -> None:
    got = await run(dns, "45.33.113.9", raw=CLEAN, mail_from="a@example.org", check_senders=False)
    assert set(got) == {"RBL_SPAMHAUS_XBL", "RBL_SPAMHAUS_PBL"}
    assert got["RBL_SPAMHAUS_XBL"] == "45.33.113.9 in zen.spamhaus.org (127.0.0.4)"
    assert set(await run(dns, "45.33.113.11", raw=CLEAN, mail_from="a@example.org")) == {
        "RBL_SPAMHAUS_DROP"
    }
    assert set(await run(dns, "45.33.113.12", raw=CLEAN, mail_from="a@example.org")) == {
        "RBL_SPAMHAUS"
    }


async def test_blocked_resolver_answers_are_not_listings(dns: DNSServer) -> None:
    got = await run(dns, "45.33.113.10", raw=CLEAN, mail_from="a@example.org")
    assert set(got) == {"DNSBL_BLOCKED_RESOLVER"}
    assert "127.255.255.254" in got["DNSBL_BLOCKED_RESOLVER"]


async def test_answers_outside_127_8_are_ignored(dns: DNSServer) -> None:
    assert await run(dns, "45.33.113.13", raw=CLEAN, mail_from="a@example.org") == {}


async def test_ipv6_client_is_looked_up_by_reversed_nibbles(dns: DNSServer) -> None:
    got = await run(dns, "2001:4860::1", raw=CLEAN, mail_from="a@example.org")
    assert set(got) == {"RBL_SPAMHAUS_CSS"}


async def test_private_and_loopback_clients_are_not_looked_up(dns: DNSServer) -> None:
    before = len(dns.queries)
    assert (
        await run(dns, "10.1.2.3", raw=CLEAN, mail_from="a@example.org", check_senders=False) == {}
    )
    assert (
        await run(dns, "127.0.0.1", raw=CLEAN, mail_from="a@example.org", check_senders=False) == {}
    )
    assert len(dns.queries) == before


async def test_sender_from_and_url_domains_against_domain_lists(dns: DNSServer) -> None:
    got = await run(dns, "198.51.100.1")
    assert set(got) == {"DBL_SPAM", "SURBL_PHISH", "SURBL_ABUSE"}
    assert got["DBL_SPAM"] == "spammy-shop.com in dbl.spamhaus.org (127.0.1.2)"
    assert got["SURBL_PHISH"].startswith("listed-url.net in multi.surbl.example")
    assert DNSBLPolicy(options()).rule_symbols()["SURBL_PHISH"].score == 4.5


async def test_dbl_error_code_is_ignored(dns: DNSServer) -> None:
    raw = "From: x@phishy-bank.com\n\nhi\n"
    assert await run(dns, "198.51.100.1", raw=raw, mail_from="x@phishy-bank.com") == {}


async def test_url_lookups_can_be_switched_off(dns: DNSServer) -> None:
    got = await run(dns, "198.51.100.1", check_urls=False)
    assert set(got) == {"DBL_SPAM"}


async def test_a_silent_blocklist_is_a_zero_score_tempfail_within_the_deadline(
    dns: DNSServer,
) -> None:
    started = time.monotonic()
    got = await run(dns, "45.33.113.14", raw=CLEAN, mail_from="a@example.org", lookup_timeout=0.3)
    assert time.monotonic() - started < 0.9
    assert set(got) == {"DNSBL_TEMPFAIL"}
    assert DNSBLPolicy(options()).symbols["DNSBL_TEMPFAIL"].score == 0.0


async def test_all_lookups_of_a_message_run_concurrently(dns: DNSServer) -> None:
    """Each lookup to a dropped name costs a full resolver timeout; together they cost one."""
    for i in range(20, 26):
        dns.drop.add(f"slow{i}.com.{DBL}")
    raw = "From: a@example.org\n\n" + " ".join(f"http://slow{i}.com/x" for i in range(20, 26))
    resolver = CachingResolver(DNSConfig(nameservers=(dns.address,), timeout=0.4))
    policy = DNSBLPolicy(DNSBLOptions(lookup_timeout=2.0))
    started = time.monotonic()
    result = await policy.check(make_context(raw, resolver=resolver, client_ip="10.0.0.1"))
    assert time.monotonic() - started < 1.5
    assert {s.name for s in result.symbols} == {"DNSBL_TEMPFAIL"}


def test_zone_options_are_validated() -> None:
    from gateway.api import OptionError

    with pytest.raises(OptionError, match="zone"):
        Zone(zone="not a zone", symbol="X")
    with pytest.raises(OptionError, match="UPPER_SNAKE"):
        Zone(zone="z.example", symbol="lower")
    with pytest.raises(OptionError, match="bit values"):
        Zone(zone="z.example", symbol="X", bitmask=True, codes={"3": "Y"})
    with pytest.raises(OptionError, match=r"127\.0\.0\.2"):
        Zone(zone="z.example", symbol="X", codes={"two": "Y"})
