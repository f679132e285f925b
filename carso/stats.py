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
