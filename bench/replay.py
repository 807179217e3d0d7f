"""``gateway replay --jobs 2`` against the pipeline's single-message throughput.

    python -m bench.replay                    # 1,500 corpus messages, 2 rounds
    python -m bench.replay --limit 3100 --rounds 3 --json

1. Unpacks the development corpus (``../shared/corpus/sa-dev.tar.xz``) into a
   temporary directory (it never enters the repository) and keeps the first
   ``--limit`` messages (spam, ham and hard ham, in name order) in one folder.
2. Writes the shipped ``config.example.toml`` with bench.quality's overrides
   (state and quarantine in the temporary directory; the classifier untrained).
3. Baseline, in this process: one Engine (``--dns offline`` resolver and the
   read-only state replay uses) evaluates the messages one after another, read
   into memory first: the pipeline's single-message throughput on one core.
4. ``python -m gateway replay --config ... --jobs 2 --json DIR`` as a
   subprocess, timed from start to exit (process start-up, worker spawn and
   engine start-up included), and by its own ``seconds``.

Rounds alternate baseline and replay so load on the shared machine hits both.
The figure of merit is per-core throughput: (replay msg/s / 2) / baseline msg/s.
Wall clocks on a shared machine measure the neighbours too, so the CPU figure
is printed beside it: baseline CPU per message / replay CPU per message (every
process of the replay, start-up included: ``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench.quality import DEFAULT_CORPUS, ROOT, crlf, envelope_for, write_config


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


async def baseline(config_path: Path, files: list[Path]) -> tuple[float, float]:
    """(msg/s, CPU s per message) of one Engine evaluating the messages one at a time."""
    from gateway.api import Services
    from gateway.config import load_config
    from gateway.engine import Engine
    from gateway.replay import OfflineResolver, ReadOnlyState
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
    messages = [(f.name, crlf(f.read_bytes())) for f in files]
    try:
        for name, raw in messages[:50]:  # warm-up: first-use costs out of the figure
            await engine.evaluate(envelope_for(name, raw), raw)
        started, cpu = time.perf_counter(), time.process_time()
        for name, raw in messages:
            await engine.evaluate(envelope_for(name, raw), raw)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await engine.close()
        await state.close()
    return len(messages) / elapsed, cpu / len(messages)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def replay_run(config_path: Path, folder: Path, jobs: int) -> tuple[float, float, float, int]:
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
            str(folder),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=1500, help="messages (at most 3100)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.corpus.exists():
        raise SystemExit(f"{args.corpus}: corpus not found (see /work/shared/corpus/README.md)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        work = Path(tmp)
        files = corpus_sample(args.corpus, work, args.limit)
        config = write_config(
            ROOT / "config.example.toml", work / "gateway.toml", "127.0.0.1:1", work, True
        )
        for r in range(args.rounds):
            base, base_cpu = asyncio.run(baseline(config, files))
            wall, own, cpu, n = replay_run(config, work / "sample", args.jobs)
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
