"""Spam policies end to end through the real gateway (``python -m gateway run``) with the
shipped default config: GTUBE is rejected, ordinary mail is relayed with its score, and
operator rule files are re-read on SIGHUP.
"""

from __future__ import annotations

import ipaddress
import signal
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer
from policies.dnsbl import ip_query_name

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body: str, subject: str = "hello") -> bytes:
    return (
        "From: Alice <alice@sender.test>\r\n"
        "To: bob@example.org\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 20 Aug 2002 10:00:00 +0000\r\n"
        "Message-ID: <e2e@sender.test>\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def overrides(sink: SinkServer, dns: DNSServer, **extra: Any) -> dict[str, Any]:
    """The shipped config.example.toml (all its policies), relayed to the sink, test DNS."""
    return {
        "relay.host": sink.host,
        "relay.port": sink.port,
        "dns.nameservers": [dns.address],
        "dns.timeout": 2.0,
        **extra,
    }


def send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.sendmail("alice@sender.test", ["bob@example.org"], data)


def spam_status(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
    return next(line for line in unfolded.split("\r\n") if line.startswith("X-Spam-Status:"))


def test_gtube_is_rejected_with_the_default_config_and_ordinary_mail_relayed(
    sink: SinkServer, dns_server: DNSServer
) -> None:
    with GatewayProcess(overrides(sink, dns_server)) as gw:
        with pytest.raises(smtplib.SMTPDataError) as err:
            send(gw.smtp_port, message(f"test\r\n{GTUBE}"))
        assert err.value.smtp_code == 550
        assert b"GTUBE" in err.value.smtp_error
        assert sink.messages == []

        send(gw.smtp_port, message("Lunch on Friday? Alice"))
        assert len(sink.messages) == 1
        status = spam_status(sink.messages[0].data)
        assert status.startswith("X-Spam-Status: No, score=")
        assert "GTUBE" not in status


GERMAN = (
    "Sehr geehrte Damen und Herren, wir freuen uns, Ihnen heute unser neues Angebot\r\n"
    "vorstellen zu duerfen. Bitte lesen Sie die beigefuegten Unterlagen sorgfaeltig\r\n"
    "durch und melden Sie sich bei Fragen jederzeit gerne bei unserem Kundendienst."
)


def test_text_outside_ok_languages_is_scored_and_explained(
    sink: SinkServer, dns_server: DNSServer
) -> None:
    """config.example.toml says ok_languages = ["en"]: German text is scored (and relayed:
    one symbol never flags alone), in X-Spam-Status and in the log line."""
    with GatewayProcess(overrides(sink, dns_server)) as gw:
        send(gw.smtp_port, message(GERMAN, subject="Angebot"))
        event = gw.wait_for_event("message_processed")
    assert len(sink.messages) == 1
    assert "BODY_UNWANTED_LANGUAGE" in spam_status(sink.messages[0].data)
    assert event is not None and event["symbols"]["BODY_UNWANTED_LANGUAGE"] == 2.8


def test_operator_rule_files_are_reloaded_on_sighup(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer
) -> None:
    rule = (
        'name = "{name}"\ntype = "body"\npattern = "(?i)watches"\nscore = 0.5\ndescription = "x"\n'
    )
    (tmp_path / "local.toml").write_text("[[rule]]\n" + rule.format(name="LOCAL_FIRST"))
    extra = {"policies.rules.files": ["local.toml"]}  # relative to the config's directory
    with GatewayProcess(overrides(sink, dns_server, **extra), workdir=tmp_path) as gw:
        send(gw.smtp_port, message("Cheap watches here", subject="watches"))
        assert "LOCAL_FIRST" in spam_status(sink.messages[-1].data)

        (gw.workdir / "local.toml").write_text("[[rule]]\n" + rule.format(name="LOCAL_SECOND"))
        gw.signal(signal.SIGHUP)
        assert gw.wait_for_event("config_reloaded", timeout=15) is not None
        send(gw.smtp_port, message("Cheap watches here", subject="watches"))
        status = spam_status(sink.messages[-1].data)
        assert "LOCAL_SECOND" in status
        assert "LOCAL_FIRST" not in status

        # A broken rule file is refused; the running rules stay in force.
        (gw.workdir / "local.toml").write_text('[[rule]]\nname = "BROKEN"\ntype = "body"\n')
        gw.signal(signal.SIGHUP)
        event = gw.wait_for_event("config_reload_invalid", timeout=15)
        assert event is not None
        send(gw.smtp_port, message("Cheap watches here", subject="watches"))
        assert "LOCAL_SECOND" in spam_status(sink.messages[-1].data)


class ProxySMTP(smtplib.SMTP):
    """smtplib opening with a PROXY v1 header, so the gateway sees ``client_ip``."""

    def __init__(self, client_ip: str, port: int) -> None:
        self._proxy = f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n".encode()
        super().__init__("127.0.0.1", port, timeout=15)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self._proxy)
        return sock  # type: ignore[no-any-return]


def test_blocklisted_client_and_url_domain_are_scored_from_real_dns(sink: SinkServer) -> None:
    """Spamhaus ZEN and DBL answers served by the test DNS server over UDP, through the
    default [policies.dnsbl] zones; the 127.255.255.x answer is not counted as a listing."""
    records = {
        ip_query_name(ipaddress.ip_address("45.33.113.9"), "zen.spamhaus.org"): [
            ("A", "127.0.0.2")
        ],
        ip_query_name(ipaddress.ip_address("45.33.113.10"), "zen.spamhaus.org"): [
            ("A", "127.255.255.254")
        ],
        "bad-shop.com.dbl.spamhaus.org": [("A", "127.0.1.2")],
    }
    body = "Visit http://www.bad-shop.com/deal today"
    zones = ["zen.spamhaus.org", "dbl.spamhaus.org", "sender.test", "example.org"]
    with (
        DNSServer(records, zones=zones) as dns,
        GatewayProcess(overrides(sink, dns, **{"server.proxy_protocol": True})) as gw,
    ):
        for ip in ("45.33.113.9", "45.33.113.10"):
            with ProxySMTP(ip, gw.smtp_port) as client:
                client.sendmail("alice@sender.test", ["bob@example.org"], message(body))
        listed, blocked = (spam_status(m.data) for m in sink.messages)
    assert "RBL_SPAMHAUS_SBL" in listed and "DBL_SPAM" in listed
    assert "DNSBL_BLOCKED_RESOLVER" in blocked and "RBL_SPAMHAUS" not in blocked
