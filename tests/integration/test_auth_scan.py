"""``python -m gateway scan --json`` reports SPF, DKIM and DMARC as INTERFACE.md specifies."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policies"))
from auth_helpers import ed25519_key, key_records, message, rsa_key, sign

ZONE = {
    "example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    "mail.example.com": [("TXT", "v=spf1 a -all"), ("A", "192.0.2.10")],
    **key_records(("example.com", "s1", rsa_key()), ("example.com", "ed", ed25519_key())),
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with DNSServer(ZONE, zones=["example.com", "example"]) as dns:
        path = write_config(
            {
                "dns.nameservers": [dns.address],
                "dns.timeout": 2.0,
                "policies": {"spf": {}, "dkim": {}, "dmarc": {}},
                "scores": {},
            },
            tmp_path_factory.mktemp("scan"),
        )
        yield path


def scan(config: Path, raw: bytes, tmp_path: Path, *args: str) -> dict[str, Any]:
    eml = tmp_path / "m.eml"
    eml.write_bytes(raw)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "scan",
            "--config",
            str(config),
            "--json",
            *args,
            str(eml),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode in (0, 1, 2), out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_authenticated_message(config: Path, tmp_path: Path) -> None:
    raw = sign(sign(message(), "example.com", "s1"), "example.com", "ed", ed25519_key())
    doc = scan(
        config,
        raw,
        tmp_path,
        "--ip",
        "192.0.2.10",
        "--helo",
        "mail.example.com",
        "--mail-from",
        "<alice@example.com>",
    )
    assert doc["auth"] == {
        "spf": "pass",
        "spf_helo": "pass",
        "dkim": [
            {"domain": "example.com", "selector": "ed", "result": "pass"},
            {"domain": "example.com", "selector": "s1", "result": "pass"},
        ],
        "dmarc": {"result": "pass", "policy": "reject", "domain": "example.com"},
    }
    assert doc["action"] == "relay"


def test_spoof_is_rejected_with_the_policy_in_the_reply(config: Path, tmp_path: Path) -> None:
    doc = scan(
        config,
        message(from_="ceo@example.com"),
        tmp_path,
        "--ip",
        "203.0.113.5",
        "--helo",
        "evil.example",
        "--mail-from",
        "x@evil.example",
    )
    assert doc["action"] == "reject"
    assert doc["smtp_reply"].startswith(
        "550 5.7.1 Message rejected: DMARC policy of example.com is reject"
    )
    assert doc["auth"]["dmarc"] == {"result": "fail", "policy": "reject", "domain": "example.com"}
    assert {"DMARC_POLICY_REJECT", "SPF_NONE", "DKIM_NONE"} <= {s["name"] for s in doc["symbols"]}


def test_null_sender_is_checked_as_postmaster_at_helo(config: Path, tmp_path: Path) -> None:
    """RFC 7208 §2.4: auth.spf of a bounce is the result for postmaster@<HELO>."""
    doc = scan(
        config,
        message(from_="mailer-daemon@mail.example.com"),
        tmp_path,
        "--ip",
        "192.0.2.10",
        "--helo",
        "mail.example.com",
        "--mail-from",
        "<>",
    )
    assert (doc["auth"]["spf"], doc["auth"]["spf_helo"]) == ("pass", "pass")
    header = doc["headers"][0].replace("\r\n\t", " ")
    assert "spf=pass smtp.mailfrom=postmaster@mail.example.com" in header
