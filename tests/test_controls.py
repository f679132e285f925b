"""Positive controls (carso.methods.controls), defences known to be broken, and the indicators of attack failure.

Each control wraps a small classifier trained without adversarial training on the real Fashion-MNIST subset: its
naive attack leaves it near its clean accuracy, the protocol brings it down to the undefended model's figure, and
the indicator that catches the naive figure fires. Then the indicators' own mechanics, on inputs whose answer is
known: best-iterate PGD, the straight-through surrogate, incomplete optimisation, FGSM against PGD, and the report's
first sentence on the controls."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carso import evaluation
from carso.evaluation import checks
from carso.attacks import AttackSpec, pgd_single, pgd_tracked
from carso.data import dataset_spec, load_split
from carso.defences import DEFENCES
from carso.methods.controls.defence import Quantised, ResizePad, ScaledLogits, quantise
from carso.models import build_classifier
from carso.report import controls_sentence, positive_controls
from carso.verdicts import Verdict

CPU = torch.device("cpu")
N = 40


@pytest.fixture(scope="module")
def plain(fm_subset: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small classifier trained without adversarial training on the subset's 400 training images, the first N test
    points it is evaluated on, and PGD points crafted on it (the stored transfer attack's stand-in)."""
    torch.manual_seed(0)
    x, y = load_split(fm_subset, "train")
    spec = dataset_spec("fashion_mnist")
    model = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=spec.mean, std=spec.std,
                             width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):
        for i in torch.randperm(len(y)).split(50):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    model.eval()
    xt, yt = load_split(fm_subset, "test")
    xt, yt = xt[:N], yt[:N]
    transfer = pgd_single(model, xt, yt, AttackSpec("pgd", eps=0.1, steps=20, step_size=0.02))
    return model, xt, yt, transfer


def _cfg(randomised: bool = False, surrogate: dict[str, Any] | None = None) -> dict[str, Any]:
    eot = 4 if randomised else 1
    run = {"steps": 20, "step_size": 0.02, "eot": eot, "restarts": 1, "zero_grad_patience": 5}
    pgd = [{"loss": "ce", **run}, {"loss": "dlr", **run}]
    if surrogate:
        pgd.append({"loss": "ce", **run, "surrogate": surrogate})
    return {"n_points": N, "batch_size": N, "verdict_draws": 8, "verdict_repeats": 2 if randomised else 1, "pgd": pgd,
            "autoattack": {"enabled": False, "version": "rand" if randomised else "standard"},
            "square": {"enabled": True, "n_queries": 300, "p_init": 0.8},
            "sanity": {"n_points": N, "large_eps": 0.95, "large_eps_steps": 10, "more_steps_factor": 2}}


def _evaluate(model: nn.Module, plain: tuple, tmp_path: Path, cfg: dict[str, Any], naive: tuple[str, ...] = (),
              surrogates: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    _, x, y, transfer = plain
    metrics, _, _ = evaluation.evaluate_defence(model, x, y, transfer, {"eps": 0.1, "confidence": 0.95}, cfg, CPU, 0,
                                                tmp_path, surrogates, naive=naive)
    return metrics


def _fired(metrics: dict[str, Any], indicator: str) -> list[str]:
    return [i["attack"] for i in metrics["indicators"] if i["indicator"] == indicator and i["fired"]]


@pytest.fixture(scope="module")
def base_figure(plain: tuple, tmp_path_factory: pytest.TempPathFactory) -> float:
    """The undefended classifier's worst case under the same protocol (the figure each control must come down to)."""
    metrics = _evaluate(plain[0], plain, tmp_path_factory.mktemp("plain"), _cfg())
    assert metrics["clean_subset"]["accuracy"] >= 0.6  # a classifier worth attacking
    return metrics["robust_worst_case"]["accuracy"]


def test_scaled_logits_fool_pgd_on_cross_entropy_and_the_protocol_breaks_them(plain: tuple, base_figure: float,
                                                                              tmp_path: Path) -> None:
    model = ScaledLogits(plain[0], 1e4)
    m = _evaluate(model, plain, tmp_path, _cfg(), naive=DEFENCES["ctl_scaled"].naive)
    clean = m["clean_subset"]["accuracy"]
    assert m["naive"]["accuracy"] >= clean - 0.05  # PGD on cross-entropy: a zero gradient, nothing moves
    assert m["robust_worst_case"]["accuracy"] <= base_figure + 0.05
    assert "ce" in _fired(m, "zero_gradient") and "dlr" not in _fired(m, "zero_gradient")


def test_input_quantisation_fools_every_white_box_pgd_and_falls_to_square_transfer_and_bpda(
        plain: tuple, base_figure: float, tmp_path: Path) -> None:
    model = Quantised(plain[0], 16)
    surrogate = {"pgd_ce_surrogate": Quantised(plain[0], 16, straight_through=True)}
    m = _evaluate(model, plain, tmp_path, _cfg(surrogate={"controls.quantise.straight_through": True}),
                  naive=DEFENCES["ctl_quant"].naive, surrogates=surrogate)
    clean = m["clean_subset"]["accuracy"]
    assert m["naive"]["accuracy"] >= clean - 0.05
    assert m["attacks"]["pgd_ce_surrogate"]["accuracy"] <= base_figure + 0.05  # BPDA alone breaks it
    assert m["robust_worst_case"]["accuracy"] <= base_figure + 0.05
    assert set(_fired(m, "zero_gradient")) == {"ce", "dlr", "cw"}
    # the unbounded check starts from the clean points: a zero gradient leaves them there, at clean accuracy
    assert all(abs(e["accuracy"] - clean) < 1e-9 for e in m["sanity"]["large_eps"].values())
    assert any("starting from the clean points" in line for line in m["gradient_masking"])


def test_random_resize_and_pad_is_brought_down_by_eot_and_repeated_verdicts(plain: tuple, base_figure: float,
                                                                            tmp_path: Path) -> None:
    m = _evaluate(ResizePad(plain[0], 0.95), plain, tmp_path, _cfg(randomised=True), naive=DEFENCES["ctl_resize"].naive)
    assert m["randomised"]
    assert m["naive"]["attacks"] == ["eot_single"] and "eot_single" in m["sanity"]
    assert m["robust_worst_case"]["accuracy"] <= base_figure + 0.1
    gain = next(i for i in m["indicators"] if i["indicator"] == "eot_gain")  # one draw per step against EoT 4
    assert gain["single"] == pytest.approx(m["sanity"]["eot_single"]["accuracy"])
    assert _fired(m, "unstable_predictions") == ["clean"]


def test_straight_through_quantiser_has_the_identity_gradient_and_the_real_verdicts(plain: tuple) -> None:
    model, x = plain[0], plain[1][:8].clone().requires_grad_(True)
    real, bpda = Quantised(model, 16), Quantised(model, 16, straight_through=True)
    assert torch.equal(real(x).argmax(1), bpda(x).argmax(1))
    (g_real,) = torch.autograd.grad(real(x).sum(), x)
    (g_bpda,) = torch.autograd.grad(bpda(x).sum(), x)
    q = quantise(x.detach(), 16).requires_grad_(True)
    (g_identity,) = torch.autograd.grad(model(q).sum(), q)  # the classifier's gradient where the rounding landed
    assert g_real.abs().max() == 0 and torch.allclose(g_bpda, g_identity)


class PassThrough(nn.Module):
    """Two classes, the true one 0. The logit of class 1 rises with the mean pixel (gradient +10 everywhere) but
    drops by 100 past 0.6 (a step without gradient): ascent from 0.25 fools the model from 0.35 to 0.55, then
    leaves the fooled region and ends correct."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1).mean(1)
        h = 10 * v - 3 - 100 * (v.detach() > 0.6).float()
        return torch.stack([torch.zeros_like(h), h], 1)


def test_best_iterate_pgd_returns_the_point_found_mid_run_when_the_last_iterate_is_correct() -> None:
    model, x, y = PassThrough(), torch.full((1, 1, 2, 2), 0.25), torch.zeros(1, dtype=torch.long)
    spec = AttackSpec("pgd", eps=0.5, steps=6, step_size=0.1, random_start=False)
    last = pgd_single(model, x, y, spec)
    assert model(last).argmax(1).item() == 0  # the last iterate is correct: a plain PGD reports the point robust
    best, trace = pgd_tracked(model, x, y, spec)
    assert model(best).argmax(1).item() == 1 and trace["picked"].item() == 3  # 0.55: fooled, with the highest loss
    assert trace["best"].item() == 0 and trace["last"].item() == 1
    assert [round(c) for c in trace["correct"][0].tolist()] == [1, 0, 0, 0, 1, 1, 1]


def _trace(losses: list[float], correct: float = 1.0) -> dict[str, torch.Tensor]:
    loss = torch.tensor([losses] * 4)
    return {"loss": loss, "correct": torch.full_like(loss, correct), "picked": torch.zeros(4, dtype=torch.long),
            "last": torch.full((4,), correct), "best": torch.full((4,), correct)}


def test_incomplete_optimisation_fires_only_while_the_loss_of_unbroken_points_still_rises() -> None:
    run = evaluation.PgdRun("pgd_ce", AttackSpec("pgd", eps=0.1, steps=20))
    idx = torch.arange(4)
    rising = [i / 20 for i in range(21)]
    flat = [min(i, 10) / 10 for i in range(21)]
    fired = lambda tr: next(i for i in checks._trace_indicators(run, idx, tr)  # noqa: E731
                            if i["indicator"] == "incomplete_optimisation")["fired"]
    assert fired(_trace(rising)) and not fired(_trace(flat))
    assert not fired(_trace(rising, correct=0.0))  # broken from the start: nothing left to optimise


def test_fgsm_beating_pgd_fires_only_when_clearly_more_points_fall_to_one_step() -> None:
    n = 40
    results = {"gradients": {}, "sanity": {}, "strongest_pgd": "pgd_ce", "attacks": {}}
    cascade = SimpleNamespace(m=n)
    run = [evaluation.PgdRun("pgd_ce", AttackSpec("pgd", eps=0.1, steps=20))]

    def fired(fgsm_broken: int) -> bool:
        fgsm = torch.ones(n, dtype=torch.bool)
        fgsm[:fgsm_broken] = False
        standalone = {"pgd_ce": Verdict.certain(torch.ones(n, dtype=torch.bool)), "fgsm": Verdict.certain(fgsm)}
        found = evaluation.indicators(results, standalone, {}, cascade, run, 0.95)
        return next(i for i in found if i["indicator"] == "fgsm_beats_pgd")["fired"]

    assert fired(20) and not fired(1)


def _control_facts(control_correct: int, n: int = 40) -> tuple[dict, dict]:
    entry = lambda k: {"accuracy": k / n, "ci_low": 0.0, "ci_high": 1.0, "n": n, "confidence": 0.95,  # noqa: E731
                       "strict": {"accuracy": k / n}}
    evals = {"plain": {"robust_worst_case": entry(0), "indicators": []},
             "ctl_quant": {"robust_worst_case": entry(control_correct), "naive": {**entry(n), "titles": ["PGD"]},
                           "indicators": [{"indicator": "zero_gradient", "attack": "ce", "fired": True,
                                           "severity": "failure"}]}}
    outcomes = {"plain": ([0.0] * n, [False] * n),
                "ctl_quant": ([1.0] * control_correct + [0.0] * (n - control_correct),
                              [True] * control_correct + [False] * (n - control_correct))}
    return evals, outcomes


def test_the_reports_controls_sentence_follows_the_metrics() -> None:
    evals, outcomes = _control_facts(control_correct=1)
    broken = controls_sentence(positive_controls(evals, outcomes, DEFENCES), DEFENCES)[0]
    assert broken.startswith("The protocol broke every positive control") and "`ctl_quant` 2.5%" in broken
    evals, outcomes = _control_facts(control_correct=30)  # a control the protocol left standing
    failed = controls_sentence(positive_controls(evals, outcomes, DEFENCES), DEFENCES)[0]
    assert failed.startswith("EVALUATION FAILED") and "`ctl_quant`" in failed
