"""DKIM policy (RFC 6376, 8301, 8463) over real DNS: every signature, its own result."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from auth_helpers import ed25519_key, key_records, message, rsa_key, sign

from gateway.api import AuthResult, OptionError
from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.testing import make_context
from gateway.testing.dnsserver import DNSServer
from policies.dkim import DKIMOptions, DKIMPolicy


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    zone = key_records(
        ("example.com", "s1", rsa_key()),
        ("example.com", "ed", ed25519_key()),
        ("example.com", "weak", rsa_key(512)),
        ("other.example", "s1", rsa_key()),
    )
    zone["bad._domainkey.example.com"] = [("TXT", "v=DKIM1; k=rsa; p=notbase64!!")]
    zone["revoked._domainkey.example.com"] = [("TXT", "v=DKIM1; k=rsa; p=")]
    with DNSServer(
        zone, zones=["example.com", "other.example"], servfail=["sf._domainkey.example.com"]
    ) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> CachingResolver:
    return CachingResolver(DNSConfig(nameservers=(dns_server.address,), timeout=0.5))


async def check(
    resolver: CachingResolver, raw: bytes, **options: int
) -> tuple[set[str], list[AuthResult]]:
    result = await DKIMPolicy(DKIMOptions(**options)).check(make_context(raw, resolver=resolver))
    return {s.name for s in result.symbols}, list(result.auth)


def results(auth: list[AuthResult]) -> list[tuple[str, str | None, str | None]]:
    return [(a.result, a.prop("header.d"), a.prop("header.s")) for a in auth]


async def test_rsa_2048_signature_passes(resolver: CachingResolver) -> None:
    symbols, auth = await check(resolver, sign(message(), "example.com", "s1"))
    assert symbols == {"DKIM_PASS"}
    assert results(auth) == [("pass", "example.com", "s1")]
    assert auth[0].prop("header.a") == "rsa-sha256"
    assert auth[0].prop("header.b")


async def test_ed25519_signature_passes(resolver: CachingResolver) -> None:
    """RFC 8463 Ed25519 signatures verify like RSA ones."""
    symbols, auth = await check(resolver, sign(message(), "example.com", "ed", ed25519_key()))
    assert symbols == {"DKIM_PASS"}
    assert results(auth) == [("pass", "example.com", "ed")]
    assert auth[0].prop("header.a") == "ed25519-sha256"


async def test_every_signature_has_its_own_result(resolver: CachingResolver) -> None:
    """Dual-signed (Ed25519 + RSA) plus a third party: one result per signature, top first."""
    raw = sign(message(), "example.com", "s1")
    raw = sign(raw, "example.com", "ed", ed25519_key())
    raw = sign(raw, "other.example", "s1")
    symbols, auth = await check(resolver, raw)
    assert symbols == {"DKIM_PASS"}
    assert results(auth) == [
        ("pass", "other.example", "s1"),
        ("pass", "example.com", "ed"),
        ("pass", "example.com", "s1"),
    ]


async def test_rsa_512_key_fails(resolver: CachingResolver) -> None:
    """RFC 8301 §3.2: RSA keys under 1024 bits are not acceptable."""
    symbols, auth = await check(resolver, sign(message(), "example.com", "weak", rsa_key(512)))
    assert symbols == {"DKIM_FAIL", "DKIM_KEY_TOO_SMALL"}
    assert results(auth) == [("fail", "example.com", "weak")]
    assert "512" in auth[0].reason


async def test_rsa_sha1_fails(resolver: CachingResolver) -> None:
    """RFC 8301 §3.1: rsa-sha1 MUST NOT be used for verifying."""
    raw = sign(message(), "example.com", "s1", algorithm=b"rsa-sha1")
    symbols, _auth = await check(resolver, raw)
    assert symbols == {"DKIM_FAIL", "DKIM_SHA1"}


async def test_altered_body_fails(resolver: CachingResolver) -> None:
    raw = sign(message(), "example.com", "s1").replace(b"See you.", b"Pay now.")
    symbols, auth = await check(resolver, raw)
    assert symbols == {"DKIM_FAIL"}
    assert "body hash" in auth[0].reason


async def test_altered_signed_header_fails(resolver: CachingResolver) -> None:
    raw = sign(message(), "example.com", "s1").replace(b"Subject: hello", b"Subject: invoice")
    symbols, auth = await check(resolver, raw)
    assert symbols == {"DKIM_FAIL"}
    assert results(auth) == [("fail", "example.com", "s1")]


async def test_one_bad_signature_does_not_spoil_another(resolver: CachingResolver) -> None:
    raw = sign(message(), "example.com", "s1")
    raw = sign(raw, "example.com", "weak", rsa_key(512))
    symbols, auth = await check(resolver, raw)
    assert symbols == {"DKIM_PASS", "DKIM_FAIL", "DKIM_KEY_TOO_SMALL"}
    assert [a.result for a in auth] == ["fail", "pass"]


async def test_missing_key_is_permerror(resolver: CachingResolver) -> None:
    """RFC 6376 §6.1.2: no key record -> PERMFAIL (permerror)."""
    symbols, auth = await check(resolver, sign(message(), "example.com", "nokey"))
    assert symbols == {"DKIM_PERMERROR"}
    assert auth[0].result == "permerror"


@pytest.mark.parametrize("selector", ["bad", "revoked"])
async def test_unusable_key_is_permerror(resolver: CachingResolver, selector: str) -> None:
    symbols, _ = await check(resolver, sign(message(), "example.com", selector))
    assert symbols == {"DKIM_PERMERROR"}


async def test_key_servfail_is_temperror(resolver: CachingResolver) -> None:
    """A SERVFAIL on the key is temperror, never a failure of the signature."""
    symbols, auth = await check(resolver, sign(message(), "example.com", "sf"))
    assert symbols == {"DKIM_TEMPERROR"}
    assert results(auth) == [("temperror", "example.com", "sf")]


async def test_body_length_tag_with_appended_content_is_flagged(resolver: CachingResolver) -> None:
    """l= that leaves part of the body unsigned still passes, with a symbol (RFC 6376 §8.2)."""
    raw = sign(message(), "example.com", "s1", length=True) + b"Appended by someone else.\r\n"
    symbols, auth = await check(resolver, raw)
    assert symbols == {"DKIM_PASS", "DKIM_BODY_LENGTH_LIMITED"}
    assert auth[0].result == "pass"


async def test_body_length_tag_covering_everything_is_fine(resolver: CachingResolver) -> None:
    symbols, _ = await check(resolver, sign(message(), "example.com", "s1", length=True))
    assert symbols == {"DKIM_PASS"}


async def test_unsigned_message_is_none(resolver: CachingResolver) -> None:
    symbols, auth = await check(resolver, message())
    assert symbols == {"DKIM_NONE"}
    assert [a.result for a in auth] == ["none"]


async def test_malformed_signature_is_permerror(resolver: CachingResolver) -> None:
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; garbage\r\n" + message()
    symbols, auth = await check(resolver, raw)
    assert symbols == {"DKIM_PERMERROR"}
    assert auth[0].result == "permerror"


async def test_signature_count_is_bounded(resolver: CachingResolver, dns_server: DNSServer) -> None:
    """Only max_signatures signatures are checked; the rest are reported, not verified."""
    raw = message()
    for i in range(5):
        raw = sign(raw, "example.com", f"many{i}")
    before = len(dns_server.queries)
    symbols, auth = await check(resolver, raw, max_signatures=3)
    assert symbols == {"DKIM_PERMERROR", "DKIM_TOO_MANY_SIGNATURES"}
    assert len(auth) == 3
    assert len(dns_server.queries) - before == 3


def test_min_key_bits_cannot_go_below_rfc_8301() -> None:
    with pytest.raises(OptionError, match="min_key_bits"):
        DKIMOptions(min_key_bits=512)


async def test_verification_cpu_is_bounded_by_a_byte_budget(
    resolver: CachingResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signatures past the body-hashing budget are reported ("policy"), not verified."""
    import policies.dkim

    raw = sign(sign(sign(message(), "example.com", "s1"), "example.com", "s1"), "example.com", "s1")
    body = len(raw.split(b"\r\n\r\n", 1)[1])
    monkeypatch.setattr(policies.dkim, "VERIFY_BUDGET_BYTES", 2 * body)
    symbols, auth = await check(resolver, raw)
    assert [a.result for a in auth] == ["pass", "pass", "policy"]
    assert symbols == {"DKIM_PASS", "DKIM_TOO_MANY_SIGNATURES"}


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            b"v=1; a=rsa-sha256; d=example.com; i=example.com; s=s1; h=from; bh=AAAA; b=AAAA",
            "permerror",
        ),
        (b"v=1; a=rsa-sha256; d=example.com; s=s1; h=from; bh=AAAA; b=AAAA; l=99999999999", "fail"),
        (b"v=1; a=rsa-sha256; d=; s=; h=; bh=; b=", "permerror"),
        (b"v=1; a=rsa-sha256; d=exa\xffmple.com; s=s\x001; h=from; bh=AAAA; b=AAAA", "permerror"),
    ],
    ids=["i-equals-d", "huge-l", "empty-tags", "binary"],
)
async def test_hostile_signature_fields_are_results_not_crashes(
    resolver: CachingResolver, tags: bytes, expected: str
) -> None:
    symbols, auth = await check(resolver, b"DKIM-Signature: " + tags + b"\r\n" + message())
    assert symbols == {f"DKIM_{expected.upper()}"}
    assert [a.result for a in auth] == [expected]
