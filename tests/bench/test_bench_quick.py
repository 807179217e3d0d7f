"""The throughput benchmark's quick mode runs end to end (a smoke test: no numbers asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_quick_benchmark_completes_and_prints_the_ratios() -> None:
    """`python -m bench.run --quick` exits 0 and prints the gateway/relay ratio lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "ratios gateway/relay" in out, out
    ratio_lines = [line for line in out.splitlines() if "throughput" in line and "cpu/msg" in line]
    assert ratio_lines, out
    assert "pipeline cost" in ratio_lines[0]
    assert "latency ms (p50/p99)" in out
