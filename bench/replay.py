"""``gateway replay --jobs 2`` against the pipeline's single-message throughput.

    python -m bench.replay                    # 1,500 corpus messages, 2 rounds
    python -m bench.replay --limit 3100 --rounds 3 --json
    python -m bench.replay --passes 3           # the corpus three times over: fixed costs fade
    python -m bench.replay --memory 100000     # RSS over an mbox of 100,000 messages

1. Unpacks the development corpus (``../shared/corpus/sa-dev.tar.xz``) into a
   temporary directory (it never enters the repository) and keeps the first
   ``--limit`` messages (spam, ham and hard ham, in name order) in one folder.
2. Writes the shipped ``config.example.toml`` with bench.quality's overrides
   (state and quarantine in the temporary directory; the classifier untrained).
3. Baseline, in this process: one Engine (``--dns offline`` resolver and the
   read-only state replay uses) evaluates the messages one after another, read
   into memory first with the envelopes replay derives for them: the
   pipeline's single-message throughput on one core, on the same work.
4. ``python -m gateway replay --config ... --jobs 2 --json DIR`` as a
   subprocess, timed from start to exit (process start-up, worker spawn and
   engine start-up included), and by its own ``seconds``. The gateway's modules
   are byte-compiled first (``__pycache__``, ignored by git), as an installed
   gateway's are: under ``PYTHONDONTWRITEBYTECODE`` each start would otherwise
   compile them from source again (0.1 s, a cost no deployment pays).

With ``--passes N`` both sides do the work N times over (replay is given the
folder N times), so the per-run fixed costs (interpreter, imports, fork,
engine start-up: ~0.4 s) weigh 1/N as much: what is left is throughput.

Rounds alternate baseline and replay so load on the shared machine hits both.
The figure of merit is per-core throughput: (replay msg/s / 2) / baseline msg/s.
Wall clocks on a shared machine measure the neighbours too, so the CPU figure
is printed beside it: baseline CPU per message / replay CPU per message (every
process of the replay, start-up included: ``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.quality import DEFAULT_CORPUS, ROOT, crlf, write_config


def corpus_sample(corpus: Path, dest: Path, limit: int) -> list[Path]:
    """The first ``limit`` messages of the corpus, copied flat into ``dest``."""
    unpack = dest / "unpacked"
    with tarfile.open(corpus) as tar:
        tar.extractall(unpack, filter="data")
    files = sorted(p for p in unpack.rglob("*") if p.is_file() and not p.name.startswith("."))
    folder = dest / "sample"
    folder.mkdir()
    out = []
    for i, f in enumerate(files[:limit]):
        target = folder / f"{i:05d}-{f.name}"
        target.write_bytes(f.read_bytes())
        out.append(target)
    return out


async def baseline(config_path: Path, files: list[Path], passes: int = 1) -> tuple[float, float]:
    """(msg/s, CPU s per message) of one Engine evaluating the messages one at a time."""
    from gateway.api import Services
    from gateway.config import load_config
    from gateway.engine import Engine
    from gateway.replay import OfflineResolver, ReadOnlyState, ReplaySetup, as_received
    from gateway.replay import envelope_for as replay_envelope
    from gateway.state import open_state

    config = load_config(config_path)
    state = open_state(config.state, config.base_dir)
    services = Services(
        resolver=OfflineResolver(),
        state=ReadOnlyState(state),
        hostname=config.server.hostname,
        config_dir=config.base_dir,
    )
    engine = Engine(config, Engine.make_plan(config), services, retry_floors=False)
    await engine.start()
    setup = ReplaySetup(config_a=str(config_path))
    messages = []
    for f in files:
        raw = crlf(f.read_bytes())
        env = replay_envelope(raw, config, setup, f.name[:12])
        messages.append((env, as_received(raw, config.server.hostname)))
    warm_up = messages[:50]
    messages *= passes
    try:
        for env, raw in warm_up:  # warm-up: first-use costs out of the figure
            await engine.evaluate(env, raw)
        started, cpu = time.perf_counter(), time.process_time()
        for env, raw in messages:
            await engine.evaluate(env, raw)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await engine.close()
        await state.close()
    return len(messages) / elapsed, cpu / len(messages)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def replay_run(
    config_path: Path, folder: Path, jobs: int, passes: int = 1
) -> tuple[float, float, float, int]:
    """(msg/s start to exit, msg/s by replay's own clock, CPU s per message, messages)."""
    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "replay",
            "--config",
            str(config_path),
            "--jobs",
            str(jobs),
            "--json",
            *[str(folder)] * passes,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=ROOT,
    )
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"replay failed ({proc.returncode}):\n{proc.stderr}")
    doc = json.loads(proc.stdout)
    n = int(doc["messages"])
    return n / wall, n / float(doc["seconds"]), cpu / n, n


_MEMORY_CONFIG = """
[server]
listen = "127.0.0.1:0"
hostname = "mx.example.org"
accepted_domains = ["example.org"]
[quarantine]
path = "quarantine"
[state]
path = "state.sqlite"
[policies.rules]
[policies.heuristics]
[policies.urls]
"""


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def memory(count: int, jobs: int) -> dict[str, Any]:
    """RSS of the replay's processes while it reads an mbox of ``count`` messages."""
    with tempfile.TemporaryDirectory(prefix="bench-replay-mem-") as tmp:
        work = Path(tmp)
        config = work / "gateway.toml"
        config.write_text(_MEMORY_CONFIG)
        box = work / "big.mbox"
        with open(box, "wb") as fh:
            for i in range(count):
                fh.write(
                    b"From a@sender.test Mon Jan  1 00:00:00 2024\n"
                    b"Return-Path: <a@sender.test>\nFrom: a@sender.test\nTo: b@example.org\n"
                    + f"Subject: message {i} free offer\nMessage-ID: <{i}@sender.test>\n\n".encode()
                    + b"Hello, see http://example.com/x for the details.\n" * 8
                    + b"\n"
                )
        size = box.stat().st_size
        argv = [sys.executable, "-m", "gateway", "replay", "--config", str(config)]
        argv += ["--jobs", str(jobs), "--json", str(box)]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        samples: list[tuple[float, int, int]] = []  # (seconds, main KB, workers KB)
        while proc.poll() is None:
            workers = sum(_rss_kb(c) for c in _children(proc.pid))
            samples.append((time.perf_counter() - started, _rss_kb(proc.pid), workers))
            time.sleep(0.5)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"replay failed ({proc.returncode}):\n{err.decode()}")
        doc = json.loads(out)
        live = [s for s in samples if s[2] > 0]
        tenth = live[max(0, len(live) // 10)] if live else (0.0, 0, 0)
        return {
            "messages": doc["messages"],
            "mbox_mb": round(size / 1e6, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "main_rss_mb_at_10pct": round(tenth[1] / 1024, 1),
            "main_rss_mb_peak": round(max(s[1] for s in samples) / 1024, 1),
            "workers_rss_mb_at_10pct": round(tenth[2] / 1024, 1),
            "workers_rss_mb_peak": round(max(s[2] for s in samples) / 1024, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=1500, help="messages (at most 3100)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--passes", type=int, default=1, help="the messages N times over")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="RSS over N messages")
    args = parser.parse_args(argv)
    if args.memory:
        print(json.dumps(memory(args.memory, args.jobs)))
        return 0
    if not args.corpus.exists():
        raise SystemExit(f"{args.corpus}: corpus not found (see /work/shared/corpus/README.md)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        work = Path(tmp)
        files = corpus_sample(args.corpus, work, args.limit)
        config = write_config(
            ROOT / "config.example.toml", work / "gateway.toml", "127.0.0.1:1", work, True
        )
        for package in ("gateway", "policies"):
            compileall.compile_dir(ROOT / package, quiet=1)
        for r in range(args.rounds):
            base, base_cpu = asyncio.run(baseline(config, files, args.passes))
            wall, own, cpu, n = replay_run(config, work / "sample", args.jobs, args.passes)
            row = {
                "round": r + 1,
                "messages": n,
                "load": round(os.getloadavg()[0], 2),
                "baseline_msg_s": round(base, 1),
                "baseline_cpu_ms": round(base_cpu * 1000, 3),
                "replay_msg_s": round(wall, 1),
                "replay_msg_s_own_clock": round(own, 1),
                "replay_cpu_ms": round(cpu * 1000, 3),
                "per_core_ratio": round(wall / args.jobs / base, 3),
                "per_core_ratio_own_clock": round(own / args.jobs / base, 3),
                "cpu_ratio": round(base_cpu / cpu, 3),
            }
            rows.append(row)
            if not args.json:
                print(
                    f"round {r + 1} (load {row['load']}): baseline {base:.1f} msg/s, "
                    f"{row['baseline_cpu_ms']} ms CPU/msg; replay --jobs {args.jobs} "
                    f"{wall:.1f} msg/s start to exit ({own:.1f} by its clock), "
                    f"{row['replay_cpu_ms']} ms CPU/msg: per core {row['per_core_ratio']:.2f} "
                    f"({row['per_core_ratio_own_clock']:.2f}), CPU {row['cpu_ratio']:.2f}"
                )
    summary = {
        "cpus": os.cpu_count(),
        "jobs": args.jobs,
        "passes": args.passes,
        "rounds": rows,
        "median_per_core_ratio": statistics.median(r["per_core_ratio"] for r in rows),
        "median_per_core_ratio_own_clock": statistics.median(
            r["per_core_ratio_own_clock"] for r in rows
        ),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rows),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"median per-core ratio {summary['median_per_core_ratio']:.2f} "
            f"({summary['median_per_core_ratio_own_clock']:.2f} by replay's clock), "
            f"CPU per message ratio {summary['median_cpu_ratio']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
