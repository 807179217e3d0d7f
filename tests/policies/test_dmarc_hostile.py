"""Hostile input for the authentication policies: never a crash, always a renderable result.

Random envelopes, From fields, DKIM-Signature and ARC fields go through spf,
dkim and dmarc as the pipeline would run them; every outcome must be an
answer (a symbol and RFC 8601 results that authres can write), never an
exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.api import Result
from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.testing import make_context
from gateway.testing.dnsserver import DNSServer
from gateway.verdict import authentication_results
from policies.dkim import DKIMOptions, DKIMPolicy
from policies.dmarc import DMARCOptions, DMARCPolicy
from policies.spf import SPFOptions, SPFPolicy


@pytest.fixture(scope="module")
def dns_address() -> Iterator[str]:
    zone = {
        "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; sp=none; np=quarantine; psd=n")],
        "example.com": [("TXT", "v=spf1 a mx ptr exists:%{i}.%{l}.%{d}.x -all")],
    }
    with DNSServer(zone, zones=["example.com", "example"]) as server:
        yield server.address


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
DOMAINISH = st.from_regex(r"[a-z0-9.\-_]{0,30}(\.example\.com|\.example)?", fullmatch=True)
ADDRESS = st.one_of(TEXT, st.builds(lambda a, d: f"{a}@{d}", TEXT, DOMAINISH))
TAG = st.sampled_from(["v", "a", "b", "bh", "c", "d", "h", "i", "l", "q", "s", "t", "x", "z", ""])
TAG_VALUE = st.one_of(
    st.sampled_from(
        [
            "1",
            "rsa-sha256",
            "ed25519-sha256",
            "relaxed/simple",
            "example.com",
            "from:to",
            "AAAA",
            "99999999999999999999",
            "-1",
            "s1",
        ]
    ),
    TEXT.map(lambda t: t.replace(";", "").replace("\r", "").replace("\n", "")),
)
SIG = st.lists(st.tuples(TAG, TAG_VALUE), max_size=12).map(
    lambda tags: "; ".join(f"{k}={v}" for k, v in tags)
)


def _header_safe(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


async def _run_all(address: str, raw: bytes, mail_from: str, helo: str, ip: str) -> list[Result]:
    resolver = CachingResolver(DNSConfig(nameservers=(address,), timeout=0.5))
    spf = SPFPolicy(SPFOptions(check_timeout=2.0))
    try:
        ctx = make_context(raw, resolver=resolver, client_ip=ip, mail_from=mail_from, helo=helo)
        spf_res = await spf.check(ctx)
        dkim_res = await DKIMPolicy(DKIMOptions()).check(ctx)
        view = ctx.with_results({"spf": spf_res, "dkim": dkim_res})
        dmarc_res = await DMARCPolicy(DMARCOptions()).check(view)
    finally:
        await spf.close()
    return [spf_res, dkim_res, dmarc_res]


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    from_=st.lists(ADDRESS, min_size=0, max_size=3),
    mail_from=ADDRESS,
    helo=st.one_of(TEXT, DOMAINISH),
    sigs=st.lists(SIG, max_size=3),
    arc=st.lists(SIG, max_size=2),
    ip=st.sampled_from(["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "not-an-ip"]),
)
def test_random_input_never_crashes_and_always_renders(
    dns_address: str,
    from_: list[str],
    mail_from: str,
    helo: str,
    sigs: list[str],
    arc: list[str],
    ip: str,
) -> None:
    head = "".join(f"DKIM-Signature: {_header_safe(s)}\r\n" for s in sigs)
    head += "".join(
        f"ARC-Seal: i=1; {_header_safe(s)}\r\nARC-Message-Signature: i=1; {_header_safe(s)}\r\n"
        f"ARC-Authentication-Results: i=1; x; dmarc=pass\r\n"
        for s in arc
    )
    head += "".join(f"From: {_header_safe(f)}\r\n" for f in from_)
    raw = (head + "Subject: x\r\n\r\nbody\r\n").encode("utf-8")
    results = asyncio.run(
        _run_all(dns_address, raw, _header_safe(mail_from), _header_safe(helo), ip)
    )
    auth = tuple(a for r in results for a in r.auth)
    text = authentication_results("mx.example.org", auth)
    assert text.isascii()
    for r in results:
        assert r.symbols
        for s in r.symbols:
            assert s.detail.isascii() and "\n" not in s.detail


async def test_thousands_of_from_addresses_are_bounded(dns_address: str) -> None:
    """A From field with many domains costs DNS per distinct domain only, and finishes."""
    many = ", ".join(f"a@d{i}.example" for i in range(300))
    raw = f"From: {many}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    resolver = CachingResolver(DNSConfig(nameservers=(dns_address,), timeout=0.5))
    ctx = make_context(raw, resolver=resolver)
    result = await asyncio.wait_for(DMARCPolicy(DMARCOptions()).check(ctx), 30)
    assert {"DMARC_MULTIPLE_FROM", "DMARC_TOO_MANY_FROM"} <= {s.name for s in result.symbols}
    assert len([a for a in result.auth if a.method == "dmarc"]) == 10


async def test_endless_header_section_is_cheap(dns_address: str) -> None:
    """5 MB of header lines and no body: only the first 256 KB are scanned for DKIM/ARC."""
    import time

    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; b=AAAA; bh=AAAA; h=from\r\n"
    raw = b"From: a@example.com\r\n" + (sig + b"X-Filler: " + b"y" * 60 + b"\r\n") * 60_000
    assert len(raw) > 5_000_000
    started = time.monotonic()
    results = await _run_all(dns_address, raw, "a@example.com", "mail.example.com", "192.0.2.1")
    assert time.monotonic() - started < 5.0
    dkim_auth = [a for a in results[1].auth if a.method == "dkim"]
    assert len(dkim_auth) == 10  # max_signatures, from the first 256 KB only
