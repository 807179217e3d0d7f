"""``gateway replay`` end to end (the real CLI): what config A and B do to stored mail.

One small labelled mail store built per test: a directory of files, an mbox,
a Maildir (its ``tmp`` must not be read), hostile files, and both quarantine
backends. B raises one score (``SUBJ_FREE``): exactly the messages with "free"
in their Subject change, and the labelled rates match ``bench.quality``'s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.quality import evaluate_message
from gateway.config import QuarantineConfig, load_config
from gateway.quarantine import QuarantineItem, new_id, open_quarantine
from gateway.testing.postgres import throwaway_schema

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[server]
listen = "127.0.0.1:0"
hostname = "mx.example.org"
accepted_domains = ["example.org"]
max_message_size = 20000

[quarantine]
{quarantine}

[state]
path = "state.sqlite"

[policies.rules]
[policies.heuristics]
[policies.spf]
{scores}
"""


def msg(subject: str, body: str = "See you at noon.", sender: str = "alice@sender.test") -> bytes:
    return (
        f"Return-Path: <{sender}>\n"
        "Received: from mail.sender.test (mail.sender.test [192.0.2.7])\n"
        "\tby mx.example.org (gateway) with ESMTP id Q1; Mon, 1 Jan 2024 00:00:00 +0000\n"
        f"From: {sender}\nTo: bob@example.org\nSubject: {subject}\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <m@sender.test>\n\n"
        f"{body}\n"
    ).encode()


def write_configs(tmp: Path, quarantine: str = 'path = "quarantine"') -> tuple[Path, Path]:
    a = tmp / "a.toml"
    b = tmp / "b.toml"
    a.write_text(CONFIG.format(quarantine=quarantine, scores=""))
    b.write_text(CONFIG.format(quarantine=quarantine, scores="[scores]\nSUBJ_FREE = 16.0\n"))
    return a, b


def build_store(tmp: Path) -> dict[str, Path]:
    """Labelled folders, an mbox, a Maildir and hostile files; what changes under B."""
    spam, ham = tmp / "mail" / "spam", tmp / "mail" / "ham"
    spam.mkdir(parents=True)
    ham.mkdir(parents=True)
    (spam / "1.eml").write_bytes(msg("Free offer inside"))
    (spam / "2.eml").write_bytes(msg("Your free prize"))
    (spam / "3.eml").write_bytes(
        msg("hi", "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X")
    )
    (ham / "1.eml").write_bytes(msg("lunch"))
    (ham / "2.eml").write_bytes(msg("free for lunch?"))  # B's false positive
    (ham / "3.eml").write_bytes(msg("minutes"))
    box = tmp / "archive.mbox"
    box.write_bytes(
        b"".join(
            b"From alice@sender.test Mon Jan  1 00:00:00 2024\n" + m + b"\n"
            for m in (msg("one"), msg("free two"), msg("three", "body\n>From quoted"))
        )
    )
    md = tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1:2,S").write_bytes(msg("read mail"))
    (md / "new" / "2").write_bytes(msg("free new mail"))
    (md / "tmp" / "3").write_bytes(msg("free but still being delivered"))
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (junk / "huge.eml").write_bytes(msg("big", "x" * 30_000))
    (junk / "dangling").symlink_to(tmp / "nowhere")
    return {"spam": spam, "ham": ham, "mbox": box, "maildir": md, "junk": junk}


def replay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "replay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def run_json(*args: str) -> dict[str, Any]:
    out = replay(*args, "--json")
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_replay_over_files_mbox_and_maildir_shows_exactly_what_one_score_changes(
    tmp_path: Path,
) -> None:
    a, b = write_configs(tmp_path)
    paths = build_store(tmp_path)
    doc = run_json("--config", str(a), "--against", str(b), *(str(p) for p in paths.values()))
    assert doc["messages"] == 11  # 6 files, 3 in the mbox, 2 in the Maildir (not tmp/)
    assert doc["errors"] == 3
    assert {Path(p["path"]).name: p["error"] for p in doc["problems"]} == {
        "picture.png": "not a mail message (no header field first)",
        "huge.eml": "30298 bytes, over server.max_message_size (20000)",
        "dangling": "cannot read: No such file or directory",
    }
    changed = {c["path"]: c for c in doc["changed"]}
    assert sorted(changed) == sorted(
        [
            str(paths["spam"] / "1.eml"),
            str(paths["spam"] / "2.eml"),
            str(paths["ham"] / "2.eml"),
            f"{paths['mbox']}#2",
            str(paths["maildir"] / "new" / "2"),
        ]
    )
    for c in changed.values():
        assert (c["a"], c["b"]) == ("relay", "reject")
        assert "SUBJ_FREE" in c["symbols_a"] and c["symbols_a"] == c["symbols_b"]
    assert doc["changed_total"] == 5
    assert doc["a"]["actions"] == {"reject": 1, "relay": 10}
    assert doc["b"]["actions"] == {"reject": 6, "relay": 5}
    assert doc["a"]["symbols"]["SUBJ_FREE"] == 5 == doc["b"]["symbols"]["SUBJ_FREE"]
    assert doc["labels"] == {
        "ham": {"a": {"flagged": 0, "total": 3}, "b": {"flagged": 1, "total": 3}},
        "spam": {"a": {"flagged": 1, "total": 3}, "b": {"flagged": 3, "total": 3}},
    }
    assert doc["dns"] == "offline" and doc["interrupted"] is False
    # SPF had no network: temperror, and no tempfail however the config says so.
    assert doc["a"]["symbols"]["SPF_TEMPERROR"] == 11


def test_json_schema_without_against_and_the_table_for_people(tmp_path: Path) -> None:
    a, _ = write_configs(tmp_path)
    paths = build_store(tmp_path)
    doc = run_json("--config", str(a), str(paths["ham"]))
    assert set(doc) >= {"messages", "errors", "a", "changed", "labels"}
    assert "b" not in doc and doc["changed"] == []
    assert doc["labels"] == {"ham": {"a": {"flagged": 0, "total": 3}}}
    _, b = write_configs(tmp_path)
    out = replay("--config", str(a), "--against", str(b), *(str(p) for p in paths.values()))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "replayed 11 messages, 3 skipped" in text
    assert "changed: 5 messages" in text
    assert "relay -> reject" in text
    assert "false positives" in text and "detection" in text


def test_jobs_2_gives_the_same_answer_as_one_process(tmp_path: Path) -> None:
    a, b = write_configs(tmp_path)
    paths = build_store(tmp_path)
    args = ["--config", str(a), "--against", str(b), *(str(p) for p in paths.values())]
    one = run_json(*args)
    two = run_json(*args, "--jobs", "2")
    for doc in (one, two):
        doc.pop("seconds")
    assert one == two


def test_labelled_rates_match_bench_quality_on_the_same_messages(tmp_path: Path) -> None:
    a, b = write_configs(tmp_path)
    paths = build_store(tmp_path)
    doc = run_json(
        "--config",
        str(a),
        "--against",
        str(b),
        "--label",
        f"spam={paths['spam']}",
        "--label",
        f"ham={paths['ham']}",
    )

    async def bench(config_path: Path) -> dict[str, list[int]]:
        from gateway.engine import Engine, services_for
        from gateway.state import open_state

        config = load_config(config_path)
        state = open_state(config.state, config.base_dir)
        engine = Engine(config, Engine.make_plan(config), services_for(config, state))
        await engine.start()
        counts: dict[str, list[int]] = {}
        try:
            for label in ("spam", "ham"):
                for f in sorted(paths[label].iterdir()):
                    row = await evaluate_message(engine, f.name, f.read_bytes())
                    pair = counts.setdefault(label, [0, 0])
                    pair[0] += row["flagged"]
                    pair[1] += 1
        finally:
            await engine.close()
            await state.close()
        return counts

    for side, config_path in (("a", a), ("b", b)):
        expected = asyncio.run(bench(config_path))
        got = {k: [v[side]["flagged"], v[side]["total"]] for k, v in doc["labels"].items()}
        assert got == expected


def put_quarantined(config: QuarantineConfig, base: Path) -> list[str]:
    async def fill() -> list[str]:
        store = open_quarantine(config, base)
        ids = []
        for i, subject in enumerate(("free stuff", "meeting", "free again")):
            raw = msg(subject).replace(b"\n", b"\r\n")
            item = QuarantineItem(
                id=new_id(),
                queue_id=f"Q{i}",
                received_at=datetime(2026, 1, 1, tzinfo=UTC),
                client_ip="192.0.2.9",
                helo="mx.sender.test",
                mail_from="held@sender.test",
                rcpt_tos=("bob@example.org",),
                size=len(raw),
                score=11.0,
                action="quarantine",
                reasons=("spam score 11.00",),
                headers=(),
            )
            await store.put(item, raw)
            ids.append(item.id)
        await store.close()
        return ids

    return asyncio.run(fill())


def check_quarantine_replay(a: Path, b: Path, ids: list[str]) -> None:
    for jobs in ("1", "2"):
        doc = run_json("--config", str(a), "--against", str(b), "quarantine:", "--jobs", jobs)
        assert doc["messages"] == 3 and doc["errors"] == 0
        assert sorted(c["path"] for c in doc["changed"]) == sorted(
            f"quarantine:{ids[i]}" for i in (0, 2)
        )


def test_replay_reads_the_local_quarantine(tmp_path: Path) -> None:
    a, b = write_configs(tmp_path)
    ids = put_quarantined(QuarantineConfig(path=str(tmp_path / "quarantine")), tmp_path)
    check_quarantine_replay(a, b, ids)


def test_replay_reads_the_postgresql_quarantine(tmp_path: Path) -> None:
    with throwaway_schema() as dsn:
        a, b = write_configs(tmp_path, f'backend = "postgresql"\ndsn = "{dsn}"')
        ids = put_quarantined(QuarantineConfig(backend="postgresql", dsn=dsn), tmp_path)
        check_quarantine_replay(a, b, ids)


def test_ctrl_c_prints_the_partial_summary_and_exits_130(tmp_path: Path) -> None:
    a, b = write_configs(tmp_path)
    box = tmp_path / "many.mbox"
    with open(box, "wb") as fh:
        for i in range(40_000):
            fh.write(b"From a@b.test Mon Jan  1 00:00:00 2024\n" + msg(f"message {i}") + b"\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "replay",
            "--config",
            str(a),
            "--against",
            str(b),
            "--jobs",
            "2",
            "--json",
            str(box),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(6.0)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("replay did not stop after Ctrl-C")
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["interrupted"] is True
    assert 0 < doc["messages"] < 40_000


def test_dns_live_asks_the_configs_resolver(tmp_path: Path, dns_server: Any) -> None:
    a, _ = write_configs(tmp_path)
    a.write_text(a.read_text() + f'\n[dns]\nnameservers = ["{dns_server.address}"]\n')
    paths = build_store(tmp_path)
    doc = run_json("--config", str(a), "--dns", "live", str(paths["ham"]))
    assert doc["dns"] == "live" and doc["messages"] == 3
    assert "SPF_TEMPERROR" not in doc["a"]["symbols"]
    assert sum(n for s, n in doc["a"]["symbols"].items() if s.startswith("SPF_")) == 6


def test_a_dead_worker_stops_the_run_with_what_was_done_and_why(tmp_path: Path) -> None:
    a, _ = write_configs(tmp_path)
    box = tmp_path / "many.mbox"
    with open(box, "wb") as fh:
        for i in range(40_000):
            fh.write(b"From a@b.test Mon Jan  1 00:00:00 2024\n" + msg(f"message {i}") + b"\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "replay",
            "--config",
            str(a),
            "--jobs",
            "2",
            "--json",
            str(box),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    children: list[str] = []
    deadline = time.monotonic() + 30
    while len(children) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    time.sleep(2.0)
    os.kill(int(children[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "a replay worker exited (code -9)" in err
    doc = json.loads(out)
    assert doc["interrupted"] is True
    assert doc["problems"][-1]["path"] == "replay"
