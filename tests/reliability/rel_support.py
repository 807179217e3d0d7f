"""Shared constants and helpers of the reliability suite (fixtures are in conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess

ZONES = ("example.org", "sender.test")
SENDER = "alice@sender.test"
RCPT = "bob@example.org"


def sender_zone() -> dict[str, list[tuple[str, str]]]:
    """sender.test publishes SPF for loopback and DMARC p=reject (so DNS decides delivery)."""
    return {
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
        "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
        "ledger.sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
    }


def overrides(
    relay_port: int, dns: DNSServer, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """No policies, relay to ``relay_port``, DNS from ``dns``, short timeouts."""
    base: dict[str, Any] = {
        "relay.host": "127.0.0.1",
        "relay.port": relay_port,
        "relay.timeout": 3.0,
        "dns.nameservers": [dns.address],
        "dns.timeout": 0.5,
        "policies": {},
        "scores": {},
    }
    base.update(extra or {})
    return base


GatewayFactory = Callable[..., GatewayProcess]


QUARANTINE_RULES = """\
[[rule]]
name = "TEST_QUARANTINE"
type = "header"
header = "X-Test-Verdict"
pattern = 'quarantine'
score = 0.0
action = "quarantine"
description = "the test asks for quarantine"
"""


def quarantine_policy(workdir: Path) -> dict[str, Any]:
    """Overrides: only the rules policy, with a rule quarantining X-Test-Verdict: quarantine."""
    workdir.mkdir(parents=True, exist_ok=True)
    rules = workdir / "quarantine-rules.toml"
    rules.write_text(QUARANTINE_RULES, encoding="utf-8")
    return {"policies": {"rules": {"files": [str(rules)], "builtin": False}}}


def send_raw(port: int, payload: bytes, result: list[bytes]) -> None:
    """One SMTP transaction over a plain socket; payload is already dot-stuffed."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    return line

        replies = [reply()]
        for cmd in (
            b"EHLO c.sender.test",
            f"MAIL FROM:<{SENDER}>".encode(),
            f"RCPT TO:<{RCPT}>".encode(),
            b"DATA",
        ):
            s.sendall(cmd + b"\r\n")
            replies.append(reply())
        s.sendall(payload + b"\r\n.\r\n")
        replies.append(reply())
        result.extend(replies)
        s.sendall(b"QUIT\r\n")
