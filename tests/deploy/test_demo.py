"""`make demo` works: the sample messages get the verdicts the README promises.

Runs deploy/demo/run.py --once (what `make demo` runs, minus waiting for
Ctrl-C) on free ports with its own work directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gateway.testing.postfix import free_port

REPO = Path(__file__).resolve().parents[2]


def test_demo_verdicts_over_smtp_and_milter(tmp_path: Path) -> None:
    ports = [str(free_port()) for _ in range(4)]
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "deploy/demo/run.py"),
            "--once",
            "--smtp-port",
            ports[0],
            "--metrics-port",
            ports[1],
            "--sink-port",
            ports[2],
            "--milter",
            ports[3],
            "--var",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # [1] clean: relayed, with the gateway's verdict headers.
    assert "DATA -> 250" in out and "X-Spam-Status: No, score=" in out
    assert "Authentication-Results: mx.demo.example; spf=pass" in out
    # [2] GTUBE, [3] DMARC p=reject, [4] .exe: rejected with reasons a sender can act on.
    smtp, _, milter = out.partition("Milter mode")
    assert milter, out
    rejections = re.findall(r"DATA -> (550 5\.7\.\d .*)", smtp)
    assert len(rejections) == 3, rejections
    gtube, spoof, attachment = rejections
    assert "GTUBE" in gtube
    assert "DMARC" in spoof and "bank.example" in spoof
    assert "invoice-4711.pdf.exe" in attachment
    # [5] encrypted archive: 250 to the sender, held in quarantine, listed.
    assert "held in quarantine" in smtp and "<carol@sender.example> -> bob@example.org" in out
    # [6] never an open relay.
    assert "550 5.7.1 Relaying denied" in smtp
    # The same samples through the milter: the same verdicts as Postfix would act on them.
    assert "insert at 0: X-Spam-Status: No, score=" in milter
    assert "insert at 0: Authentication-Results: mx.demo.example; spf=pass" in milter
    assert re.findall(r"Postfix replies: (550 5\.7\.\d .*)", milter) == rejections
    assert "discard: Postfix drops it" in milter
    assert "Postfix refuses this recipient itself" in milter
