"""The headline of a randomised defence measures the defence, not its noise: the attacker picks, the judge re-draws
(carso.verdicts). Against a defence whose error rate is known in advance the headline is that rate, however many
attacks run, while the strict rule falls towards 0; a point an attack picked with a noisy check of its own counts by
the judge's fresh draws only; picking the strongest attack per point with the same draws that judge it would bias
the figure down, which the second set of draws avoids."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from carso import evaluation
from carso.evaluation.families import autoattack as autoattack_family, square as square_family
from conftest import tracked
from carso.attacks import AttackSpec
from carso.stats import wilson_interval

CPU = torch.device("cpu")


class Flip(nn.Module):
    """A defence that answers the label written in its input (pixel (0, 0) = label / 10), except that at every pass
    each answer flips to another class with probability `p[point]`: its expected accuracy is 1 - p whatever an
    attack does (its gradient is zero), and a point is classified correctly K times in a row with probability
    (1 - p)^K. The point's id is in pixel (0, 1) (id / 1000)."""

    def __init__(self, p: float | torch.Tensor) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 10).round().long()
        ids = (x[:, 0, 0, 1] * 1000).round().long()
        p = self.p[ids] if isinstance(self.p, torch.Tensor) else torch.full((len(x),), self.p)
        wrong = torch.rand(len(x)) < p
        target = torch.where(wrong, (label + 1) % 10, label)
        return 10 * nn.functional.one_hot(target, 10).to(x.dtype) + 0 * x.flatten(1).sum(1, keepdim=True)


def _points(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 10
    x = torch.full((n, 1, 28, 28), 0.5)
    x[:, 0, 0, 0] = y / 10
    x[:, 0, 0, 1] = torch.arange(n) / 1000
    return x, y


def _moved(x: torch.Tensor) -> torch.Tensor:
    """`x` with a pixel the defence ignores set at random: another attack's points, never the same tensor twice (the
    judge seeds its draws from the points it judges)."""
    out = x.clone()
    out[:, 0, -1, -1] = torch.rand(len(x))
    return out


def _no_attack(monkeypatch: pytest.MonkeyPatch, flagged: list[int] | None = None) -> None:
    """Every attack returns the points it was given, moved where the defence does not look (none can move this
    defence); AutoAttack's own verdict says `flagged` (indices into the points it runs on) were broken, as a noisy
    check of its own may."""
    def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
            x_start: torch.Tensor | None = None) -> torch.Tensor:
        return _moved(x if x_start is None else x_start)

    def autoattack(model, x, y, eps, version, device, bs, seed, state_path, norm="Linf", pass_images=None):
        flags = torch.ones(len(x), dtype=torch.bool)
        flags[[i for i in (flagged or []) if i < len(x)]] = False
        return flags, _moved(x)

    monkeypatch.setattr(evaluation.cache, "pgd_tracked", tracked(pgd))
    monkeypatch.setattr(autoattack_family, "run_autoattack", autoattack)
    monkeypatch.setattr(square_family, "square_attack", lambda model, x, *a, **k: _moved(x))


def _cfg(n: int, draws: int, repeats: int, subset: int) -> dict[str, Any]:
    pgd = {"steps": 2, "step_size": 0.01, "eot": 2, "restarts": 1, "zero_grad_patience": None}
    return {"n_points": n, "batch_size": n, "verdict_draws": draws, "verdict_repeats": repeats,
            "pgd": [{"loss": "dlr", **pgd}, {"loss": "ce", **pgd}],
            "autoattack": {"enabled": True, "version": "rand"},
            "square": {"enabled": True, "n_queries": 5, "p_init": 0.8},
            "sanity": {"n_points": subset, "large_eps": 0.95, "large_eps_steps": 1, "more_steps_factor": 2}}


def _evaluate(model: nn.Module, n: int, cfg: dict[str, Any], tmp_path: Path) -> tuple[dict, Any]:
    x, y = _points(n)
    metrics, _, worst = evaluation.evaluate_defence(model, x, y, _moved(x), {"eps": 0.1, "confidence": 0.95}, cfg,
                                                    CPU, 0, tmp_path)
    return metrics, worst


def _covers(entry: dict[str, Any], value: float) -> bool:
    return entry["ci_low"] <= value <= entry["ci_high"]


def test_the_headline_of_a_defence_wrong_with_probability_p_is_1_minus_p_and_the_strict_rule_about_1_minus_p_to_the_k(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    p, k, n = 0.3, 5, 400
    _no_attack(monkeypatch)
    metrics, worst = _evaluate(Flip(p), n, _cfg(n, draws=32, repeats=k, subset=100), tmp_path)
    clean, robust = metrics["clean_subset"], metrics["robust_worst_case"]
    assert metrics["randomised"] and (metrics["verdict_draws"], metrics["verdict_repeats"]) == (32, k)
    for entry in (clean, robust):  # no attack moves it: the expected accuracy is 1 - p, before and after the suite
        assert _covers(entry, 1 - p) and abs(entry["accuracy"] - (1 - p)) < 0.03 and entry["n"] == n
    assert _covers(clean["strict"], (1 - p) ** k)  # one set of K verdicts per point
    attacks = len(metrics["cascade"])  # transfer, AutoAttack, Square, two PGD runs, the continued PGD, FGSM, EoT 1
    assert attacks == 8 and robust["strict"]["accuracy"] < 0.02  # about (1 - p)^(K x 8): the rule, not the defence
    # picking the minimum over 7 candidates with the draws that judge it would understate the defence
    assert worst.select.mean().item() < worst.estimate.mean().item() - 0.05
    for name, a in metrics["attacks"].items():  # each attack alone, on the subset: still about 1 - p
        assert abs(a["accuracy"] - (1 - p)) < 0.05 and a["strict"]["accuracy"] < 0.1, name


def test_a_point_an_attack_picked_with_a_noisy_check_of_its_own_counts_by_the_judges_fresh_draws(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AutoAttack calls points 0-9 broken (as its one-pass check may, by noise); the defence is wrong there only 10%
    of the time. The judge's fresh draws decide: those points count about 0.9 each, not 0."""
    n = 40
    _no_attack(monkeypatch, flagged=list(range(10)))
    metrics, worst = _evaluate(Flip(0.1), n, _cfg(n, draws=32, repeats=2, subset=20), tmp_path)
    assert worst.estimate[:10].mean().item() > 0.8 and worst.ok[:10].any()
    assert metrics["attacks"]["autoattack"]["accuracy"] > 0.8


def test_a_deterministic_defence_keeps_autoattack_s_own_verdict(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Without noise AutoAttack's verdict is the same classification as the judge's: a point it broke stays broken
    (here, points 0-9, which the stub calls broken), and the two rules give one figure."""
    n = 40
    _no_attack(monkeypatch, flagged=list(range(10)))
    metrics, worst = _evaluate(Flip(0.0), n, _cfg(n, draws=32, repeats=2, subset=20), tmp_path)
    assert not metrics["randomised"] and metrics["verdict_draws"] == metrics["verdict_repeats"] == 1
    assert worst.ok.tolist() == [i >= 10 for i in range(n)] and worst.estimate.tolist() == [float(i >= 10) for i in range(n)]
    robust = metrics["robust_worst_case"]
    assert robust["accuracy"] == robust["strict"]["accuracy"] == 0.75
    assert (robust["ci_low"], robust["ci_high"]) == pytest.approx(wilson_interval(30, 40, 0.95))


def test_the_cascade_skips_only_points_no_picking_draw_found_correct(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Points the defence always gets wrong are attacked by nothing past the subset; points it gets right even once
    in a while go on being attacked, and a strictly broken point is not dropped for that alone."""
    n, subset = 30, 10
    p = torch.zeros(n)
    p[20:25] = 1.0   # always wrong: no picking draw correct clean
    p[25:] = 0.5     # wrong half the time: strictly broken almost surely, still attacked
    _no_attack(monkeypatch)
    metrics, worst = _evaluate(Flip(p), n, _cfg(n, draws=16, repeats=4, subset=subset), tmp_path)
    steps = {s["attack"]: s["attacked_points"] for s in metrics["cascade"]}
    assert steps["transfer"] == steps["pgd_ce"] == n - 5
    assert worst.estimate[20:25].tolist() == [0.0] * 5 and 0.2 < worst.estimate[25:].mean().item() < 0.8


def test_the_cascade_replay_at_threshold_0_is_the_cascade_itself(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """bench/cascade_replay.py replays a recorded cascade at other thresholds; at 0 it must give the headline the
    evaluation reported, and a higher threshold never spends more."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from cascade_replay import record_cascade, replay

    p = torch.zeros(60)
    p[30:] = torch.linspace(0.2, 1.0, 30)  # a spread of error rates past the subset
    _no_attack(monkeypatch)
    for name in ("__init__", "record"):  # the patch below is undone after the test
        monkeypatch.setattr(evaluation.Cascade, name, getattr(evaluation.Cascade, name))
    records = record_cascade()
    metrics, _ = _evaluate(Flip(p), 60, _cfg(60, draws=16, repeats=4, subset=20), tmp_path)
    headline, seconds = replay(records, 0)
    assert headline == pytest.approx(metrics["robust_worst_case"]["accuracy"], abs=1e-12)
    assert [r["name"] for r in records] == ["clean", *(s["attack"] for s in metrics["cascade"])]
    assert replay(records, 0.5)[1] <= seconds
