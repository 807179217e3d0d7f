"""`python -m gateway learn` trains the classifier from files, directories and mbox files.

Runs the real CLI as a subprocess against a config whose state store is a
SQLite file in tmp_path, then checks the counts in that store and what
`scan` reports for a new message.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import StateConfig
from gateway.state import open_state
from gateway.testing.training import training_message
from policies.bayes import TOTALS_KEY


def message(spam: bool, n: int, rng: random.Random) -> bytes:
    return training_message(spam, n, rng, rcpt="user@example.org", domain="cli.example")


def mbox(messages: list[bytes]) -> bytes:
    """An mbox file: each message after a `From ` separator line, `From ` in bodies quoted."""
    out = b""
    for m in messages:
        body = m.replace(b"\r\n", b"\n").replace(b"\nFrom ", b"\n>From ")
        out += b"From sender@example.net Mon Jul  1 10:00:00 2024\n" + body + b"\n"
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[server]\n"
        'hostname = "mx.example.org"\n'
        'accepted_domains = ["example.org"]\n'
        "[state]\n"
        f'path = "{tmp_path / "state.sqlite"}"\n'
        "[policies.bayes]\n"
        "min_spam = 5\n"
        "min_ham = 5\n",
        encoding="utf-8",
    )
    return path


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def totals(tmp_path: Path) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        store = open_state(StateConfig(path=str(tmp_path / "state.sqlite")), tmp_path)
        try:
            return (await store.get_many("bayes", [TOTALS_KEY])).get(TOTALS_KEY, (0, 0))
        finally:
            await store.close()

    return asyncio.run(read())


def test_learn_takes_a_directory_a_single_file_and_an_mbox_file(
    tmp_path: Path, config: Path
) -> None:
    rng = random.Random(2)
    spam_dir = tmp_path / "spam"
    spam_dir.mkdir()
    for i in range(4):
        (spam_dir / f"{i}.eml").write_bytes(message(True, i, rng))
    single = tmp_path / "one.eml"
    single.write_bytes(message(True, 99, rng))
    out = gateway("learn", "spam", "--config", str(config), str(spam_dir), str(single))
    assert out.returncode == 0, out.stderr
    assert "learned 5 of 5 messages as spam" in out.stdout

    box = tmp_path / "ham.mbox"
    box.write_bytes(mbox([message(False, i, rng) for i in range(6)]))
    out = gateway("learn", "ham", "--config", str(config), str(box))
    assert out.returncode == 0, out.stderr
    assert "learned 6 of 6 messages as ham" in out.stdout
    assert totals(tmp_path) == (5, 6)


def test_learning_the_same_messages_again_changes_nothing(tmp_path: Path, config: Path) -> None:
    single = tmp_path / "one.eml"
    single.write_bytes(message(True, 1, random.Random(3)))
    assert gateway("learn", "spam", "--config", str(config), str(single)).returncode == 0
    again = gateway("learn", "spam", "--config", str(config), str(single))
    assert again.returncode == 0, again.stderr
    assert "learned 0 of 1 messages as spam" in again.stdout
    assert totals(tmp_path) == (1, 0)


def learn_eight_of_each(tmp_path: Path, config: Path, rng: random.Random) -> dict[str, str]:
    """``gateway learn`` on a folder of 8 spam, then one of 8 ham; what each printed."""
    said = {}
    for label, spam in (("spam", True), ("ham", False)):
        folder = tmp_path / label
        folder.mkdir()
        for i in range(8):
            (folder / f"{i}.eml").write_bytes(message(spam, i, rng))
        out = gateway("learn", label, "--config", str(config), str(folder))
        assert out.returncode == 0, out.stderr
        said[label] = out.stdout
    return said


def test_scan_reports_the_learned_probability_after_training(tmp_path: Path, config: Path) -> None:
    rng = random.Random(4)
    learn_eight_of_each(tmp_path, config, rng)
    new = tmp_path / "new.eml"
    new.write_bytes(message(True, 1000, rng))
    out = gateway("scan", "--config", str(config), "--json", str(new))
    assert out.returncode == 0, out.stderr
    names = {s["name"]: s for s in json.loads(out.stdout)["symbols"]}
    assert "BAYES_99" in names
    detail = names["BAYES_99"]["detail"]
    assert float(detail.split()[0]) >= 0.99
    # The message's own strongest tokens, in plain text: why the classifier said so.
    spammiest = detail.partition("spammiest: ")[2].partition(";")[0].rstrip(")").split(", ")
    assert len(spammiest) == 3, detail
    body = new.read_bytes().decode().lower()
    assert all(token.rpartition(":")[2] in body for token in spammiest), detail


def test_learn_retrains_the_logistic_model_and_scan_shows_both_learners(
    tmp_path: Path, config: Path
) -> None:
    config.write_text(config.read_text() + "logistic = true\n", encoding="utf-8")
    rng = random.Random(5)
    said = learn_eight_of_each(tmp_path, config, rng)
    assert "logistic model not trained: 8 spam and 0 ham kept, needs 5 and 5" in said["spam"]
    assert "logistic model trained on 8 spam and 8 ham" in said["ham"]
    new = tmp_path / "new.eml"
    new.write_bytes(message(True, 1000, rng))
    out = gateway("scan", "--config", str(config), "--json", str(new))
    assert out.returncode == 0, out.stderr
    bayes = [s for s in json.loads(out.stdout)["symbols"] if s["name"].startswith("BAYES_")]
    assert "Fisher" in bayes[0]["detail"] and "logistic" in bayes[0]["detail"], bayes
