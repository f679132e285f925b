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
