"""SPF, DKIM, DMARC and ARC end to end through the real gateway (``python -m gateway run``).

Real DNS (the test server over UDP/TCP), client addresses set through the
PROXY protocol from loopback, messages signed and ARC-sealed with dkimpy.
Judged from what a mail admin sees: the relayed ``Authentication-Results``,
the SMTP reply, the quarantine and the metrics.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import authres
import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policies"))
from auth_helpers import arc_seal, ed25519_key, key_records, message, rsa_key, sign

HOSTNAME = "mx.example.org"

ZONE: dict[str, list[tuple[str, str]]] = {
    "example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8:1::/48 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    "mail.example.com": [("TXT", "v=spf1 a -all"), ("A", "192.0.2.10")],
    "quar.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.quar.example": [("TXT", "v=DMARC1; p=quarantine")],
    "list.example": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    "_dmarc.list.example": [("TXT", "v=DMARC1; p=none")],
    "evil.example": [("TXT", "v=spf1 +all")],
    "sf.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    **key_records(
        ("example.com", "s1", rsa_key()),
        ("example.com", "ed", ed25519_key()),
        ("example.com", "weak", rsa_key(512)),
        ("list.example", "arc", rsa_key()),
    ),
}


class ProxySMTP(smtplib.SMTP):
    """smtplib that opens with a PROXY v1 header, as HAProxy in front of the gateway would."""

    def __init__(self, client_ip: str, port: int) -> None:
        family = "TCP6" if ":" in client_ip else "TCP4"
        dst = "::1" if family == "TCP6" else "127.0.0.1"
        self._proxy = f"PROXY {family} {client_ip} {dst} 40000 25\r\n".encode()
        super().__init__("127.0.0.1", port, timeout=15)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self._proxy)
        return sock  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def auth_dns() -> Iterator[DNSServer]:
    with DNSServer(
        ZONE, zones=["example.com", "example", "example.org"], servfail=["_dmarc.sf.example"]
    ) as server:
        yield server


@pytest.fixture(scope="module")
def auth_sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(auth_dns: DNSServer, auth_sink: SinkServer) -> Iterator[GatewayProcess]:
    overrides = {
        "server.hostname": HOSTNAME,
        "server.proxy_protocol": True,
        "relay.host": auth_sink.host,
        "relay.port": auth_sink.port,
        "dns.nameservers": [auth_dns.address],
        "dns.timeout": 2.0,
        "policies": {
            "spf": {},
            "dkim": {},
            "dmarc": {"trusted_arc_sealers": ["list.example"]},
        },
        "scores": {},
    }
    with GatewayProcess(overrides) as gw:
        yield gw


@pytest.fixture
def sink(auth_sink: SinkServer) -> SinkServer:
    auth_sink.clear()
    return auth_sink


def send(
    gw: GatewayProcess, raw: bytes, *, ip: str, mail_from: str, helo: str = "mail.example.com"
) -> tuple[int, str]:
    """One SMTP transaction; the reply to DATA."""
    with ProxySMTP(ip, gw.smtp_port) as client:
        client.ehlo(helo)
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt("bob@example.org")[0] == 250
        code, text = client.data(raw)
        return code, text.decode()


def auth_results(data: bytes) -> dict[str, list[authres.core.AuthenticationResult]]:
    """Our Authentication-Results field of a relayed message, by method."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    fields = [
        line
        for line in unfolded.split("\r\n")
        if line.lower().startswith(f"authentication-results: {HOSTNAME};")
    ]
    assert len(fields) == 1, fields
    header = authres.all_features().parse(fields[0])
    assert header.authserv_id == HOSTNAME
    out: dict[str, list[authres.core.AuthenticationResult]] = {}
    for r in header.results:
        out.setdefault(r.method, []).append(r)
    return out


def props(result: authres.core.AuthenticationResult) -> dict[str, str]:
    return {f"{p.type}.{p.name}": str(p.value) for p in result.properties}


def test_signed_message_from_authorized_ipv4_passes_everything(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    raw = sign(message(), "example.com", "s1")
    code, _ = send(gateway, raw, ip="192.0.2.10", mail_from="alice@example.com")
    assert code == 250
    (got,) = sink.wait_for(1)
    assert got.data.endswith(raw)  # byte-exact: only header fields prepended
    ar = auth_results(got.data)
    assert [r.result for r in ar["spf"]] == ["pass", "pass"]
    assert props(ar["spf"][0]) == {"smtp.mailfrom": "example.com"}
    assert props(ar["spf"][1]) == {"smtp.helo": "mail.example.com"}
    (dk,) = ar["dkim"]
    assert dk.result == "pass"
    assert {"header.d": "example.com", "header.s": "s1", "header.a": "rsa-sha256"}.items() <= props(
        dk
    ).items()
    (dm,) = ar["dmarc"]
    assert dm.result == "pass"
    assert props(dm) == {"header.from": "example.com", "policy.dmarc": "reject"}
    assert [r.result for r in ar["arc"]] == ["none"]


def test_spoofed_from_is_rejected_naming_the_domains_policy(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    """SPF passes for the attacker's own domain, which does not align: p=reject -> 550 5.7.1."""
    raw = message(from_="CEO <ceo@example.com>", subject="urgent wire transfer")
    code, text = send(
        gateway, raw, ip="203.0.113.66", mail_from="x@evil.example", helo="evil.example"
    )
    assert code == 550
    assert text.startswith("5.7.1 Message rejected: DMARC policy of example.com is reject")
    assert sink.messages == []


def test_ipv6_client_spf_aligned_passes_without_dkim(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    code, _ = send(gateway, message(), ip="2001:db8:1::25", mail_from="alice@example.com")
    assert code == 250
    (got,) = sink.wait_for(1)
    ar = auth_results(got.data)
    assert ar["spf"][0].result == "pass"
    assert [r.result for r in ar["dkim"]] == ["none"]
    assert ar["dmarc"][0].result == "pass"


def test_ed25519_and_weak_rsa_signatures_each_reported(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    """Two signatures, two dkim results: Ed25519 passes, the 512-bit RSA one fails."""
    raw = sign(
        sign(message(), "example.com", "ed", ed25519_key()), "example.com", "weak", rsa_key(512)
    )
    code, _ = send(gateway, raw, ip="203.0.113.7", mail_from="alice@example.com")
    assert code == 250  # SPF fails but the Ed25519 signature is aligned: DMARC passes
    (got,) = sink.wait_for(1)
    ar = auth_results(got.data)
    assert sorted((r.result, props(r)["header.s"], props(r)["header.a"]) for r in ar["dkim"]) == [
        ("fail", "weak", "rsa-sha256"),
        ("pass", "ed", "ed25519-sha256"),
    ]
    assert ar["spf"][0].result == "fail"
    assert ar["dmarc"][0].result == "pass"
    head = re.sub(rb"\r\n[ \t]+", b" ", got.data.split(b"\r\n\r\n", 1)[0])
    status = head.split(b"X-Spam-Status:", 1)[1].split(b"\r\n", 1)[0]
    assert b"DKIM_KEY_TOO_SMALL" in status


def test_quarantine_policy_stores_the_message(gateway: GatewayProcess, sink: SinkServer) -> None:
    code, _ = send(
        gateway,
        message(from_="x@quar.example", subject="q-test"),
        ip="203.0.113.8",
        mail_from="x@quar.example",
    )
    assert code == 250  # accepted: durably in quarantine, not relayed
    assert sink.messages == []
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "quarantine",
            "list",
            "--json",
            "--config",
            str(gateway.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    items = [i for i in json.loads(out.stdout) if i["mail_from"] == "x@quar.example"]
    assert len(items) == 1
    assert any("DMARC_POLICY_QUARANTINE" in r for r in items[0]["reasons"])


def test_trusted_arc_sealer_saves_mailing_list_traffic(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    """The list rewrote the subject (DKIM breaks) and re-sent from its own domain: DMARC
    fails, but list.example is a trusted sealer that recorded dmarc=pass."""
    original = sign(message(subject="hello"), "example.com", "s1")
    modified = original.replace(b"Subject: hello", b"Subject: [list] hello")
    sealed = arc_seal(
        modified,
        "list.example",
        "list.example",
        "dkim=pass header.d=example.com; dmarc=pass header.from=example.com",
    )
    code, _ = send(
        gateway,
        sealed,
        ip="198.51.100.20",
        mail_from="bounces@list.example",
        helo="mail.list.example",
    )
    assert code == 250
    (got,) = sink.wait_for(1)
    ar = auth_results(got.data)
    assert [r.result for r in ar["arc"]] == ["pass"]
    assert [r.result for r in ar["dmarc"]] == ["fail"]
    assert [r.result for r in ar["dkim"]] == ["fail"]
    assert b"DMARC_ARC_OVERRIDE" in got.data.split(b"\r\n\r\n", 1)[0]


def test_arc_sealed_by_untrusted_sealer_is_rejected(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    raw = message(from_="ceo@example.com")
    sealed = arc_seal(raw, "list.example", "list.example", "dmarc=fail header.from=example.com")
    code, text = send(gateway, sealed, ip="198.51.100.20", mail_from="bounces@list.example")
    assert code == 550 and "DMARC policy of example.com" in text
    assert sink.messages == []


def test_dmarc_servfail_defers_the_message(gateway: GatewayProcess, sink: SinkServer) -> None:
    """A DMARC policy lookup that SERVFAILs is retried later (451), never delivered unjudged."""
    code, text = send(
        gateway, message(from_="a@sf.example"), ip="203.0.113.9", mail_from="a@sf.example"
    )
    assert code == 451
    assert text.startswith("4.7.1 ") and "sf.example" in text
    assert sink.messages == []


def test_auth_results_are_counted_in_metrics(gateway: GatewayProcess, sink: SinkServer) -> None:
    send(
        gateway,
        sign(message(), "example.com", "s1"),
        ip="192.0.2.10",
        mail_from="alice@example.com",
    )
    sink.wait_for(1)
    assert gateway.metrics_port
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert re.search(r'gateway_auth_results_total\{method="dmarc",result="pass"\} [1-9]', body)
    assert re.search(r'gateway_auth_results_total\{method="dkim",result="pass"\} [1-9]', body)
