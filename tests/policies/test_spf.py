"""SPF policy (RFC 7208) over real DNS: pure calls, exact symbol sets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from gateway.api import Action, AuthResult, Context
from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.testing import make_context
from gateway.testing.dnsserver import DNSServer
from policies.spf import SPFOptions, SPFPolicy

MANY_IPS = " ".join(f"ip4:10.{i}.0.0/16" for i in range(120))

ZONE: dict[str, list[tuple[str, str]]] = {
    "example.com": [
        ("TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8:1::/48 include:_spf.example.net -all"),
        ("TXT", "google-site-verification=not-an-spf-record"),
    ],
    "_spf.example.net": [("TXT", "v=spf1 ip4:198.51.100.0/24 ~all")],
    "mail.example.com": [("TXT", "v=spf1 a -all"), ("A", "192.0.2.10")],
    "redirect.example": [("TXT", "v=spf1 redirect=example.com")],
    "softfail.example": [("TXT", "v=spf1 ~all")],
    "neutral.example": [("TXT", "v=spf1 ?all")],
    "norecord.example": [("A", "192.0.2.1")],
    "syntax.example": [("TXT", "v=spf1 ip4:192.0.2.300 -all")],
    "two.example": [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 +all")],
    "toomany.example": [
        ("TXT", "v=spf1 " + " ".join(f"a:h{i}.toomany.example" for i in range(11)) + " -all")
    ],
    **{f"h{i}.toomany.example": [("A", f"203.0.113.{100 + i}")] for i in range(11)},
    "tenok.example": [
        ("TXT", "v=spf1 " + " ".join(f"a:h{i}.toomany.example" for i in range(10)) + " -all")
    ],
    "void.example": [("TXT", "v=spf1 a:v1.void.example a:v2.void.example a:v3.void.example -all")],
    "twovoid.example": [("TXT", "v=spf1 a:v1.void.example a:v2.void.example ?all")],
    "macro.example": [("TXT", "v=spf1 exists:%{ir}.%{l}._spf.macro.example -all")],
    "77.2.0.192.alice._spf.macro.example": [("A", "127.0.0.2")],
    "exp.example": [("TXT", "v=spf1 -all exp=explain.exp.example")],
    "explain.exp.example": [("TXT", "%{i} is not one of %{d}'s servers")],
    "ptr.example": [("TXT", "v=spf1 ptr -all")],
    "5.113.0.203.in-addr.arpa": [("PTR", "mail.ptr.example.")],
    "mail.ptr.example": [("A", "203.0.113.5")],
    "mx.example": [("TXT", "v=spf1 mx -all"), ("MX", "10 mail.mx.example.")],
    "mail.mx.example": [("A", "203.0.113.20")],
    "v6.example": [("TXT", "v=spf1 a -all"), ("AAAA", "2001:db8:2::1")],
    "incsf.example": [("TXT", "v=spf1 include:servfail.example -all")],
    "long.example": [("TXT", f"v=spf1 {MANY_IPS} ip4:192.0.2.0/24 -all")],
    "manymx.example": [("TXT", "v=spf1 mx -all")]
    + [("MX", f"{i} mx{i}.manymx.example.") for i in range(11)],
    "loop.example": [("TXT", "v=spf1 redirect=loop.example")],
    "cname.example": [("CNAME", "example.com.")],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(
        ZONE,
        zones=["example", "example.com", "example.net", "in-addr.arpa"],
        servfail=["servfail.example"],
        drop=["drop.example"],
    ) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> CachingResolver:
    return CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=0.5))


async def run(
    resolver: CachingResolver,
    *,
    ip: str | None,
    mail_from: str,
    helo: str = "mail.example.com",
    **options: object,
) -> tuple[set[str], tuple[AuthResult, ...], Action | None]:
    policy = SPFPolicy(SPFOptions(**options))  # type: ignore[arg-type]
    try:
        ctx = make_context(
            "From: a@example.com\r\n\r\nhi\r\n",
            resolver=resolver,
            client_ip=ip,
            helo=helo,
            mail_from=mail_from,
        )
        result = await policy.check(ctx)
    finally:
        await policy.close()
    return {s.name for s in result.symbols}, result.auth, result.force


CASES = [
    # id, client ip, MAIL FROM, HELO, expected symbols
    ("ip4 pass", "192.0.2.10", "a@example.com", "mail.example.com", {"SPF_PASS", "SPF_HELO_PASS"}),
    ("ip6 pass", "2001:db8:1::25", "a@example.com", "x.invalid", {"SPF_PASS", "SPF_HELO_NONE"}),
    (
        "include softfail is no match",
        "198.51.100.9",
        "a@example.com",
        "h",
        {"SPF_PASS", "SPF_HELO_NONE"},
    ),
    ("fail", "203.0.113.9", "a@example.com", "mail.example.com", {"SPF_FAIL", "SPF_HELO_FAIL"}),
    ("redirect", "192.0.2.44", "a@redirect.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("redirect fail", "203.0.113.9", "a@redirect.example", "h", {"SPF_FAIL", "SPF_HELO_NONE"}),
    ("softfail", "203.0.113.9", "a@softfail.example", "h", {"SPF_SOFTFAIL", "SPF_HELO_NONE"}),
    ("neutral", "203.0.113.9", "a@neutral.example", "h", {"SPF_NEUTRAL", "SPF_HELO_NONE"}),
    ("no record", "203.0.113.9", "a@norecord.example", "h", {"SPF_NONE", "SPF_HELO_NONE"}),
    ("nxdomain", "203.0.113.9", "a@nothere.example", "h", {"SPF_NONE", "SPF_HELO_NONE"}),
    ("bad syntax", "203.0.113.9", "a@syntax.example", "h", {"SPF_PERMERROR", "SPF_HELO_NONE"}),
    ("two records", "203.0.113.9", "a@two.example", "h", {"SPF_PERMERROR", "SPF_HELO_NONE"}),
    ("11 lookups", "203.0.113.1", "a@toomany.example", "h", {"SPF_PERMERROR", "SPF_HELO_NONE"}),
    ("10 lookups ok", "203.0.113.109", "a@tenok.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("3 void lookups", "203.0.113.1", "a@void.example", "h", {"SPF_PERMERROR", "SPF_HELO_NONE"}),
    (
        "2 void lookups ok",
        "203.0.113.1",
        "a@twovoid.example",
        "h",
        {"SPF_NEUTRAL", "SPF_HELO_NONE"},
    ),
    ("macro pass", "192.0.2.77", "alice@macro.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("macro fail", "192.0.2.77", "bob@macro.example", "h", {"SPF_FAIL", "SPF_HELO_NONE"}),
    ("ptr pass", "203.0.113.5", "a@ptr.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("ptr fail", "203.0.113.6", "a@ptr.example", "h", {"SPF_FAIL", "SPF_HELO_NONE"}),
    ("mx pass", "203.0.113.20", "a@mx.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("aaaa pass", "2001:db8:2::1", "a@v6.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("aaaa fail", "2001:db8:2::2", "a@v6.example", "h", {"SPF_FAIL", "SPF_HELO_NONE"}),
    ("v4-mapped v6", "::ffff:192.0.2.10", "a@example.com", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("servfail", "192.0.2.10", "a@servfail.example", "h", {"SPF_TEMPERROR", "SPF_HELO_NONE"}),
    ("servfail include", "192.0.2.10", "a@incsf.example", "h", {"SPF_TEMPERROR", "SPF_HELO_NONE"}),
    ("timeout", "192.0.2.10", "a@drop.example", "h", {"SPF_TEMPERROR", "SPF_HELO_NONE"}),
    ("single label", "192.0.2.10", "a@localhost", "h", {"SPF_NONE", "SPF_HELO_NONE"}),
    ("no at sign", "192.0.2.10", "example.com", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("helo literal", "192.0.2.10", "a@example.com", "[192.0.2.10]", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("long record over tcp", "192.0.2.8", "a@long.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
    ("11 mx names", "203.0.113.1", "a@manymx.example", "h", {"SPF_PERMERROR", "SPF_HELO_NONE"}),
    ("redirect loop", "203.0.113.1", "a@loop.example", "h", {"SPF_PERMERROR", "SPF_HELO_NONE"}),
    ("cname to a record", "192.0.2.10", "a@cname.example", "h", {"SPF_PASS", "SPF_HELO_NONE"}),
]


@pytest.mark.parametrize(
    ("ip", "mail_from", "helo", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_spf_result_symbols(
    resolver: CachingResolver, ip: str, mail_from: str, helo: str, expected: set[str]
) -> None:
    """Each RFC 7208 outcome maps to exactly one MAIL FROM and one HELO symbol."""
    symbols, _auth, force = await run(resolver, ip=ip, mail_from=mail_from, helo=helo)
    assert symbols == expected
    assert force is None  # SPF alone never rejects nor tempfails by default


async def test_auth_results_name_both_identities(resolver: CachingResolver) -> None:
    """smtp.mailfrom carries the MAIL FROM domain, smtp.helo the HELO name."""
    _, auth, _ = await run(resolver, ip="203.0.113.9", mail_from="a@example.com")
    assert auth == (
        AuthResult("spf", "fail", properties=(("smtp.mailfrom", "example.com"),)),
        AuthResult("spf", "fail", properties=(("smtp.helo", "mail.example.com"),)),
    )


async def test_null_sender_uses_postmaster_at_helo(resolver: CachingResolver) -> None:
    """RFC 7208 §2.4: a bounce's MAIL FROM identity is postmaster@<HELO>."""
    symbols, auth, _ = await run(resolver, ip="192.0.2.10", mail_from="")
    assert symbols == {"SPF_PASS", "SPF_HELO_PASS"}
    assert auth[0] == AuthResult(
        "spf", "pass", properties=(("smtp.mailfrom", "postmaster@mail.example.com"),)
    )


async def test_explanation_from_exp_modifier(resolver: CachingResolver) -> None:
    """exp= (RFC 7208 §6.2) is fetched and macro-expanded into the symbol's evidence."""
    policy = SPFPolicy(SPFOptions(check_helo=False))
    ctx = make_context(
        "\r\n", resolver=resolver, client_ip="192.0.2.99", mail_from="a@exp.example", helo="h"
    )
    result = await policy.check(ctx)
    await policy.close()
    assert [s.name for s in result.symbols] == ["SPF_FAIL"]
    assert "192.0.2.99 is not one of exp.example's servers" in result.symbols[0].detail


async def test_long_record_is_fetched_over_tcp(
    resolver: CachingResolver, dns_server: DNSServer
) -> None:
    """A record too long for UDP (TC bit) is retried over TCP and still evaluated."""
    symbols, _, _ = await run(
        resolver, ip="192.0.2.8", mail_from="a@long.example", check_helo=False
    )
    assert symbols == {"SPF_PASS"}
    assert ("long.example", "TXT", "tcp") in dns_server.queries


async def test_servfail_is_temperror_not_none(resolver: CachingResolver) -> None:
    """A SERVFAIL must never read as 'no SPF record'."""
    _, auth, force = await run(resolver, ip="192.0.2.10", mail_from="a@servfail.example")
    assert auth[0].result == "temperror"
    assert force is None


async def test_temperror_tempfails_only_when_configured(resolver: CachingResolver) -> None:
    """tempfail_on_temperror=true turns a MAIL FROM temperror into a 451 floor."""
    _, _, force = await run(
        resolver, ip="192.0.2.10", mail_from="a@servfail.example", tempfail_on_temperror=True
    )
    assert force is Action.TEMPFAIL


async def test_whole_check_is_bounded_and_never_blocks_the_loop(
    dns_server: DNSServer,
) -> None:
    """A silent DNS server costs at most check_timeout, and the event loop keeps running."""
    slow = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=5.0))
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    symbols, _auth, _ = await run(
        slow, ip="192.0.2.10", mail_from="a@drop.example", check_helo=False, check_timeout=0.4
    )
    elapsed = time.monotonic() - started
    stop.set()
    await task
    assert symbols == {"SPF_TEMPERROR"}
    assert 0.3 < elapsed < 1.5
    assert ticks >= 15  # the loop ran while pyspf waited in its worker thread


async def test_concurrent_checks_use_their_own_resolver(dns_server: DNSServer) -> None:
    """pyspf's DNS hook is global; each evaluation still reaches its own resolver."""
    good = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=0.5))
    policy = SPFPolicy(SPFOptions(check_helo=False))

    async def one(ip: str) -> str:
        ctx = make_context("\r\n", resolver=good, client_ip=ip, mail_from="a@example.com")
        return (await policy.check(ctx)).auth[0].result

    results = await asyncio.gather(
        *(one(f"192.0.2.{i}" if i % 2 else f"203.0.113.{i}") for i in range(40))
    )
    await policy.close()
    assert results == ["pass" if i % 2 else "fail" for i in range(40)]


async def test_slow_domains_cannot_starve_other_evaluations(dns_server: DNSServer) -> None:
    """Fifty evaluations stuck on a silent DNS server do not delay an unrelated one."""
    res = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=3.0))
    policy = SPFPolicy(SPFOptions(check_helo=False, check_timeout=3.0))

    def ctx(mail_from: str) -> Context:
        return make_context("\r\n", resolver=res, client_ip="192.0.2.10", mail_from=mail_from)

    stuck = [asyncio.create_task(policy.check(ctx(f"a{i}@drop.example"))) for i in range(50)]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    result = await policy.check(ctx("a@example.com"))
    assert time.monotonic() - started < 1.0
    assert result.auth[0].result == "pass"
    for task in stuck:
        task.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)


async def test_no_client_ip_is_none(resolver: CachingResolver) -> None:
    """Without a client address (e.g. scan without --ip) SPF cannot apply."""
    symbols, _, _ = await run(resolver, ip=None, mail_from="a@example.com")
    assert symbols == {"SPF_NONE", "SPF_HELO_NONE"}


def test_option_errors_name_the_key() -> None:
    from gateway.api import OptionError

    with pytest.raises(OptionError, match="check_timeout"):
        SPFOptions(check_timeout=0)


@pytest.mark.parametrize(
    ("mail_from", "helo"),
    [
        ("a@", ""),
        ("", ""),
        ("", "[192.0.2.1]"),
        ("x y@exa mple.com", "bad helo"),
        ("é@ü.example", "ü"),
    ],
)
async def test_odd_envelopes_give_renderable_auth_results(
    resolver: CachingResolver, mail_from: str, helo: str
) -> None:
    """No empty or non-ASCII property values: the Authentication-Results field must render."""
    from gateway.verdict import authentication_results

    symbols, auth, _ = await run(resolver, ip="192.0.2.10", mail_from=mail_from, helo=helo)
    assert any(s.startswith("SPF_") and not s.startswith("SPF_HELO_") for s in symbols)
    text = authentication_results("mx.example.org", auth)
    assert text.startswith("mx.example.org; spf=")
    assert text.isascii()
    assert all(v for a in auth for _, v in a.properties)


async def test_internationalized_domain_is_checked_as_a_label(dns_server: DNSServer) -> None:
    """RFC 7208 §4.3 / RFC 5890: a U-label MAIL FROM domain is looked up as its A-label."""
    dns_server.set("xn--bcher-kva.example", ("TXT", "v=spf1 ip4:192.0.2.0/24 -all"))
    res = CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=0.5))
    symbols, auth, _ = await run(res, ip="192.0.2.10", mail_from="käufer@bücher.example", helo="h")
    assert symbols == {"SPF_PASS", "SPF_HELO_NONE"}
    assert auth[0].prop("smtp.mailfrom") == "xn--bcher-kva.example"
