"""Observe (shadow) mode end to end over SMTP: mail is relayed with what would have
happened in ``X-Spam-Action-Observed``, counted in ``gateway_observed_actions_total``,
and hard protections (GTUBE, accepted_domains, size limits) still act.

The acting test policy is ``gwtest_verdict`` from ``policy_plugin`` (an installed
third-party distribution), which does what the message's ``X-Test-Verdict`` asks.
"""

from __future__ import annotations

import smtplib
import urllib.request
from pathlib import Path

import pytest

from gateway.testing.sink import SinkServer
from tests.integration.conftest import GatewayFactory

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(verdict: str = "", body: str = "Lunch on Friday?") -> bytes:
    asked = f"X-Test-Verdict: {verdict}\r\n" if verdict else ""
    return (
        "From: Alice <alice@sender.test>\r\n"
        "To: bob@example.org\r\n"
        "Subject: hello\r\n"
        f"{asked}"
        "Message-ID: <observe@sender.test>\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def send(port: int, data: bytes, rcpt: str = "bob@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.sendmail("alice@sender.test", [rcpt], data)


def head(data: bytes) -> dict[str, str]:
    block = data.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ").replace("\r\n ", " ")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in block.split("\r\n"))}


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1 : line.index("}")]
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not exported")


def test_global_observe_relays_what_would_have_been_rejected_and_counts_it(
    make_gateway: GatewayFactory, sink: SinkServer, policy_plugin: Path
) -> None:
    gw = make_gateway(
        sink,
        {"actions.mode": "observe", "policies": {"gwtest_verdict": {}}},
        extra_pythonpath=[policy_plugin],
    )
    for verdict in ("reject", "quarantine", "tempfail", "spam", ""):
        send(gw.smtp_port, message(verdict))
    assert len(sink.messages) == 5
    observed = [head(m.data).get("X-Spam-Action-Observed") for m in sink.messages]
    assert observed == ["reject", "quarantine", "tempfail", "add_header", "relay"]
    spam = head(sink.messages[3].data)
    # The observed policy's score is shown, but nothing flags the message as spam.
    assert spam["X-Spam-Status"].startswith("No, score=6.00")
    assert "X-Spam-Flag" not in spam
    assert "GWTEST_SPAM=6.00" in spam["X-Spam-Symbols"]
    port = gw.metrics_port
    assert metric(port, "gateway_messages_total", action="relay", frontend="smtp") == 5
    assert metric(port, "gateway_messages_total", action="reject", frontend="smtp") == 0
    for action, n in (("reject", 1), ("quarantine", 1), ("tempfail", 1), ("add_header", 1)):
        assert metric(port, "gateway_observed_actions_total", action=action, policy="all") == n
    assert metric(port, "gateway_observed_actions_total", action="relay", policy="all") == 1


def test_global_observe_never_observes_away_the_hard_protections(
    make_gateway: GatewayFactory, sink: SinkServer, policy_plugin: Path
) -> None:
    gw = make_gateway(
        sink,
        {
            "actions.mode": "observe",
            "server.max_message_size": 20_000,
            "policies": {"gwtest_verdict": {}, "rules": {}},
        },
        extra_pythonpath=[policy_plugin],
    )
    with pytest.raises(smtplib.SMTPDataError) as err:
        send(gw.smtp_port, message(body=f"test\r\n{GTUBE}"))
    assert err.value.smtp_code == 550
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(gw.smtp_port, message(), rcpt="someone@not-ours.test")
    with pytest.raises((smtplib.SMTPDataError, smtplib.SMTPSenderRefused)) as big:
        send(gw.smtp_port, message(body="x" * 30_000))
    assert big.value.smtp_code == 552
    assert sink.messages == []
    assert metric(gw.metrics_port, "gateway_messages_total", action="reject", frontend="smtp") == 1


def test_one_observed_policy_is_relayed_while_the_others_act(
    make_gateway: GatewayFactory, sink: SinkServer, policy_plugin: Path
) -> None:
    gw = make_gateway(
        sink,
        {"policies": {"gwtest_verdict": {"observe": True}, "rules": {}}},
        extra_pythonpath=[policy_plugin],
    )
    send(gw.smtp_port, message("reject"))
    send(gw.smtp_port, message())
    with pytest.raises(smtplib.SMTPDataError) as err:  # rules is enforced: GTUBE rejects
        send(gw.smtp_port, message(body=f"test\r\n{GTUBE}"))
    assert err.value.smtp_code == 550
    assert [head(m.data).get("X-Spam-Action-Observed") for m in sink.messages] == [
        "reject",
        "relay",
    ]
    port = gw.metrics_port
    count = metric(port, "gateway_observed_actions_total", action="reject", policy="gwtest_verdict")
    assert count == 2  # the test message asking for it, and GTUBE (rejected anyway)
    assert (
        metric(port, "gateway_observed_actions_total", action="relay", policy="gwtest_verdict") == 1
    )
    assert metric(port, "gateway_messages_total", action="reject", frontend="smtp") == 1
