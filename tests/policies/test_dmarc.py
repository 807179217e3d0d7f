"""DMARC policy (RFC 9989) over real DNS: tree walk, alignment, p/sp/np/t, enforcement.

SPF and DKIM results are given as the dmarc policy would receive them from
the spf and dkim policies (``ctx.results``), so each case states exactly the
authenticated identifiers it starts from.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from auth_helpers import arc_seal, key_records, message, rsa_key

from gateway.api import Action, AuthResult, OptionError, Result
from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.testing import make_context
from gateway.testing.dnsserver import DNSServer
from policies.dmarc import DMARCOptions, DMARCPolicy, TreeWalk, parse_record, tree_walk_names

ZONE: dict[str, list[tuple[str, str]]] = {
    "_dmarc.reject.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@reject.example")],
    "_dmarc.quar.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.none.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.org.example": [("TXT", "v=DMARC1; p=reject; sp=quarantine; np=reject")],
    "org.example": [("A", "192.0.2.1")],
    "sub.org.example": [("A", "192.0.2.2")],
    "nodata.org.example": [("TXT", "something")],
    "_dmarc.nosp.example": [("TXT", "v=DMARC1; p=reject")],
    "sub.nosp.example": [("MX", "10 mx.nosp.example.")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
    "_dmarc.testing.example": [("TXT", "v=DMARC1; p=reject; t=y")],
    "_dmarc.testq.example": [("TXT", "v=DMARC1; p=quarantine; t=y")],
    "_dmarc.pct0.example": [("TXT", "v=DMARC1; p=reject; pct=0")],
    "_dmarc.pct50.example": [("TXT", "v=DMARC1; p=reject; pct=50")],
    "_dmarc.nop.example": [("TXT", "v=DMARC1; rua=mailto:x@nop.example")],
    "_dmarc.two.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.nopnorua.example": [("TXT", "v=DMARC1; adkim=s; rua=not a uri")],
    "_dmarc.badsp.example": [("TXT", "v=DMARC1; p=reject; sp=bogus; rua=mailto:a@badsp.example")],
    "_dmarc.lower.example": [("TXT", "v=dmarc1; p=reject")],
    "_dmarc.notdmarc.example": [("TXT", "v=spf1 -all")],
    # A public-suffix-like operator publishing psd=y (RFC 9989 §4.10.2).
    "_dmarc.psd": [("TXT", "v=DMARC1; p=reject; psd=y")],
    "brand.psd": [("A", "192.0.2.3")],
    "mail.brand.psd": [("A", "192.0.2.4")],
    # psd=n marks the Organizational Domain explicitly.
    "_dmarc.corp.psdn": [("TXT", "v=DMARC1; p=reject; psd=n")],
    "_dmarc.psdn": [("TXT", "v=DMARC1; p=none")],
    # Without psd: the record with the fewest labels is the Organizational Domain.
    "_dmarc.multi.test": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.a.multi.test": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.deep.test": [("TXT", "v=DMARC1; p=quarantine")],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    zone = dict(ZONE)
    zone.update(key_records(("list.example", "arc", rsa_key()), ("evil.example", "arc", rsa_key())))
    with DNSServer(
        zone,
        zones=["example", "psd", "psdn", "test"],
        servfail=["_dmarc.sf.example", "_dmarc.sfsub.reject.example"],
    ) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> CachingResolver:
    return CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=0.5))


def spf(domain: str, result: str = "pass") -> AuthResult:
    return AuthResult("spf", result, properties=(("smtp.mailfrom", domain),))


def dkim(domain: str, result: str = "pass") -> AuthResult:
    return AuthResult("dkim", result, properties=(("header.d", domain), ("header.s", "s1")))


async def run(
    resolver: CachingResolver,
    from_: str,
    auth: tuple[AuthResult, ...] = (),
    *,
    raw: bytes | None = None,
    client_ip: str = "203.0.113.50",
    **options: object,
) -> Result:
    raw = raw if raw is not None else message(from_=from_)
    results = {
        "spf": Result(auth=tuple(a for a in auth if a.method == "spf")),
        "dkim": Result(auth=tuple(a for a in auth if a.method == "dkim")),
    }
    ctx = make_context(raw, resolver=resolver, results=results, client_ip=client_ip)
    return await DMARCPolicy(DMARCOptions(**options)).check(ctx)  # type: ignore[arg-type]


def names(result: Result) -> set[str]:
    return {s.name for s in result.symbols}


def dmarc_auth(result: Result) -> list[tuple[str, str | None, str | None]]:
    return [
        (a.result, a.prop("header.from"), a.prop("policy.dmarc"))
        for a in result.auth
        if a.method == "dmarc"
    ]


# id, From, SPF/DKIM results, expected symbols, expected (result, policy), expected floor
CASES = [
    (
        "aligned dkim",
        "a@reject.example",
        (dkim("reject.example"), spf("x.example", "fail")),
        {"DMARC_PASS"},
        ("pass", "reject"),
        None,
    ),
    (
        "relaxed spf subdomain",
        "a@reject.example",
        (spf("bounce.reject.example"),),
        {"DMARC_PASS"},
        ("pass", "reject"),
        None,
    ),
    (
        "relaxed dkim parent",
        "a@news.reject.example",
        (dkim("reject.example"),),
        {"DMARC_PASS"},
        ("pass", "reject"),
        None,
    ),
    (
        "unaligned pass fails",
        "a@reject.example",
        (dkim("evil.example"), spf("evil.example")),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "spf fail dkim fail",
        "a@reject.example",
        (dkim("reject.example", "fail"), spf("reject.example", "fail")),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "quarantine",
        "a@quar.example",
        (),
        {"DMARC_POLICY_QUARANTINE"},
        ("fail", "quarantine"),
        Action.QUARANTINE,
    ),
    ("p=none", "a@none.example", (), {"DMARC_POLICY_NONE"}, ("fail", "none"), None),
    ("no record", "a@norecord.example", (), {"DMARC_NONE"}, ("none", None), None),
    ("only non-dmarc txt", "a@notdmarc.example", (), {"DMARC_NONE"}, ("none", None), None),
    (
        "strict dkim subdomain",
        "a@strict.example",
        (dkim("mail.strict.example"), spf("b.strict.example")),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "strict exact",
        "a@strict.example",
        (dkim("strict.example"),),
        {"DMARC_PASS"},
        ("pass", "reject"),
        None,
    ),
    (
        "sp for existing subdomain",
        "a@sub.org.example",
        (),
        {"DMARC_POLICY_QUARANTINE"},
        ("fail", "quarantine"),
        Action.QUARANTINE,
    ),
    (
        "np for non-existent subdomain",
        "a@ghost.org.example",
        (),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "nodata subdomain exists (only NXDOMAIN is non-existent)",
        "a@nodata.org.example",
        (),
        {"DMARC_POLICY_QUARANTINE"},
        ("fail", "quarantine"),
        Action.QUARANTINE,
    ),
    (
        "intermediate record covers only its own name",
        "a@x.a.multi.test",
        (),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    ("no valid p and no rua", "a@nopnorua.example", (), {"DMARC_NONE"}, ("none", None), None),
    (
        "bad sp with rua is p=none",
        "a@badsp.example",
        (),
        {"DMARC_POLICY_NONE"},
        ("fail", "none"),
        None,
    ),
    ("version is case-sensitive", "a@lower.example", (), {"DMARC_NONE"}, ("none", None), None),
    (
        "p when no sp",
        "a@sub.nosp.example",
        (),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "t=y reject -> quarantine",
        "a@testing.example",
        (),
        {"DMARC_POLICY_QUARANTINE", "DMARC_TESTING"},
        ("fail", "quarantine"),
        Action.QUARANTINE,
    ),
    (
        "t=y quarantine -> none",
        "a@testq.example",
        (),
        {"DMARC_POLICY_NONE", "DMARC_TESTING"},
        ("fail", "none"),
        None,
    ),
    (
        "legacy pct=0 is t=y",
        "a@pct0.example",
        (),
        {"DMARC_POLICY_QUARANTINE", "DMARC_TESTING"},
        ("fail", "quarantine"),
        Action.QUARANTINE,
    ),
    (
        "legacy pct=50 ignored",
        "a@pct50.example",
        (),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    ("missing p is none", "a@nop.example", (), {"DMARC_POLICY_NONE"}, ("fail", "none"), None),
    ("two records is none", "a@two.example", (), {"DMARC_NONE"}, ("none", None), None),
    (
        "psd=y org is one below",
        "a@mail.brand.psd",
        (dkim("brand.psd"),),
        {"DMARC_PASS"},
        ("pass", "reject"),
        None,
    ),
    (
        "psd=y sibling not aligned",
        "a@mail.brand.psd",
        (dkim("other.psd"),),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "psd=n org",
        "a@x.dept.corp.psdn",
        (spf("mail.corp.psdn"),),
        {"DMARC_PASS"},
        ("pass", "reject"),
        None,
    ),
    (
        "psd=n blocks parent",
        "a@x.corp.psdn",
        (dkim("psdn"),),
        {"DMARC_POLICY_REJECT"},
        ("fail", "reject"),
        Action.REJECT,
    ),
    (
        "fewest labels org",
        "a@a.multi.test",
        (dkim("b.multi.test"),),
        {"DMARC_PASS"},
        ("pass", "none"),
        None,
    ),
    ("own record wins", "a@a.multi.test", (), {"DMARC_POLICY_NONE"}, ("fail", "none"), None),
    (
        "long name walk",
        "a@1.2.3.4.5.6.7.8.9.deep.test",
        (),
        {"DMARC_POLICY_QUARANTINE"},
        ("fail", "quarantine"),
        Action.QUARANTINE,
    ),
    (
        "policy lookup servfail",
        "a@sf.example",
        (),
        {"DMARC_TEMPERROR"},
        ("temperror", None),
        Action.TEMPFAIL,
    ),
    (
        "aligned spf temperror",
        "a@reject.example",
        (spf("reject.example", "temperror"),),
        {"DMARC_TEMPERROR"},
        ("temperror", "reject"),
        Action.TEMPFAIL,
    ),
]


@pytest.mark.parametrize(
    ("from_", "auth", "symbols", "dmarc", "force"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_dmarc_cases(
    resolver: CachingResolver,
    from_: str,
    auth: tuple[AuthResult, ...],
    symbols: set[str],
    dmarc: tuple[str, str | None],
    force: Action | None,
) -> None:
    result = await run(resolver, from_, auth)
    assert names(result) == symbols | {"ARC_NONE"}
    domain = from_.rpartition("@")[2]
    assert dmarc_auth(result) == [(dmarc[0], domain, dmarc[1])]
    assert result.force is force


async def test_reject_reason_names_the_domains_policy(resolver: CachingResolver) -> None:
    """The sender-facing reason (550 5.7.1 ...) names the domain and its policy."""
    result = await run(resolver, "a@reject.example", (spf("evil.example"),))
    assert result.force is Action.REJECT
    assert "DMARC policy of reject.example is reject" in result.reason
    (dm,) = [a for a in result.auth if a.method == "dmarc"]
    assert dm.properties == (
        ("header.from", "reject.example"),
        ("policy.dmarc", "reject"),
        ("polrec.p", "reject"),
        ("polrec.domain", "reject.example"),
    )


async def test_no_from_means_no_dmarc(resolver: CachingResolver) -> None:
    raw = b"To: b@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    result = await run(resolver, "", (), raw=raw)
    assert names(result) == {"DMARC_NO_FROM", "ARC_NONE"}
    assert [a.result for a in result.auth if a.method == "dmarc"] == ["none"]
    assert result.force is None


async def test_from_without_domain_means_no_dmarc(resolver: CachingResolver) -> None:
    result = await run(resolver, "", (), raw=message(from_="undisclosed"))
    assert names(result) == {"DMARC_NO_FROM", "ARC_NONE"}


async def test_several_from_domains_are_each_evaluated_strictest_wins(
    resolver: CachingResolver,
) -> None:
    """RFC 9989: with several author domains each is evaluated; a pass does not hide a fail."""
    raw = message(from_="a@none.example, b@reject.example")
    result = await run(resolver, "", (dkim("none.example"),), raw=raw)
    assert names(result) == {"DMARC_PASS", "DMARC_POLICY_REJECT", "DMARC_MULTIPLE_FROM", "ARC_NONE"}
    assert result.force is Action.REJECT
    assert dmarc_auth(result) == [
        ("pass", "none.example", "none"),
        ("fail", "reject.example", "reject"),
    ]


async def test_several_from_domains_can_be_exempt_as_rfc_9989_says(
    resolver: CachingResolver,
) -> None:
    """multiple_from = "exempt": RFC 9989 §5.3.1, no DMARC checking, the symbol only."""
    raw = message(from_="a@none.example, b@reject.example")
    result = await run(resolver, "", (), raw=raw, multiple_from="exempt")
    assert names(result) == {"DMARC_MULTIPLE_FROM", "ARC_NONE"}
    assert result.force is None
    assert [(a.result, a.properties) for a in result.auth if a.method == "dmarc"] == [("none", ())]


async def test_two_from_fields_same_domain_evaluated_once(resolver: CachingResolver) -> None:
    raw = b"From: a@reject.example\r\n" + message(from_="b@reject.example")
    result = await run(resolver, "", (dkim("reject.example"),), raw=raw)
    assert names(result) == {"DMARC_PASS", "DMARC_MULTIPLE_FROM", "ARC_NONE"}
    assert len(dmarc_auth(result)) == 1


async def test_monitor_only_keeps_symbols_without_enforcing(resolver: CachingResolver) -> None:
    result = await run(resolver, "a@reject.example", (), monitor_only=True)
    assert names(result) == {"DMARC_POLICY_REJECT", "DMARC_MONITOR", "ARC_NONE"}
    assert result.force is None


async def test_monitor_domains_downgrade_one_domain(resolver: CachingResolver) -> None:
    opts = {"monitor_domains": ("reject.example",)}
    monitored = await run(resolver, "a@news.reject.example", (), **opts)
    enforced = await run(resolver, "a@quar.example", (), **opts)
    assert monitored.force is None and "DMARC_MONITOR" in names(monitored)
    assert enforced.force is Action.QUARANTINE


async def test_allowlisted_network_is_not_enforced(resolver: CachingResolver) -> None:
    result = await run(
        resolver,
        "a@reject.example",
        (),
        client_ip="198.51.100.7",
        allowlist_networks=("198.51.100.0/24",),
    )
    assert names(result) == {"DMARC_POLICY_REJECT", "DMARC_ALLOWLISTED", "ARC_NONE"}
    assert result.force is None
    assert next(s for s in result.symbols if s.name == "DMARC_POLICY_REJECT").weight == 0.0


async def test_allowlisted_domain_must_be_authenticated(resolver: CachingResolver) -> None:
    """A forwarder's domain counts only when SPF or DKIM passed for it (no spoofed MAIL FROM)."""
    opts = {"allowlist_domains": ("lists.example",)}
    ok = await run(resolver, "a@reject.example", (spf("bounces.lists.example"),), **opts)
    spoofed = await run(
        resolver, "a@reject.example", (spf("bounces.lists.example", "fail"),), **opts
    )
    assert ok.force is None and "DMARC_ALLOWLISTED" in names(ok)
    assert spoofed.force is Action.REJECT


async def test_temperror_defers_by_default_and_can_relay(resolver: CachingResolver) -> None:
    """An undecidable DMARC for an enforcing (or unknown) policy is retried, unless configured."""
    aligned_temp = (spf("reject.example", "temperror"),)
    deferred = await run(resolver, "a@reject.example", aligned_temp)
    assert deferred.force is Action.TEMPFAIL
    assert "reject.example" in deferred.reason
    relayed = await run(resolver, "a@reject.example", aligned_temp, tempfail_on_temperror=False)
    assert relayed.force is None
    assert "DMARC_TEMPERROR" in names(relayed)
    lookup_failed = await run(resolver, "a@sf.example", ())
    assert lookup_failed.force is Action.TEMPFAIL
    assert "sf.example" in lookup_failed.reason
    exempt = await run(resolver, "a@sf.example", (), monitor_domains=("sf.example",))
    assert exempt.force is None


# -- ARC ---------------------------------------------------------------------


def forwarded(
    sealer: str = "list.example", recorded: str = "dmarc=pass header.from=reject.example"
) -> bytes:
    """A message from reject.example that a list at ``sealer`` modified and ARC-sealed."""
    original = message(from_="a@reject.example", subject="[list] hello")
    return arc_seal(original, sealer, sealer, recorded)


async def test_trusted_sealer_overrides_dmarc_failure(resolver: CachingResolver) -> None:
    result = await run(
        resolver,
        "",
        (spf("list.example"),),
        raw=forwarded(),
        trusted_arc_sealers=("list.example",),
    )
    assert names(result) == {"ARC_PASS", "DMARC_POLICY_REJECT", "DMARC_ARC_OVERRIDE"}
    assert result.force is None
    assert [a.result for a in result.auth if a.method == "arc"] == ["pass"]
    assert dmarc_auth(result) == [("fail", "reject.example", "reject")]


async def test_aligned_dkim_recorded_by_trusted_sealer_overrides(resolver: CachingResolver) -> None:
    raw = forwarded(recorded="dkim=pass header.d=reject.example header.s=s1")
    result = await run(resolver, "", (), raw=raw, trusted_arc_sealers=("list.example",))
    assert "DMARC_ARC_OVERRIDE" in names(result)
    assert result.force is None


async def test_untrusted_sealer_does_not_override(resolver: CachingResolver) -> None:
    result = await run(
        resolver, "", (), raw=forwarded("evil.example"), trusted_arc_sealers=("list.example",)
    )
    assert names(result) == {"ARC_PASS", "DMARC_POLICY_REJECT"}
    assert result.force is Action.REJECT


async def test_recorded_failure_does_not_override(resolver: CachingResolver) -> None:
    raw = forwarded(recorded="dmarc=fail header.from=reject.example")
    result = await run(resolver, "", (), raw=raw, trusted_arc_sealers=("list.example",))
    assert result.force is Action.REJECT


async def test_broken_chain_does_not_override(resolver: CachingResolver) -> None:
    """Content changed after sealing: arc=fail, and DMARC is enforced."""
    raw = forwarded().replace(b"Hello there.", b"Pay this invoice.")
    result = await run(resolver, "", (), raw=raw, trusted_arc_sealers=("list.example",))
    assert names(result) == {"ARC_FAIL", "DMARC_POLICY_REJECT"}
    assert [a.result for a in result.auth if a.method == "arc"] == ["fail"]
    assert result.force is Action.REJECT


async def test_arc_can_be_switched_off(resolver: CachingResolver) -> None:
    result = await run(
        resolver, "", (), raw=forwarded(), arc=False, trusted_arc_sealers=("list.example",)
    )
    assert names(result) == {"DMARC_POLICY_REJECT"}
    assert not [a for a in result.auth if a.method == "arc"]


# -- the tree walk itself ----------------------------------------------------


def test_tree_walk_names_short_and_long() -> None:
    """RFC 9989 §4.10: the full name, then (over 8 labels) straight to 7 labels, then up."""
    assert tree_walk_names("a.b.example.com") == [
        "a.b.example.com",
        "b.example.com",
        "example.com",
        "com",
    ]
    long = "1.2.3.4.5.6.7.8.9.example"
    walk = tree_walk_names(long)
    assert walk[0] == long
    assert walk[1] == "4.5.6.7.8.9.example"
    assert walk[-1] == "example"
    assert len(walk) == 8


async def test_tree_walk_queries_at_most_eight_names(
    resolver: CachingResolver, dns_server: DNSServer
) -> None:
    before = len(dns_server.queries)
    walk = TreeWalk(resolver)
    assert await walk.policy_record("a.b.c.d.e.f.g.h.i.j.k.nothing.example") is None
    queried = [q for q in dns_server.queries[before:] if q[0].startswith("_dmarc.")]
    assert len({q[0] for q in queried}) == 8


def test_parse_record_requires_v_first() -> None:
    assert parse_record("x", "p=reject; v=DMARC1") is None
    rec = parse_record("x", "v=DMARC1;p=quarantine;sp=none;adkim=s;t=y")
    assert rec is not None and rec.adkim == "s" and rec.testing


def test_options_are_validated_with_their_key() -> None:
    with pytest.raises(OptionError, match=r"allowlist_networks\[0\]"):
        DMARCOptions(allowlist_networks=("not a network",))
    with pytest.raises(OptionError, match=r"trusted_arc_sealers\[0\]"):
        DMARCOptions(trusted_arc_sealers=("bad domain!",))


def test_dmarc_without_spf_and_dkim_refuses_to_start() -> None:
    """dmarc reads spf and dkim results: a config enabling it alone is an error that says so."""
    from gateway.registry import plan_policies
    from gateway.schema import Problems

    problems = Problems()
    plan_policies({"dmarc": {}, "dkim": {}}, problems)
    assert problems.lines == [
        'policies.dmarc: runs after "spf", which is not enabled; add a [policies.spf] table '
        "or set policies.dmarc.enabled = false"
    ]
    ok = Problems()
    plan = plan_policies({"dmarc": {}, "dkim": {}, "spf": {}}, ok)
    assert ok.lines == []
    assert [p.name for p in plan.policies].index("dmarc") == 2


def test_unknown_option_gets_a_did_you_mean() -> None:
    from gateway.registry import plan_policies
    from gateway.schema import Problems

    problems = Problems()
    plan_policies({"spf": {}, "dkim": {}, "dmarc": {"trusted_arc_sealer": []}}, problems)
    assert problems.lines == [
        'policies.dmarc.trusted_arc_sealer: unknown key (did you mean "trusted_arc_sealers"?)'
    ]
