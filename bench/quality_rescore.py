"""Re-score ``bench.quality --dump`` rows with other symbol scores, without re-running.

    python -m bench.quality --split grouped --develop --dump g1.jsonl
    python -m bench.quality_rescore g1.jsonl t1.jsonl                 # as dumped
    python -m bench.quality_rescore g1.jsonl t1.jsonl BAYES_80=3.5 BODY_ACT_NOW=0

A score change moves only the sum: every row carries each symbol's score and
what a floor forced (``forced_by``), so each message's new verdict is exact
(round 5 checked it against end-to-end runs, docs/quality.md) and a grid of
scores takes seconds instead of a minute per split. What it cannot re-score:
rules that did not fire, and anything the classifier would learn differently.

Point it at ``--develop`` dumps only: scores are never chosen on a test half.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.quality import FLAGGED, ROOT

__all__ = ["Tally", "parse_scores", "rescore", "rescore_row"]

NEAR = Decimal("1.0")  # easy ham this close under the threshold is "near": the margin left


@dataclass
class Tally:
    """Flagged / tested per class, and easy ham within :data:`NEAR` of the threshold."""

    tested: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    near_ham: int = 0

    def add(self, cls: str, flagged: bool, near: bool) -> None:
        self.tested[cls] = self.tested.get(cls, 0) + 1
        self.flagged[cls] = self.flagged.get(cls, 0) + flagged
        self.near_ham += near

    def line(self) -> str:
        rates = [
            f"{cls} {self.flagged[cls]}/{n} ({100 * self.flagged[cls] / n:.2f}%)"
            for cls, n in self.tested.items()
        ]
        return ", ".join(rates) + f"; easy ham within {NEAR} of the threshold: {self.near_ham}"


def parse_scores(pairs: Iterable[str]) -> dict[str, Decimal]:
    """``["BAYES_80=3.5"]`` -> ``{"BAYES_80": Decimal("3.5")}``; a clear error otherwise."""
    out: dict[str, Decimal] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        try:
            if not eq or not name:
                raise ValueError
            out[name] = Decimal(value)
        except (ArithmeticError, ValueError):
            raise SystemExit(f'bench.quality_rescore: "{pair}" is not SYMBOL=score') from None
    return out


def rescore_row(
    row: Mapping[str, Any], scores: Mapping[str, Decimal], threshold: Decimal
) -> tuple[bool, Decimal]:
    """(flagged, new score) of one dumped message with ``scores`` replacing its symbols'."""
    symbols: Mapping[str, float] = row["symbols"]
    total = sum(
        (scores.get(name, Decimal(str(value))) for name, value in symbols.items()),
        Decimal("0"),
    )
    # A forced floor (GTUBE, a blocked attachment, a rule's action) stays whatever the sum.
    forced = row.get("forced_by") is not None and row["action"] in FLAGGED
    return forced or total >= threshold, total


def rescore(
    rows: Iterable[Mapping[str, Any]], scores: Mapping[str, Decimal], threshold: Decimal
) -> Tally:
    tally = Tally()
    for row in rows:
        flagged, total = rescore_row(row, scores, threshold)
        near = row["class"] == "ham" and not flagged and total >= threshold - NEAR
        tally.add(row["class"], flagged, near)
    return tally


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if rows and "forced_by" not in rows[0]:
        raise SystemExit(f"{path}: a dump without forced_by; re-run bench.quality --dump")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality_rescore", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "items", nargs="+", help="bench.quality --dump files, then SYMBOL=score changes"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "config.example.toml")
    args = parser.parse_args(argv)
    dumps = [Path(item) for item in args.items if "=" not in item]
    scores = parse_scores(item for item in args.items if "=" in item)
    actions = tomllib.loads(args.config.read_text(encoding="utf-8")).get("actions", {})
    threshold = Decimal(str(actions.get("add_header", 5.0)))
    pooled: list[dict[str, Any]] = []
    for path in dumps:
        rows = _rows(path)
        pooled.extend(rows)
        print(f"{path.name}: {rescore(rows, scores, threshold).line()}")
    if len(dumps) > 1:
        print(f"pooled: {rescore(pooled, scores, threshold).line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
