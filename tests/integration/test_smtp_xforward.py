"""Postfix's XFORWARD (XFORWARD_README) against the real gateway process.

Behind ``smtpd_proxy_filter`` or ``content_filter`` the SMTP peer is Postfix;
XFORWARD tells the gateway who the real client was. It rewrites the audit
trail, so it is offered to and accepted only from
``server.xforward_trusted_networks``; everything else gets 550 5.7.0 and the
real peer stays the client.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.smtp import received_field
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess, loopback_overrides
from gateway.testing.sink import SinkServer
from gateway.xforward import Forwarded, XForwardError, parse_xforward

pytestmark = pytest.mark.timeout(60)

MSG = b"From: a@sender.test\r\nTo: bob@example.org\r\nSubject: x\r\n\r\nHello.\r\n"
SPF_DOMAIN = "xfwd.other.test"  # SPF authorizes only the forwarded client 192.0.2.7


@pytest.fixture(scope="module")
def xf_sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


@pytest.fixture
def sink(xf_sink: SinkServer) -> SinkServer:
    xf_sink.clear()
    return xf_sink


@pytest.fixture(scope="module")
def gateway(xf_sink: SinkServer, dns_server: DNSServer) -> Iterator[GatewayProcess]:
    """Default trust (loopback) and SPF on: the forwarded address is what SPF judges."""
    dns_server.set(SPF_DOMAIN, ("TXT", "v=spf1 ip4:192.0.2.7 ip6:2001:db8::7 -all"))
    overrides = loopback_overrides(
        xf_sink,
        dns_server,
        {"server.hostname": "mx.example.org", "policies": {"spf": {}}},
    )
    with GatewayProcess(overrides) as gw:
        yield gw


@pytest.fixture(scope="module")
def picky_gateway(xf_sink: SinkServer, dns_server: DNSServer) -> Iterator[GatewayProcess]:
    """Trusts only 127.0.0.1: a client bound to 127.0.0.2 is an untrusted peer."""
    overrides = loopback_overrides(
        xf_sink, dns_server, {"server.xforward_trusted_networks": ["127.0.0.1/32"]}
    )
    with GatewayProcess(overrides) as gw:
        yield gw


def client(port: int, *, source: str = "127.0.0.1", helo: str = "postfix.test") -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))
    smtp.ehlo(helo)
    return smtp


def send(smtp: smtplib.SMTP, mail_from: str = "a@sender.test") -> tuple[int, bytes]:
    assert smtp.mail(mail_from)[0] == 250
    assert smtp.rcpt("bob@example.org")[0] == 250
    return smtp.data(MSG)


def head(data: bytes) -> str:
    """The header section, unfolded."""
    return re.sub(r"\r\n[ \t]+", " ", data.split(b"\r\n\r\n", 1)[0].decode())


def processed(gw: GatewayProcess, data_reply: bytes) -> dict[str, Any]:
    """The log event of the message our DATA reply ("... queued as QID") names."""
    queue_id = data_reply.split(b"queued as ", 1)[1].split()[0].decode()
    event = gw.wait_for_event("message_processed", match={"queue_id": queue_id})
    assert event is not None, gw.log_lines()[-20:]
    return event


# --- parsing (pure) -----------------------------------------------------------


def test_attributes_are_xtext_decoded_and_case_insensitive() -> None:
    fwd = parse_xforward("name=mail+2Eexample.com Addr=192.0.2.7 HELO=h+2Bx PROTO=ESMTP", None)
    assert fwd == Forwarded(name="mail.example.com", addr="192.0.2.7", proto="ESMTP", helo="h+x")


def test_a_later_xforward_overwrites_only_what_it_names() -> None:
    first = parse_xforward("NAME=a.example ADDR=192.0.2.7 HELO=a.example", None)
    second = parse_xforward("HELO=[UNAVAILABLE] SOURCE=remote PORT=4711", first)
    assert second == Forwarded(
        name="a.example", addr="192.0.2.7", helo=None, source="REMOTE", port=4711
    )


@pytest.mark.parametrize("value", ["[UNAVAILABLE]", "[unavailable]", "[TEMPUNAVAIL]", "unknown"])
def test_unavailable_names_are_none(value: str) -> None:
    assert parse_xforward(f"NAME={value}", None).name is None


def test_ipv6_addr_loses_its_prefix_and_mapped_ipv4_becomes_ipv4() -> None:
    assert parse_xforward("ADDR=IPv6:2001:DB8::7", None).addr == "2001:db8::7"
    assert parse_xforward("ADDR=IPV6:::ffff:192.0.2.9", None).addr == "192.0.2.9"


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "ADDR",
        "ADDR=not-an-ip",
        "FOO=bar",
        "NAME=bad+2",
        "NAME=bad+ZZ",
        "HELO=a+20b",  # decodes to a space
        "HELO=a+0Db",  # decodes to CR
        "PORT=70000",
        "SOURCE=ELSEWHERE",
        "PROTO=E(SMTP)",
        "NAME=" + "a" * 256,
    ],
)
def test_malformed_xforward_is_a_syntax_error(arg: str) -> None:
    with pytest.raises(XForwardError):
        parse_xforward(arg, None)


def test_received_names_the_original_client_and_the_hop_in_a_comment() -> None:
    from datetime import UTC, datetime

    field = received_field(
        helo="client.example",
        client_ip="2001:db8::7",
        client_name="mail.client.example",
        hostname="mx.example.org",
        protocol="ESMTP",
        queue_id="Q1",
        tls=None,
        recipient="bob@example.org",
        when=datetime(2026, 1, 1, tzinfo=UTC),
        via=("postfix.test", "127.0.0.1"),
    )
    assert field.splitlines()[:3] == [
        "Received: from client.example (mail.client.example [IPv6:2001:db8::7])",
        "\t(via XFORWARD from postfix.test [127.0.0.1])",
        "\tby mx.example.org (gateway) with ESMTP",
    ]


# --- on the wire ----------------------------------------------------------------


def test_ehlo_offers_xforward_to_a_trusted_peer(gateway: GatewayProcess) -> None:
    with client(gateway.smtp_port) as smtp:
        assert smtp.has_extn("xforward")
        assert smtp.esmtp_features["xforward"].split() == [
            "NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE",
        ]  # fmt: skip


def test_forwarded_client_reaches_received_log_and_spf(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    """SPF authorizes only 192.0.2.7: pass proves the policy judged the forwarded address."""
    with client(gateway.smtp_port) as smtp:
        reply = smtp.docmd(
            "XFORWARD",
            "NAME=mail.client+2Eexample ADDR=192.0.2.7 PORT=4711 PROTO=ESMTP",
        )
        assert reply == (250, b"2.0.0 Ok")
        assert (
            smtp.docmd("XFORWARD", "HELO=helo.client.example SOURCE=REMOTE IDENT=4F2A1")[0] == 250
        )
        code, data_reply = send(smtp, f"alice@{SPF_DOMAIN}")
    assert code == 250
    (delivered,) = sink.messages
    fields = head(delivered.data)
    assert (
        "Received: from helo.client.example (mail.client.example [192.0.2.7]) "
        "(via XFORWARD from postfix.test [127.0.0.1]) by mx.example.org (gateway) with ESMTP"
    ) in fields
    assert f"spf=pass smtp.mailfrom={SPF_DOMAIN}" in fields
    event = processed(gateway, data_reply)
    assert event["client_ip"] == "192.0.2.7"
    assert event["client_name"] == "mail.client.example"
    assert event["helo"] == "helo.client.example"
    assert event["via"] == "127.0.0.1"
    assert event["upstream_queue_id"] == "4F2A1"


def test_without_xforward_spf_judges_the_real_peer(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    with client(gateway.smtp_port, helo="direct.example") as smtp:
        assert send(smtp, f"alice@{SPF_DOMAIN}")[0] == 250
    fields = head(sink.messages[0].data)
    assert "Received: from direct.example (unknown [127.0.0.1]) by mx.example.org" in fields
    assert f"spf=fail smtp.mailfrom={SPF_DOMAIN}" in fields


def test_ipv6_addr_is_used_as_the_client(gateway: GatewayProcess, sink: SinkServer) -> None:
    with client(gateway.smtp_port) as smtp:
        smtp.docmd("XFORWARD", "ADDR=IPv6:2001:db8::7 NAME=[UNAVAILABLE] HELO=v6.example")
        assert send(smtp, f"alice@{SPF_DOMAIN}")[0] == 250
    fields = head(sink.messages[0].data)
    assert "Received: from v6.example (unknown [IPv6:2001:db8::7])" in fields
    assert f"spf=pass smtp.mailfrom={SPF_DOMAIN}" in fields


def test_attributes_last_one_transaction_and_reset_after_dot_and_rset(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    with client(gateway.smtp_port) as smtp:
        smtp.docmd("XFORWARD", "ADDR=192.0.2.7 HELO=first.example")
        assert send(smtp)[0] == 250
        assert send(smtp)[0] == 250  # no XFORWARD: the real peer again
        smtp.docmd("XFORWARD", "ADDR=192.0.2.8 HELO=dropped.example")
        assert smtp.rset()[0] == 250
        assert send(smtp)[0] == 250
    received = [head(m.data).split("\r\n")[0] for m in sink.messages]
    assert received[0].startswith("Received: from first.example (unknown [192.0.2.7])")
    assert received[1].startswith("Received: from postfix.test (unknown [127.0.0.1])")
    assert received[2].startswith("Received: from postfix.test (unknown [127.0.0.1])")


def test_session_facts_are_not_mixed_into_the_forwarded_client(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    """README note 4: an ADDR alone leaves HELO unknown, not the proxy's EHLO name."""
    with client(gateway.smtp_port) as smtp:
        smtp.docmd("XFORWARD", "ADDR=192.0.2.7")
        assert send(smtp)[0] == 250
    assert head(sink.messages[0].data).startswith("Received: from unknown (unknown [192.0.2.7])")


def test_addr_unavailable_is_a_local_submission_without_client(
    gateway: GatewayProcess, sink: SinkServer
) -> None:
    with client(gateway.smtp_port) as smtp:
        smtp.docmd("XFORWARD", "ADDR=[UNAVAILABLE] NAME=x.example HELO=x.example SOURCE=LOCAL")
        code, data_reply = send(smtp)
        assert code == 250
    assert head(sink.messages[0].data).startswith("Received: from unknown (unknown [unknown])")
    event = processed(gateway, data_reply)
    assert event["client_ip"] is None and event["helo"] == ""


def test_xforward_inside_a_transaction_is_503(gateway: GatewayProcess) -> None:
    with client(gateway.smtp_port) as smtp:
        assert smtp.mail("a@sender.test")[0] == 250
        code, text = smtp.docmd("XFORWARD", "ADDR=192.0.2.7")
        assert (code, text[:5]) == (503, b"5.5.1")


def test_xforward_before_ehlo_is_503(gateway: GatewayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=10) as smtp:
        assert smtp.docmd("XFORWARD", "ADDR=192.0.2.7")[0] == 503


def test_bad_syntax_is_501_and_changes_nothing(gateway: GatewayProcess, sink: SinkServer) -> None:
    with client(gateway.smtp_port) as smtp:
        smtp.docmd("XFORWARD", "ADDR=192.0.2.7 HELO=kept.example")
        code, text = smtp.docmd("XFORWARD", "ADDR=192.0.2.9 NAME=bad+2")
        assert (code, text[:5]) == (501, b"5.5.4")
        assert send(smtp)[0] == 250
    assert head(sink.messages[0].data).startswith(
        "Received: from kept.example (unknown [192.0.2.7])"
    )


def test_untrusted_peer_gets_550_and_stays_the_client(
    picky_gateway: GatewayProcess, sink: SinkServer
) -> None:
    """127.0.0.2 is outside ["127.0.0.1/32"]: no XFORWARD in EHLO, 550 5.7.0, ignored."""
    with client(picky_gateway.smtp_port, source="127.0.0.2", helo="sneaky.example") as smtp:
        assert not smtp.has_extn("xforward")
        code, text = smtp.docmd("XFORWARD", "ADDR=192.0.2.7 HELO=forged.example")
        assert (code, text[:5]) == (550, b"5.7.0")
        assert send(smtp)[0] == 250
    assert head(sink.messages[0].data).startswith(
        "Received: from sneaky.example (unknown [127.0.0.2])"
    )
    assert any('"xforward_refused"' in line for line in picky_gateway.log_lines())


def test_trusted_network_list_is_matched_per_address(picky_gateway: GatewayProcess) -> None:
    with client(picky_gateway.smtp_port, source="127.0.0.1") as smtp:
        assert smtp.has_extn("xforward")
        assert smtp.docmd("XFORWARD", "ADDR=192.0.2.7")[0] == 250


def test_bad_network_in_config_is_refused() -> None:
    from gateway.config import OptionError, ServerConfig

    with pytest.raises(OptionError, match=r"xforward_trusted_networks\[0\]"):
        ServerConfig(accepted_domains=("example.org",), xforward_trusted_networks=("nope",))
