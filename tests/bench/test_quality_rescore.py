"""bench.quality_rescore: a dumped verdict re-scored, without the corpus."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from bench.quality_rescore import main, parse_scores, rescore

FIVE = Decimal("5.0")


def row(cls: str, action: str, forced_by: str | None = None, **symbols: float) -> dict:
    score = sum(symbols.values())
    flagged = action in ("add_header", "quarantine", "reject")
    return {
        "class": cls,
        "file": "x",
        "score": score,
        "action": action,
        "flagged": flagged,
        "forced_by": forced_by,
        "symbols": symbols,
    }


def test_a_score_change_moves_the_sum_and_a_forced_floor_stays() -> None:
    rows = [
        row("spam", "relay", BAYES_80=4.0, BODY_ACT_NOW=0.5),  # 4.5: caught at BAYES_80 4.5
        row("ham", "relay", BAYES_80=4.0),  # 4.0 -> 4.5: near the threshold, not flagged
        row("ham", "add_header", "scores.ATTACH_BLOCKED_EXT", ATTACH_BLOCKED_EXT=8.0),
        row("hard-ham", "add_header", BAYES_95=4.3, BODY_ACT_NOW=1.0),  # 5.3 -> 4.8
    ]
    before = rescore(rows, {}, FIVE)
    assert before.flagged == {"spam": 0, "ham": 1, "hard-ham": 1} and before.near_ham == 1
    after = rescore(
        rows, parse_scores(["BAYES_80=4.5", "ATTACH_BLOCKED_EXT=0", "BODY_ACT_NOW=0.5"]), FIVE
    )
    assert after.flagged == {"spam": 1, "ham": 1, "hard-ham": 0}  # the forced floor holds
    assert after.near_ham == 1


@pytest.mark.parametrize("bad", ["BAYES_80", "=3", "BAYES_80=high"])
def test_a_malformed_score_says_what_was_wrong(bad: str) -> None:
    with pytest.raises(SystemExit, match="is not SYMBOL=score"):
        parse_scores([bad])


def test_the_command_prints_each_dump_and_the_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        rows = [row("spam", "relay", BAYES_60=2.5, SUBJ_FREE=0.5)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "BAYES_60=4.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a.jsonl: spam 1/1 (100.00%)")
    assert out[-1].startswith("pooled: spam 2/2 (100.00%)")
