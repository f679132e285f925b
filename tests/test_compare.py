"""The paired tests that say whether two runs differ for real (carso.compare; carso.stats), against hand-computed
cases and an independent implementation (scipy's exact binomial test): on per-point verdicts the headline's sign-flip
test is McNemar's exact test."""
from __future__ import annotations

import random

import pytest

from carso.stats import paired_outcomes
from carso.stats import mcnemar_exact, paired_verdicts as paired_test


def _outcomes(verdicts: list[bool]) -> tuple[list[float], list[bool]]:
    return [float(v) for v in verdicts], verdicts


def test_identical_verdicts_are_no_difference() -> None:
    verdicts = [True, False, True, True, False] * 8
    t = paired_test(verdicts, verdicts, 0.95)
    assert (t["difference"], t["only_first"], t["only_second"], t["p_value"]) == (0.0, 0, 0, 1.0)
    assert t["verdict"] == "within noise"


@pytest.mark.parametrize("only_first, only_second, p, verdict", [
    (10, 0, 2 / 2 ** 10, "real"),             # every disagreement one way, on enough points
    (6, 0, 2 / 2 ** 6, "real"),
    (5, 0, 2 / 2 ** 5, "within noise"),       # the same, on too few points: 0.0625
    (7, 2, 2 * (1 + 9 + 36) / 2 ** 9, "within noise"),
    (0, 12, 2 / 2 ** 12, "real"),             # either direction
    (4, 4, 1.0, "within noise"),
])
def test_mcnemar_against_hand_computed_cases(only_first: int, only_second: int, p: float, verdict: str) -> None:
    both = 20  # points both runs kept: they do not enter the test
    first = [True] * both + [True] * only_first + [False] * only_second + [False] * 5
    second = [True] * both + [False] * only_first + [True] * only_second + [False] * 5
    t = paired_test(first, second, 0.95)
    assert (t["only_first"], t["only_second"]) == (only_first, only_second)
    assert t["p_value"] == pytest.approx(p, rel=1e-12) and t["verdict"] == verdict
    assert t["difference"] == pytest.approx((only_first - only_second) / len(first))
    headline = paired_outcomes(_outcomes(first), _outcomes(second), 0.95)  # deterministic: the same test
    assert (headline["ci_low"], headline["ci_high"]) == pytest.approx((t["ci_low"], t["ci_high"]))  # and interval
    assert headline["p_value"] == pytest.approx(p, rel=1e-12) and headline["verdict"] == verdict
    assert (headline["more_first"], headline["more_second"]) == (only_first, only_second)
    assert headline["strict"]["p_value"] == t["p_value"]


def test_mcnemar_agrees_with_scipy_s_exact_binomial_test() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(200):
        b, c = rng.randint(0, 60), rng.randint(0, 60)
        expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15), (b, c)


def test_the_level_decides_the_verdict() -> None:
    first, second = [True] * 6 + [False] * 4, [False] * 6 + [False] * 4  # p = 2 / 64 = 0.03125
    assert paired_test(first, second, 0.95)["verdict"] == "real"
    assert paired_test(first, second, 0.99)["verdict"] == "within noise"
