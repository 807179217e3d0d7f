"""The throughput benchmark's quick mode runs end to end (a smoke test: no numbers asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.testing.require import require_root, require_tool

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


@pytest.mark.timeout(90)
def test_pipelining_benchmark_runs_on_a_delayed_link() -> None:
    """`python -m bench.pipelining` with one short round: a row per link, nothing failed."""
    args = ["--rtt", "4", "--concurrency", "1", "--seconds", "1", "--rounds", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pipelining", *args, "--messages", "30"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("4 ")]
    assert len(rows) == 1 and rows[0].endswith("failed 0"), proc.stdout


@pytest.mark.timeout(90)
def test_web_poll_benchmark_runs_polled_and_unpolled_rounds() -> None:
    """`python -m bench.web_poll --quick`: both rounds, the ratio line, no failed request."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.web_poll", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio polled/unpolled" in proc.stdout, proc.stdout
    assert "errors 0" in proc.stdout and "smtp failed 0/0" in proc.stdout, proc.stdout


@pytest.mark.timeout(120)
def test_milter_benchmark_runs_postfix_alone_and_with_the_gateway() -> None:
    """`python -m bench.milter --quick --no-rspamd`: a row per target, every reply a 2xx."""
    require_root("bench.milter starts a Postfix master (root)")
    require_tool("postfix", "apt-get install postfix")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.milter", "--quick", "--no-rspamd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "msg/s  ratio" in line}
    assert set(rows) == {"postfix", "gateway"}, proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("gateway ")]
    assert table and "broken" not in table[0] and "4xx" not in table[0], proc.stdout
