from __future__ import annotations

import pytest

from carso.stats import summarise, wilson_interval


def test_wilson_matches_hand_computed_values() -> None:
    # 76 of 100 at 95%: centre (0.76 + 1.96^2/200) / (1 + 1.96^2/100), half-width from the Wilson formula
    low, high = wilson_interval(76, 100, 0.95)
    assert low == pytest.approx(0.6676, abs=1e-3)
    assert high == pytest.approx(0.8330, abs=1e-3)


def test_wilson_is_sane_at_the_edges() -> None:
    assert wilson_interval(0, 20)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(20, 20)[1] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_interval_narrows_with_more_points() -> None:
    small = wilson_interval(75, 100)
    large = wilson_interval(750, 1000)
    assert large[1] - large[0] < small[1] - small[0]


def test_summarise_counts_points() -> None:
    s = summarise([True, False, True, True], 0.95)
    assert (s["n"], s["correct"], s["accuracy"]) == (4, 3, 0.75)
    assert s["ci_low"] < 0.75 < s["ci_high"]


def test_the_mean_of_probabilities_gets_wilson_s_interval_at_that_mean() -> None:
    from carso.stats import mean_interval

    verdicts = [1.0] * 76 + [0.0] * 24
    e = mean_interval(verdicts, 0.95)
    assert (e["accuracy"], e["n"]) == (0.76, 100)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx(wilson_interval(76, 100, 0.95), abs=1e-12)
    assert mean_interval([0.0] * 20, 0.95)["ci_low"] == 0 and mean_interval([1.0] * 20, 0.95)["ci_high"] == 1
    spread = mean_interval([0.5, 1.0] * 50, 0.95)  # fractional values: the interval at their mean
    assert spread["accuracy"] == 0.75 and (spread["ci_low"], spread["ci_high"]) == pytest.approx(
        wilson_interval(75, 100, 0.95), abs=1e-12)


def test_the_interval_of_a_mean_probability_covers_its_truth() -> None:
    """Points whose probabilities of a correct answer spread over [0, 1], each estimated from 16 draws: the 90%
    interval of the mean holds the true mean in at least about 90% of 400 repetitions (both noises: the points and
    the draws), and in all of them where only a few points carry fractional values."""
    import numpy as np

    from carso.stats import mean_interval

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        p = rng.beta(0.6, 0.4, size=100)  # the points' true probabilities (mean 0.6)
        estimates = rng.binomial(16, p) / 16
        e = mean_interval(estimates, 0.9)
        hits += e["ci_low"] <= 0.6 <= e["ci_high"]
    assert hits / 400 >= 0.88
    few = 0
    for _ in range(400):  # 18 points never right, 2 right half the time: true mean 0.05
        estimates = np.concatenate([np.zeros(18), rng.binomial(16, 0.5, size=2) / 16])
        e = mean_interval(estimates, 0.9)
        few += e["ci_low"] <= 0.05 <= e["ci_high"]
    assert few == 400


def test_the_sign_flip_test_is_mcnemar_s_on_verdicts_and_exact_enumeration_on_small_cases() -> None:
    import itertools

    from carso.stats import mcnemar_exact, paired_expected, sign_flip_p

    assert sign_flip_p([1.0] * 7 + [-1.0] * 2 + [0.0] * 20) == mcnemar_exact(7, 2)
    d = [0.5, 0.25, 0.75, -0.125, 0.375, 0.625, -0.25, 0.5]
    observed = abs(sum(d))
    exact = sum(abs(sum(s * v for s, v in zip(signs, d))) >= observed - 1e-12
                for signs in itertools.product((-1, 1), repeat=len(d))) / 2 ** len(d)
    assert sign_flip_p(d, flips=200_000) == pytest.approx(exact, abs=0.005)
    same = paired_expected([0.3, 0.9, 1.0], [0.3, 0.9, 1.0], 0.95)
    assert (same["difference"], same["p_value"], same["verdict"]) == (0.0, 1.0, "within noise")
    assert same["ci_low"] <= 0 <= same["ci_high"]
    better = paired_expected([0.9] * 60, [0.5] * 60, 0.95)
    assert better["verdict"] == "real" and better["difference"] == pytest.approx(0.4)
    assert 0.2 < better["ci_low"] < 0.4 < better["ci_high"] < 0.6
    assert (better["more_first"], better["more_second"]) == (60, 0)
    again = paired_expected([0.9, 0.2, 0.6] * 20, [0.5, 0.3, 0.6] * 20, 0.95)
    assert again == paired_expected([0.9, 0.2, 0.6] * 20, [0.5, 0.3, 0.6] * 20, 0.95)  # seeded: reproducible
    assert again["ci_low"] < again["difference"] < again["ci_high"]


def test_the_paired_interval_of_probabilities_is_newcombe_s_on_verdicts() -> None:
    import random

    from carso.stats import paired_difference, paired_expected

    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(5, 120)
        a = [rng.random() < 0.6 for _ in range(n)]
        b = [x if rng.random() < 0.7 else rng.random() < 0.5 for x in a]
        mover = paired_expected([float(x) for x in a], [float(x) for x in b], 0.9)
        newcombe = paired_difference(a, b, 0.9)
        assert (mover["ci_low"], mover["ci_high"]) == pytest.approx((newcombe["ci_low"], newcombe["ci_high"]), abs=1e-12)
