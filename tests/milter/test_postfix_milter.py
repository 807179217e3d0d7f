"""Postfix with ``smtpd_milters`` pointing at the gateway (``gateway run``, milter only).

The Postfix config is ``deploy/postfix/milter/`` with its ports swapped for free
ones. Skips (fails under CI=true) without Postfix or root. A second stack,
``observe_stack``, runs in observe mode (docs/observe.md): global, or with
``[policies.rules] observe = true`` after a SIGHUP reload.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import dkim
import pytest
from test_session import auth_helpers  # the DKIM test keys of tests/policies

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.postfix import PostfixInstance, free_port, snippet
from gateway.testing.require import require_root, require_tool

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(
    subject: str, body: bytes, sender: str = "alice@sender.test", extra: bytes = b""
) -> bytes:
    return (
        b"From: Alice <" + sender.encode() + b">\r\nTo: bob@example.org\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <"
        + subject.replace(" ", "-").encode()
        + b"@sender.test>\r\n"
        + extra
        + b"\r\n"
        + body
    )


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(zones=("example.org", "sender.test", "other.test")) as server:
        yield server


@dataclass
class Stack:
    postfix: PostfixInstance
    gateway: GatewayProcess
    port: int


RULES = (
    '[[rule]]\nname = "TEST_QUARANTINE_ME"\ntype = "body"\npattern = "QUARANTINE-ME"\n'
    'score = 12.0\ndescription = "test marker: scores into the quarantine band"\n'
    '[[rule]]\nname = "TEST_REJECT_ME"\ntype = "body"\npattern = "REJECT-ME"\n'
    'score = 20.0\ndescription = "test marker: scores into the reject band"\n'
)


@contextlib.contextmanager
def running_stack(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory, extra: Mapping[str, Any]
) -> Iterator[Stack]:
    """Postfix with the gateway as its milter; ``extra`` overrides on top of the defaults."""
    require_tool("postfix", "apt-get install postfix")
    require_root("starting a Postfix master needs root (it drops to the postfix user)")
    rules = tmp_path_factory.mktemp("rules") / "test-rules.toml"
    rules.write_text(RULES)
    back, public = free_port(), free_port()
    overrides = {
        "server.listen": "",  # a milter-only node
        "milter.listen": "127.0.0.1:0",
        "relay.port": back,  # quarantine release: Postfix's smtpd without the milter
        "relay.verify_recipients": False,
        "dns.nameservers": [dns_server.address],
        "policies.rules": {"files": [str(rules)]},
        **extra,
    }
    with GatewayProcess(overrides) as gw:
        ports = {"public": public, "gateway": 0, "back": back}
        main_cf = snippet("milter", "main.cf", **ports).replace(
            "127.0.0.1:11332", f"127.0.0.1:{gw.milter_port}"
        )
        with PostfixInstance(
            main_cf=main_cf
            + "\nsmtpd_authorized_xclient_hosts = 127.0.0.0/8\ndefault_process_limit = 120\n",
            master_cf=f"127.0.0.1:{public} inet n - n - - smtpd\n"
            + snippet("milter", "master.cf", **ports),
        ) as postfix:
            yield Stack(postfix, gw, public)


@pytest.fixture(scope="module")
def stack(dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(dns_server, tmp_path_factory, {}) as running:
        yield running


@pytest.fixture(scope="module")
def observe_stack(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The one extra stack: global observe mode; ``observing`` switches it by SIGHUP."""
    with running_stack(dns_server, tmp_path_factory, {"actions.mode": "observe"}) as running:
        yield running


def send(stack: Stack, raw: bytes, sender: str = "alice@sender.test", xclient: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", stack.port, timeout=60) as client:
        client.ehlo("client.sender.test")
        if xclient:
            code, text = client.docmd("XCLIENT", xclient)
            assert code == 220, text
            client.ehlo("client.sender.test")
        client.sendmail(sender, ["bob@example.org"], raw)


def refused(
    stack: Stack, raw: bytes, sender: str = "alice@sender.test", xclient: str = ""
) -> tuple[int, str]:
    with pytest.raises(smtplib.SMTPDataError) as exc:
        send(stack, raw, sender, xclient)
    return exc.value.smtp_code, exc.value.smtp_error.decode()


def delivered(stack: Stack, marker: bytes, timeout: float = 20.0) -> bytes:
    """The delivered message containing ``marker``; fails with Postfix's log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = [m for m in stack.postfix.mailbox() if marker in m]
        if hits:
            return hits[-1]
        time.sleep(0.05)
    raise AssertionError(f"no delivered message with {marker!r}:\n{stack.postfix.log()}")


def refused_spoofed(
    stack: Stack, dns_server: DNSServer, domain: str, subject: str
) -> tuple[str, tuple[int, str]]:
    """(sender, reply) for mail from ``domain`` (SPF -all, DMARC p=reject) sent by
    192.0.2.10, which its SPF record does not allow; XCLIENT makes Postfix (and so
    the milter macros) see that address."""
    dns_server.set(domain, ("TXT", "v=spf1 ip4:198.51.100.1 -all"))
    dns_server.set(f"_dmarc.{domain}", ("TXT", "v=DMARC1; p=reject"))
    sender = f"alice@{domain}"
    raw = message(subject, b"Pay now.\r\n", sender=sender)
    xclient = f"ADDR=192.0.2.10 NAME=[UNAVAILABLE] HELO=mail.{domain}"
    return sender, refused(stack, raw, sender, xclient=xclient)


def test_clean_mail_is_delivered_by_postfix_with_the_gateways_headers(stack: Stack) -> None:
    forged = b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=sender.test\r\n"
    send(stack, message("clean", b"Hi Bob. CLEAN-1\r\n", extra=forged))
    stored = delivered(stack, b"CLEAN-1")
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert msg["X-Spam-Status"].startswith("No, score=")
    results = msg.get_all("Authentication-Results")
    assert len(results) == 1 and "spf=pass" not in results[0]  # the forged one is gone
    # Our fields are on top, above Postfix's own Received:.
    assert stored.index(b"Authentication-Results:") < stored.index(b"Received:")
    event = stack.gateway.wait_for_event("message_processed", match={"frontend": "milter"})
    assert event is not None and event["upstream_queue_id"]  # Postfix's queue id (i macro)
    assert stack.gateway.metric(
        "gateway_messages_total", action="relay", frontend="milter"
    ) or stack.gateway.metric("gateway_messages_total", action="add_header", frontend="milter")


def test_gtube_is_refused_by_postfix_with_the_gateways_550(stack: Stack) -> None:
    code, text = refused(stack, message("gtube", GTUBE + b"\r\n"))
    assert code == 550 and text.startswith("5.7.1 Message rejected:") and "GTUBE" in text, text


def test_dmarc_reject_from_a_non_loopback_client_set_by_xclient(
    stack: Stack, dns_server: DNSServer
) -> None:
    """XCLIENT makes Postfix (and so the milter macros) see 192.0.2.10: SPF fails for it."""
    sender, (code, text) = refused_spoofed(stack, dns_server, "milter-dmarc.other.test", "dmarc")
    assert code == 550, text
    event = stack.gateway.wait_for_event("message_processed", match={"mail_from": sender})
    assert event is not None and event["client_ip"] == "192.0.2.10", event


@pytest.mark.parametrize("canon", [(b"relaxed", b"simple")])
def test_dkim_signed_folded_mail_still_verifies_in_the_delivered_copy(
    stack: Stack, dns_server: DNSServer, canon: tuple[bytes, bytes]
) -> None:
    key = auth_helpers().rsa_key()
    dns_server.set("s1._domainkey.sender.test", ("TXT", key.record))
    raw = (
        b"From: Alice <alice@sender.test>\r\nTo: bob@example.org\r\n"
        b"Subject: a subject folded\r\n\tover two lines\r\n"
        b"Message-ID: <dkim-milter@sender.test>\r\n\r\nSigned body DKIM-1.\r\n"
    )
    signed = (
        dkim.sign(
            raw,
            b"s1",
            b"sender.test",
            key.private,
            canonicalize=canon,
            include_headers=[b"from", b"to", b"subject", b"message-id"],
        )
        + raw
    )
    send(stack, signed)
    stored = delivered(stack, b"DKIM-1").replace(b"\n", b"\r\n")
    record = key.record.encode()
    assert dkim.verify(stored, dnsfunc=lambda name, timeout=5: record)
    assert b"dkim=pass" in stored


def test_quarantined_mail_is_held_and_released_through_the_relay_port(stack: Stack) -> None:
    send(stack, message("quarantine", b"QUARANTINE-ME QUAR-1\r\n"))  # 250: held, Postfix discards
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "quarantine", "list", "--json", "--config",
         str(stack.gateway.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert not [m for m in stack.postfix.mailbox() if b"QUAR-1" in m]
    released = subprocess.run(
        [sys.executable, "-m", "gateway", "quarantine", "release", entry["id"], "--config",
         str(stack.gateway.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert released.returncode == 0, released.stderr
    stored = delivered(stack, b"QUAR-1")
    assert b"X-Spam-Status: Yes" in stored


def test_one_hundred_concurrent_postfix_sessions(stack: Stack) -> None:
    count = 100
    before = len(stack.postfix.mailbox())
    with ThreadPoolExecutor(count) as pool:
        list(
            pool.map(
                lambda i: send(stack, message(f"burst {i}", f"BURST-{i:03d}\r\n".encode())),
                range(count),
            )
        )
    stack.postfix.wait_for_mail(before + count, timeout=60)
    box = b"".join(stack.postfix.mailbox())
    assert all(f"BURST-{i:03d}".encode() in box for i in range(count))


# -- observe mode through the milter (docs/observe.md) --------------------------


def observing(stack: Stack, mode: Literal["global", "rules"]) -> None:
    """Put the observe stack in ``global`` observe mode or observe ``rules`` only (SIGHUP)."""
    gw = stack.gateway
    rules = {**gw.overrides["policies.rules"], "observe": mode == "rules"}
    wanted = {"actions.mode": "observe" if mode == "global" else "enforce", "policies.rules": rules}
    if all(gw.overrides.get(k) == v for k, v in wanted.items()):
        return
    reloads = len(gw.events("config_reloaded"))
    gw.rewrite_config(wanted)
    gw.signal(signal.SIGHUP)
    reloaded = gw.wait_for_event("config_reloaded", timeout=20, after=reloads)
    assert reloaded is not None, "\n".join(gw.log_lines()[-20:])


def observed_count(stack: Stack, action: str, policy: str) -> float:
    value = stack.gateway.metric("gateway_observed_actions_total", action=action, policy=policy)
    return value or 0.0


def milter_count(stack: Stack, action: str) -> float:
    value = stack.gateway.metric("gateway_messages_total", action=action, frontend="milter")
    return value or 0.0


def top_fields(stored: bytes) -> list[bytes]:
    """The delivered copy's header lines above Postfix's own ``Received:``: ours."""
    return stored[: stored.index(b"Received:")].splitlines()


def test_global_observe_delivers_through_postfix_what_would_have_been_refused(
    observe_stack: Stack,
) -> None:
    stack = observe_stack
    observing(stack, "global")
    expected = {"reject": 0.0, "quarantine": 0.0, "add_header": 0.0, "relay": 0.0}
    before = {action: observed_count(stack, action, "all") for action in expected}
    relayed = milter_count(stack, "relay")
    forged = b"X-Spam-Action-Observed: relay\r\n"  # a client's own is dropped by the milter
    cases = (  # body marker, the action it would have had, sender (to find its log line)
        (b"REJECT-ME OBS-REJECT", "reject", "observe-reject@sender.test"),
        (b"QUARANTINE-ME OBS-QUARANTINE", "quarantine", "observe-quarantine@sender.test"),
        (b"Lunch on Friday? OBS-CLEAN", "relay", "observe-clean@sender.test"),
    )
    for body, action, sender in cases:
        send(stack, message(f"observe {action}", body + b"\r\n", sender, forged), sender)
        expected[action] += 1
    for body, action, sender in cases:
        stored = delivered(stack, body.split()[-1])
        msg = email.message_from_bytes(stored, policy=email.policy.compat32)
        assert msg.get_all("X-Spam-Action-Observed") == [action], stored
        assert f"X-Spam-Action-Observed: {action}".encode() in top_fields(stored)
        # Nothing is enforced: the score is shown, but nothing flags the message as spam.
        assert msg["X-Spam-Status"].startswith("No, score="), msg["X-Spam-Status"]
        assert msg["X-Spam-Flag"] is None
        if action != "relay":
            assert f"TEST_{action.upper()}_ME=".encode() in stored
        event = stack.gateway.wait_for_event("message_processed", match={"mail_from": sender})
        assert event is not None and event["frontend"] == "milter", event
        assert event["action"] == "relay" and event["observed_action"] == action, event
        assert event["observed_by_policy"] == {"all": action}, event
    for action, n in expected.items():
        assert observed_count(stack, action, "all") == before[action] + n, action
    assert milter_count(stack, "relay") == relayed + len(cases)


def test_global_observe_still_refuses_gtube_through_postfix(observe_stack: Stack) -> None:
    """GTUBE is a hard protection: Postfix's client still gets the gateway's 550."""
    stack = observe_stack
    observing(stack, "global")
    observed, rejected = observed_count(stack, "reject", "all"), milter_count(stack, "reject")
    code, text = refused(stack, message("observe gtube", GTUBE + b" OBS-GTUBE\r\n"))
    assert code == 550 and text.startswith("5.7.1 Message rejected:") and "GTUBE" in text, text
    assert milter_count(stack, "reject") == rejected + 1
    assert observed_count(stack, "reject", "all") == observed + 1  # also what it would have had
    assert not [m for m in stack.postfix.mailbox() if b"OBS-GTUBE" in m]


def test_one_observed_policy_is_delivered_through_postfix_while_the_others_act(
    observe_stack: Stack, dns_server: DNSServer
) -> None:
    """``[policies.rules] observe = true``: its reject is delivered, DMARC's still refused."""
    stack = observe_stack
    observing(stack, "rules")
    actions = ("reject", "relay")
    before = {action: observed_count(stack, action, "rules") for action in actions}
    everything = observed_count(stack, "reject", "all")
    rejected = milter_count(stack, "reject")
    sender = "observe-rules@sender.test"
    send(stack, message("rules observed", b"REJECT-ME OBS-RULEREJECT\r\n", sender), sender)
    send(stack, message("rules clean", b"Lunch on Friday? OBS-RULECLEAN\r\n"))
    stored = delivered(stack, b"OBS-RULEREJECT")
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert msg.get_all("X-Spam-Action-Observed") == ["reject"], stored
    assert b"X-Spam-Action-Observed: reject" in top_fields(stored)
    assert msg["X-Spam-Status"].startswith("No, score="), msg["X-Spam-Status"]
    assert "TEST_REJECT_ME=20.00" in msg["X-Spam-Symbols"]
    clean = email.message_from_bytes(delivered(stack, b"OBS-RULECLEAN"))
    assert clean.get_all("X-Spam-Action-Observed") == ["relay"]
    event = stack.gateway.wait_for_event("message_processed", match={"mail_from": sender})
    assert event is not None and event["action"] == "relay", event
    assert event["observed_by_policy"] == {"rules": "reject"}, event
    # GTUBE (a rules symbol, but a hard one) and DMARC (an enforced policy) still refuse.
    code, text = refused(stack, message("rules gtube", GTUBE + b"\r\n"))
    assert code == 550 and "GTUBE" in text, text
    _, (code, text) = refused_spoofed(stack, dns_server, "milter-observe.other.test", "rules dmarc")
    assert code == 550 and "DMARC" in text, text
    assert milter_count(stack, "reject") == rejected + 2
    # Counted per observed policy: rules alone would have rejected three of the four.
    assert observed_count(stack, "reject", "rules") == before["reject"] + 3
    assert observed_count(stack, "relay", "rules") == before["relay"] + 1
    assert observed_count(stack, "reject", "all") == everything  # not in global mode now


def test_gateway_stopped_means_postfix_answers_4xx(stack: Stack) -> None:
    """milter_default_action = tempfail: Postfix defers (at MAIL already), nothing is lost."""
    stack.gateway.stop()  # last test of the module: the fixture only cleans up after it
    with pytest.raises(smtplib.SMTPResponseException) as deferred:
        send(stack, message("down", b"later\r\n"))
    assert 400 <= deferred.value.smtp_code < 500, deferred.value
