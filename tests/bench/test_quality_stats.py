"""bench.quality's confidence intervals."""

from __future__ import annotations

import pytest

from bench.quality_stats import describe, group_bootstrap, wilson


def test_wilson_matches_published_values() -> None:
    # Brown, Cai and DasGupta (2001) / any table: 1 of 50 -> 0.35%..10.50%
    low, high = wilson(1, 50)
    assert low == pytest.approx(0.003539, abs=1e-5)
    assert high == pytest.approx(0.104954, abs=1e-5)
    low, high = wilson(237, 250)
    assert low == pytest.approx(0.91308, abs=1e-4)
    assert high == pytest.approx(0.96936, abs=1e-4)


def test_wilson_ends_and_bad_input() -> None:
    assert wilson(0, 50)[0] == 0.0
    assert 0.07 < wilson(0, 50)[1] < 0.072  # not zero width, unlike the normal approximation
    assert wilson(50, 50)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_group_bootstrap_is_wider_when_failures_cluster_in_one_group() -> None:
    spread = [(f"g{i}", i < 5) for i in range(100)]  # 5 failures in 5 groups
    clustered = [("big", True)] * 5 + [(f"g{i}", False) for i in range(95)]  # in one group
    s_low, s_high = group_bootstrap(spread, seed=1)
    c_low, c_high = group_bootstrap(clustered, seed=1)
    assert s_low <= 0.05 <= s_high
    assert c_low <= 0.05 <= c_high
    assert c_high - c_low >= s_high - s_low
    assert group_bootstrap([], seed=1) == (0.0, 1.0)
    assert group_bootstrap([("a", False)] * 10) == (0.0, 0.0)


def test_describe_prints_rate_counts_and_interval() -> None:
    assert describe(1, 50) == "2.00% (1/50, 95% CI 0.35-10.50%)"
