"""Confidence intervals for bench.quality's rates.

The hard-ham set is small (50 messages tested per split: one message is 2
points), so every rate is printed with an interval:

- :func:`wilson`: the Wilson score interval for a binomial proportion
  (Wilson 1927; Brown, Cai and DasGupta 2001 recommend it over the normal
  approximation, which collapses to zero width at 0 of n). It assumes the
  messages are independent.
- :func:`group_bootstrap`: a percentile bootstrap that resamples whole
  groups (senders, lists, campaigns) rather than messages. Messages of one
  newsletter succeed or fail together, so they are not independent; this
  interval is the wider, more honest one when a few groups dominate a class.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["Z95", "describe", "group_bootstrap", "wilson"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2_000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of ``successes / n``; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Exact ends where the formula's rounding would leave them a hair inside.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def group_bootstrap(
    outcomes: Sequence[tuple[str, bool]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the flagged share, resampling groups with replacement.

    ``outcomes`` is (group, flagged) per tested message. Each resample draws
    as many groups as there are, with replacement, and takes the share of
    flagged messages among all their messages.
    """
    if not outcomes:
        return 0.0, 1.0
    per_group: dict[str, list[int]] = {}
    for group, flagged in outcomes:
        tally = per_group.setdefault(group, [0, 0])
        tally[0] += int(flagged)
        tally[1] += 1
    tallies = list(per_group.values())
    rng = random.Random(seed)
    shares = []
    for _ in range(resamples):
        hits = total = 0
        for hit, n in rng.choices(tallies, k=len(tallies)):
            hits += hit
            total += n
        shares.append(hits / total)
    shares.sort()
    tail = (1 - level) / 2
    low = shares[math.floor(tail * (resamples - 1))]
    high = shares[math.ceil((1 - tail) * (resamples - 1))]
    return low, high


def describe(flagged: int, n: int) -> str:
    """``"2.00% (1/50, 95% CI 0.35-10.50%)"``: a rate with its Wilson interval."""
    low, high = wilson(flagged, n)
    rate = 100 * flagged / n if n else 0.0
    return f"{rate:.2f}% ({flagged}/{n}, 95% CI {100 * low:.2f}-{100 * high:.2f}%)"
