"""Confidence intervals and paired tests for accuracies measured on a finite number of test points.

Two kinds of per-point outcome: a verdict (correct or not: a deterministic defence, or the strict rule of a randomised
one) and a probability of a correct answer, estimated from fresh draws of a randomised defence (the headline, see
carso.verdicts). A verdict is the special case of a probability that is 0 or 1, and every procedure here for
probabilities reduces to the classical one for verdicts: Wilson's interval, Newcombe's paired interval, McNemar's
exact test.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

SIGN_FLIPS = 20_000  # sign-flip test of a difference when it cannot be computed exactly (seeded: reproducible)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _wilson(p: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson's score interval around the proportion `p` observed on `n` (possibly effective, so real) trials."""
    z = _z(confidence)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0 and 1 and for small n)."""
    if n == 0:
        return 0.0, 1.0
    low, high = _wilson(successes / n, n, confidence)
    return (0.0 if successes == 0 else low), (1.0 if successes == n else high)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """The mean of per-point probabilities in [0, 1] (each estimated from fresh draws of a defence) with Wilson's
    score interval at that mean over the n points.

    Each value carries two noises, which points were drawn and each point's own draws; whatever their mix, a value
    in [0, 1] with mean p has variance at most p(1 - p) (the law of total variance bounds both together), so the
    binomial variance p(1 - p) / n that Wilson's interval uses covers both. This is Korn & Graubard's (1998) interval
    at the effective number of points with the design effect truncated at 1, as they recommend: it never claims
    more certainty than n verdicts would give, also where few points carry fractional values and their spread is
    a poor estimate. On values of 0 and 1 (a deterministic defence) it is Wilson's interval on n points exactly."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"accuracy": 0.0, "n": 0, "ci_low": 0.0, "ci_high": 1.0}
    p = float(x.mean())
    low, high = _wilson(p, n, confidence)
    return {"accuracy": p, "n": n, "ci_low": 0.0 if p <= 0 else low, "ci_high": 1.0 if p >= 1 else high}


def summarise(correct: list[bool] | None, confidence: float, successes: int | None = None,
              n: int | None = None) -> dict[str, float | int]:
    """Accuracy, number of points and its confidence interval, as one metrics entry."""
    if correct is not None:
        successes, n = sum(bool(c) for c in correct), len(correct)
    assert successes is not None and n is not None
    low, high = wilson_interval(successes, n, confidence)
    return {"accuracy": successes / n if n else 0.0, "n": n, "correct": successes,
            "ci_low": low, "ci_high": high, "confidence": confidence}


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: under no difference, each of the b + c discordant points is equally likely to
    favour either side (a binomial with p = 1/2)."""
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def sign_flip_p(differences: Sequence[float], flips: int = SIGN_FLIPS, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip (randomisation) test of per-point differences: under no difference
    between the two sides each point's difference is as likely to have either sign, so the observed sum is compared
    with the sums of every sign pattern. Exact where all non-zero differences have one size (per-point verdicts:
    then it is McNemar's exact test), else from `flips` seeded random patterns, with Phipson & Smyth's (2010) +1 so
    that it is never 0."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    size = np.abs(d)
    if np.allclose(size, size[0], rtol=1e-9, atol=0):
        return mcnemar_exact(int((d > 0).sum()), int((d < 0).sum()))
    observed = abs(d.sum()) - 1e-9 * size.sum()  # ties within rounding count as extreme
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, flips, 2_000):
        signs = rng.integers(0, 2, size=(min(2_000, flips - start), len(d))) * 2 - 1
        extreme += int((np.abs(signs @ size) >= observed).sum())
    return (1 + extreme) / (1 + flips)


def paired_expected(first: Sequence[float], second: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """`first` minus `second`, two defences' per-point probabilities of a correct answer on the same points: the mean
    difference, its interval, and the sign-flip test's p-value, which decides the verdict ("real" when
    p < 1 - confidence).

    The interval is Newcombe's hybrid score interval for paired proportions (his method 10) in its general form, the
    method of variance estimates recovery (MOVER; Zou & Donner 2008): each side's own interval (`mean_interval`,
    which covers both the points and the draws) and the correlation of the two sides' per-point values. On per-point
    verdicts (0 or 1) it is exactly Newcombe's interval (`paired_difference`) and the test is McNemar's exact test."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    assert a.shape == b.shape and len(a) > 0
    ea, eb = mean_interval(a, confidence), mean_interval(b, confidence)
    p1, l1, u1 = ea["accuracy"], ea["ci_low"], ea["ci_high"]
    p2, l2, u2 = eb["accuracy"], eb["ci_low"], eb["ci_high"]
    phi = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    delta = p1 - p2
    low = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    d = a - b
    p = sign_flip_p(d)
    return {"difference": delta, "n": len(d), "ci_low": max(-1.0, low), "ci_high": min(1.0, high), "p_value": p,
            "verdict": "real" if p < 1 - confidence else "within noise", "more_first": int((d > 0).sum()),
            "more_second": int((d < 0).sum()), "confidence": confidence, "interval": "Newcombe (MOVER)",
            "test": "sign-flip"}


def paired_verdicts(first: Sequence[bool], second: Sequence[bool], confidence: float = 0.95) -> dict[str, Any]:
    """`first` minus `second`, two sets of per-point verdicts on the same points: Newcombe's paired interval and
    McNemar's exact test, which decides the verdict ("real" when p < 1 - confidence)."""
    d = paired_difference(list(first), list(second), confidence)
    p = mcnemar_exact(d["only_first"], d["only_second"])
    return {**d, "p_value": p, "verdict": "real" if p < 1 - confidence else "within noise",
            "more_first": d["only_first"], "more_second": d["only_second"], "interval": "Newcombe", "test": "McNemar"}


def paired_outcomes(first: tuple[Sequence[float], Sequence[bool]], second: tuple[Sequence[float], Sequence[bool]],
                    confidence: float = 0.95) -> dict[str, Any]:
    """`first` minus `second`, one defence's per-point outcomes (headline probability, strict verdict) in two
    evaluations, on the first points both attacked: the headline's paired test (`paired_expected`) with the strict
    rule's (`paired_verdicts`) under `strict`, and each side's headline on those points."""
    (pa, sa), (pb, sb) = first, second
    n = min(len(pa), len(pb))
    return {**paired_expected(pa[:n], pb[:n], confidence), "strict": paired_verdicts(sa[:n], sb[:n], confidence),
            "acc_first": sum(pa[:n]) / n, "acc_second": sum(pb[:n]) / n}


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
