"""What the classifier learns through one node counts on every node (shared Redis state).

Two ``python -m gateway run`` processes share a throwaway Redis under a fresh
key prefix; ``python -m gateway learn`` runs with node A's config; the verdict
on mail sent through node B shows in the X-Spam-Status header at the sink.
"""

from __future__ import annotations

import random
import secrets
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer
from gateway.testing.training import training_message

TRAINING = 12  # per class; the test config lowers min_spam/min_ham to 10


def message(spam: bool, n: int, rng: random.Random) -> bytes:
    sender = "promo@sender.test" if spam else "dev@sender.test"
    return training_message(spam, n, rng, sender=sender, domain="cluster.test")


def spam_status(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
    return next(line for line in unfolded.split("\r\n") if line.startswith("X-Spam-Status:"))


def test_mail_learned_through_node_a_is_classified_on_node_b(
    tmp_path: Path, sink: SinkServer, redis_server: Any, node_overrides: Any
) -> None:
    rng = random.Random(9)
    overrides = node_overrides(
        {"bayes": {"min_spam": 10, "min_ham": 10}},
        {
            "state.backend": "redis",
            "state.url": redis_server.url,
            "state.key_prefix": f"gwtest-{secrets.token_hex(4)}:",
        },
    )
    with (
        GatewayProcess(overrides, workdir=tmp_path / "a") as node_a,
        GatewayProcess(overrides, workdir=tmp_path / "b") as node_b,
    ):
        with smtplib.SMTP("127.0.0.1", node_b.smtp_port, timeout=15) as client:
            client.sendmail("promo@sender.test", ["bob@example.org"], message(True, 99, rng))
        assert "BAYES_UNTRAINED" in spam_status(sink.wait_for(1)[0].data)

        for label, spam in (("spam", True), ("ham", False)):
            folder = tmp_path / label
            folder.mkdir()
            for i in range(TRAINING):
                (folder / f"{i}.eml").write_bytes(message(spam, i, rng))
            learned = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "learn",
                    label,
                    "--config",
                    str(node_a.config_path),
                    str(folder),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert learned.returncode == 0, learned.stderr
            assert f"learned {TRAINING} of {TRAINING} messages as {label}" in learned.stdout

        with smtplib.SMTP("127.0.0.1", node_b.smtp_port, timeout=15) as client:
            client.sendmail("promo@sender.test", ["bob@example.org"], message(True, 100, rng))
            client.sendmail("dev@sender.test", ["bob@example.org"], message(False, 100, rng))
        _, spam_header, ham_header = (spam_status(m.data) for m in sink.wait_for(3))
    assert "BAYES_99" in spam_header, spam_header
    assert "BAYES_00" in ham_header, ham_header
