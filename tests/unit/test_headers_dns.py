"""Byte-exact header surgery, and the caching resolver against a real DNS server."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import headers
from gateway.api import DNSTemporaryError
from gateway.config import DNSConfig
from gateway.dns import CachingResolver
from gateway.headers import prepend, remove_fields, untrusted_field
from gateway.testing.dnsserver import DNSServer

RAW = (
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: mx.example.org; spf=pass\r\n"
    b"  smtp.mailfrom=evil.example\r\n"
    b"Authentication-Results: other.example; dkim=pass\r\n"
    b"X-Spam-Status: No, score=-100\r\n"
    b"x-spam-flag: NO\r\n"
    b"Subject: X-Spam-Status: not a header\r\n"
    b"\r\n"
    b"X-Spam-Status: in the body stays\r\n"
)


def test_untrusted_fields_are_removed_and_every_other_byte_kept() -> None:
    out = remove_fields(RAW, untrusted_field("MX.example.org"))
    assert out == (
        b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Authentication-Results: other.example; dkim=pass\r\n"
        b"Subject: X-Spam-Status: not a header\r\n"
        b"\r\n"
        b"X-Spam-Status: in the body stays\r\n"
    )


def test_message_without_untrusted_fields_is_returned_unchanged() -> None:
    raw = b"Subject: a\n\nbody\n"
    assert remove_fields(raw, untrusted_field("mx")) is raw


def test_prepend_puts_fields_before_the_received_bytes() -> None:
    assert prepend(b"Subject: a\r\n\r\nb", ["X-A: 1", "X-B: 2\r\n\tfolded"]) == (
        b"X-A: 1\r\nX-B: 2\r\n\tfolded\r\nSubject: a\r\n\r\nb"
    )


@pytest.fixture(scope="module")
def dns_server() -> DNSServer:
    server = DNSServer(
        {
            "example.com": [
                ("TXT", "v=spf1 -all"),
                ("TXT", "k=rsa; p=" + "A" * 1500),
                ("A", "192.0.2.1"),
            ],
            "mail.example.com": [("MX", "10 mx.example.com")],
        },
        servfail=["broken.example.com"],
        drop=["silent.example.com"],
    ).start()
    yield server
    server.stop()


def resolver(server: DNSServer, **kw: float) -> CachingResolver:
    return CachingResolver(DNSConfig(nameservers=(server.address,), timeout=0.5, **kw))


async def test_long_txt_records_arrive_whole_over_tcp_fallback(dns_server: DNSServer) -> None:
    ans = await resolver(dns_server).query("Example.COM.", "TXT")
    assert sorted(ans.records) == ["k=rsa; p=" + "A" * 1500, "v=spf1 -all"]
    assert ("example.com", "TXT", "tcp") in dns_server.queries


async def test_nxdomain_and_nodata_are_answers(dns_server: DNSServer) -> None:
    r = resolver(dns_server)
    nx = await r.query("nope.example.com", "A")
    assert nx.nxdomain and nx.records == ()
    nodata = await r.query("example.com", "MX")
    assert not nodata.nxdomain and nodata.records == ()


async def test_servfail_and_timeout_are_temporary_errors(dns_server: DNSServer) -> None:
    r = resolver(dns_server)
    with pytest.raises(DNSTemporaryError):
        await r.query("broken.example.com", "A")
    with pytest.raises(DNSTemporaryError):
        await r.query("silent.example.com", "TXT")


async def test_answers_are_cached_and_concurrent_lookups_coalesce(dns_server: DNSServer) -> None:
    r = resolver(dns_server)
    before = len(dns_server.queries)
    answers = await asyncio.gather(*(r.query("mail.example.com", "MX") for _ in range(20)))
    await r.query("mail.example.com", "MX")
    assert {a.records for a in answers} == {("10 mx.example.com",)}
    assert len(dns_server.queries) - before == 1
    assert r.hits == 20 and r.misses == 1


async def test_impossible_names_are_nxdomain_without_a_query(dns_server: DNSServer) -> None:
    before = len(dns_server.queries)
    ans = await resolver(dns_server).query("a" * 64 + ".example.com", "A")
    assert ans.nxdomain
    assert len(dns_server.queries) == before


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"\r\n", b"\n", b"\r", b"a: b", b" c", b"\r\n\r\n", b"x"]), max_size=30
    )
)
def test_header_block_end_is_the_first_empty_line_of_either_kind(pieces: list[bytes]) -> None:
    """The separator is the first CRLF CRLF or bare LF LF, whichever comes first."""
    raw = b"".join(pieces)
    expected = len(raw)
    if raw.startswith((b"\r\n", b"\n")):
        expected = 0
    else:
        found = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
        if found:
            first = min(found)
            expected = first + (2 if raw[first : first + 2] == b"\r\n" else 1)
    assert headers.header_block_end(raw) == expected
