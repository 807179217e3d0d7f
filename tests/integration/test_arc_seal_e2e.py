"""ARC sealing end to end: real SMTP in, the real gateway, real SMTP out, real DNS.

The delivered message's ARC chain is verified with dkimpy against the keys the
test DNS server serves (docs/arc.md).
"""

from __future__ import annotations

import smtplib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import dns.resolver
import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.milterclient import MilterClient, apply_edits
from gateway.testing.sink import SinkServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policies"))
from auth_helpers import arc_seal, key_records, message, rsa_key, sign

HOSTNAME = "mx.example.org"
ZONE: dict[str, list[tuple[str, str]]] = {
    "example.com": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=none")],
    **key_records(
        ("example.com", "s1", rsa_key()),
        ("list.example", "arc", rsa_key()),
        ("example.org", "seal", rsa_key()),
    ),
}


@pytest.fixture(scope="module")
def arc_dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE, zones=["example.com", "example", "example.org"]) as server:
        yield server


def _dnsfunc(server: DNSServer) -> Callable[..., bytes | None]:
    """dkimpy's key lookup over real DNS queries to the test server."""
    resolver = dns.resolver.Resolver(configure=False)
    host, _, port = server.address.rpartition(":")
    resolver.nameservers = [host.strip("[]")]
    resolver.port = int(port)

    def lookup(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


@pytest.fixture(scope="module")
def sealing_gateway(
    arc_dns: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, SinkServer]]:
    key = tmp_path_factory.mktemp("arc") / "seal.key"
    key.write_bytes(rsa_key().private)
    with SinkServer() as sink:
        overrides = {
            "server.hostname": HOSTNAME,
            "relay.host": sink.host,
            "relay.port": sink.port,
            "dns.nameservers": [arc_dns.address],
            "dns.timeout": 2.0,
            "policies": {"spf": {}, "dkim": {}, "dmarc": {}},
            "scores": {},
            "arc_seal.enabled": True,
            "arc_seal.domain": "example.org",
            "arc_seal.selector": "seal",
            "arc_seal.private_key": str(key),
            "milter.listen": "127.0.0.1:0",
        }
        with GatewayProcess(overrides) as gw:
            yield gw, sink


def _send(gw: GatewayProcess, raw: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=15) as client:
        client.ehlo("mail.example.com")
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        code, _ = client.data(raw)
        return code


def test_relayed_mail_is_sealed_and_its_chain_verifies_over_dns(
    sealing_gateway: tuple[GatewayProcess, SinkServer], arc_dns: DNSServer
) -> None:
    gw, sink = sealing_gateway
    sink.clear()
    raw = sign(message(), "example.com", "s1")
    assert _send(gw, raw) == 250
    (got,) = sink.wait_for(1)
    assert got.data.startswith(b"ARC-Seal: i=1;")  # above our Received and other fields
    assert got.data.endswith(raw)  # byte-exact below our fields
    lookup = _dnsfunc(arc_dns)
    cv, results, reason = dkim.arc_verify(got.data, dnsfunc=lookup)
    assert cv == dkim.CV_Pass, reason
    assert results[0]["as-domain"] == b"example.org"
    assert dkim.verify(got.data, dnsfunc=lookup)  # the sender's DKIM still verifies
    assert gw.metric("gateway_arc_sealed_total", result="sealed", cv="none") == 1


def test_next_hop_of_a_list_chain_is_sealed_i2_cv_pass(
    sealing_gateway: tuple[GatewayProcess, SinkServer], arc_dns: DNSServer
) -> None:
    gw, sink = sealing_gateway
    sink.clear()
    raw = arc_seal(message(), "list.example", "list.example", "spf=pass smtp.mailfrom=example.com")
    assert _send(gw, raw) == 250
    (got,) = sink.wait_for(1)
    cv, results, reason = dkim.arc_verify(got.data, dnsfunc=_dnsfunc(arc_dns))
    assert cv == dkim.CV_Pass, reason
    assert [r["instance"] for r in results] == [2, 1]
    assert b"cv=pass" in got.data.split(b"\r\n\r\n", 1)[0]


def test_milter_inserts_the_arc_set_at_the_top_and_it_verifies(
    sealing_gateway: tuple[GatewayProcess, SinkServer], arc_dns: DNSServer
) -> None:
    gw, _ = sealing_gateway
    assert gw.milter_port
    raw = sign(message(), "example.com", "s1")
    with MilterClient(("127.0.0.1", gw.milter_port), timeout=15) as mta:
        mta.negotiate()
        mta.connect("mail.example.com", "127.0.0.1")
        mta.helo("mail.example.com")
        mta.mail("<alice@example.com>")
        mta.rcpt("<bob@example.org>")
        reply = mta.content(raw)
    inserts = [e for e in reply.edits if e.kind == "insert"]
    assert [e.index for e in inserts[:3]] == [0, 0, 0]
    delivered = apply_edits(raw, reply.edits, leading_space=bool(mta.protocol & 0x100000))
    assert delivered.startswith(b"ARC-Seal: i=1;")
    cv, _, why = dkim.arc_verify(delivered, dnsfunc=_dnsfunc(arc_dns))
    assert cv == dkim.CV_Pass, why
    assert dkim.verify(delivered, dnsfunc=_dnsfunc(arc_dns))
