"""The classifier end to end: trained through `python -m gateway learn`, applied by the
running gateway (`python -m gateway run` with the shipped config), visible in the
X-Spam-Status header of the relayed message.
"""

from __future__ import annotations

import random
import smtplib
import subprocess
import sys
from pathlib import Path

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer
from gateway.testing.training import training_message


def message(spam: bool, n: int, rng: random.Random) -> bytes:
    return training_message(spam, n, rng, domain="e2e.example")


def spam_status(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
    return next(line for line in unfolded.split("\r\n") if line.startswith("X-Spam-Status:"))


def learn(config: Path, label: str, folder: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "learn", label, "--config", str(config), str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_mail_learned_as_spam_through_the_cli_gets_bayes_99_in_the_relayed_header(
    tmp_path: Path, sink: SinkServer, dns_server: DNSServer
) -> None:
    rng = random.Random(8)
    gw = GatewayProcess(
        {
            "relay.host": sink.host,
            "relay.port": sink.port,
            "dns.nameservers": [dns_server.address],
            "dns.timeout": 2.0,
            "policies.bayes.min_spam": 10,
            "policies.bayes.min_ham": 10,
        },
        workdir=tmp_path / "gw",
    )
    for label, spam in (("spam", True), ("ham", False)):
        folder = tmp_path / label
        folder.mkdir()
        for i in range(12):
            (folder / f"{i}.eml").write_bytes(message(spam, i, rng))
        assert f"learned 12 of 12 messages as {label}" in learn(gw.config_path, label, folder)

    with gw, smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=15) as client:
        client.sendmail("promo@deals.example", ["bob@example.org"], message(True, 100, rng))
        client.sendmail("dev@project.example", ["bob@example.org"], message(False, 100, rng))
    spam_header, ham_header = (spam_status(m.data) for m in sink.messages)
    assert "BAYES_99" in spam_header, spam_header
    assert "BAYES_00" in ham_header, ham_header
