"""Confidence intervals for accuracies measured on a finite number of test points."""
from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0 and 1 and for small n)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def summarise(correct: list[bool] | None, confidence: float, successes: int | None = None,
              n: int | None = None) -> dict[str, float | int]:
    """Accuracy, number of points and its confidence interval, as one metrics entry."""
    if correct is not None:
        successes, n = sum(bool(c) for c in correct), len(correct)
    assert successes is not None and n is not None
    low, high = wilson_interval(successes, n, confidence)
    return {"accuracy": successes / n if n else 0.0, "n": n, "correct": successes,
            "ci_low": low, "ci_high": high, "confidence": confidence}


def paired_difference(first: list[bool], second: list[bool], confidence: float = 0.95) -> dict[str, float | int]:
    """Difference of two accuracies measured on the same points (first - second), with Newcombe's
    hybrid score interval for paired proportions (his method 10), which accounts for the pairing."""
    n = len(first)
    assert n == len(second) and n > 0
    both = sum(f and s for f, s in zip(first, second))
    only_first = sum(f and not s for f, s in zip(first, second))
    only_second = sum(s and not f for f, s in zip(first, second))
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson_interval(both + only_first, n, confidence)
    l2, u2 = wilson_interval(both + only_second, n, confidence)
    margins = [(both + only_first), (only_second + neither), (both + only_second), (only_first + neither)]
    denom = math.sqrt(math.prod(margins)) if all(margins) else 0.0
    phi = (both * neither - only_first * only_second) / denom if denom else 0.0
    delta = p1 - p2
    low = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"difference": delta, "n": n, "ci_low": max(-1.0, low), "ci_high": min(1.0, high),
            "only_first": only_first, "only_second": only_second, "confidence": confidence}
