"""bench.quality's seed lists: the one piece that runs without the corpus."""

from __future__ import annotations

from bench.quality import parse_seeds


def test_seed_ranges_and_lists() -> None:
    assert parse_seeds("21-23") == [21, 22, 23]
    assert parse_seeds("1,4,7") == [1, 4, 7]
    assert parse_seeds("1-3, 9") == [1, 2, 3, 9]
    assert parse_seeds("5") == [5]
    assert parse_seeds("1-3,2") == [1, 2, 3]
