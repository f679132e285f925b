"""The attacks that use no gradient of the defence (SPSA, HopSkipJump), the k-draw view query attacks see of a
randomised defence, and the L1 threat: each breaks a tiny undefended model, stays in its ball, and is refused a wrong
setting in one sentence."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from carso.attacks import AttackSpec, attack, ascent_direction, eot_logits, predict, project
from carso.data import load_split
from carso.errors import UserError
from carso.evaluation import Threat
from carso.evaluation.families.hopskipjump import hopskipjump
from carso.evaluation.families.spsa import gradient_estimate, margin, spsa
from carso.evaluation.views import DrawAverage
from carso.models import build_classifier
from carso.params import validate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_batch(fm_subset: Path):
    """An untrained small CNN and 16 real test images labelled with its own predictions: every point starts
    correct, so an attack succeeds exactly where it changes the prediction."""
    torch.manual_seed(0)
    model = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28,
                             mean=[0.286], std=[0.353]).eval()
    x, _ = load_split(fm_subset, "test", limit=16)
    return model, x, predict(model, x, CPU, 16)


class Flipper(nn.Module):
    """A randomised defence: `model`'s logits, except that with probability p a draw answers class 0 with certainty
    (its logits one-hot times 50)."""

    def __init__(self, model: nn.Module, p: float) -> None:
        super().__init__()
        self.model, self.p = model, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        flip = torch.rand(len(x), 1) < self.p
        return torch.where(flip, 50 * nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float(), logits)


def test_the_k_draw_view_averages_the_draws_probabilities(model_and_batch) -> None:
    model, x, _ = model_and_batch
    noisy = Flipper(model, 0.3)
    torch.manual_seed(5)
    seen = DrawAverage(noisy, 7)(x).exp()
    torch.manual_seed(5)
    draws = eot_logits(noisy, x, 7).softmax(dim=1).view(7, len(x), -1)  # the same 7 draws, one pass
    assert torch.allclose(seen, draws.mean(dim=0), atol=1e-6)
    assert torch.equal(DrawAverage(model, 1)(x), model(x))  # k = 1: the defence itself


def test_the_k_draw_view_decides_by_majority(model_and_batch) -> None:
    model, x, y = model_and_batch
    keep = y != 0
    x, y = x[keep], y[keep]
    torch.manual_seed(0)
    rare, often = DrawAverage(Flipper(model, 0.2), 41).decide(x), DrawAverage(Flipper(model, 0.8), 41).decide(x)
    assert torch.equal(rare, y) and (often == 0).all()  # 41 draws: the majority is the likelier label, always here
    single = torch.stack([DrawAverage(Flipper(model, 0.5), 1).decide(x) for _ in range(20)])
    assert ((single == 0).any(dim=0) & (single == y).any(dim=0)).all()  # one draw follows the noise


def test_spsa_estimates_the_gradient_of_a_linear_margin() -> None:
    torch.manual_seed(0)
    weight = torch.randn(10, 1 * 8 * 8)
    linear = lambda x: x.flatten(1) @ weight.T  # noqa: E731
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    directions = torch.randint(0, 2, (4096, 4, 1, 8, 8)).float() * 2 - 1
    estimate = gradient_estimate(linear, x, y, directions, delta=0.01)
    xg = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(margin(linear(xg), y).sum(), xg)
    cosine = nn.functional.cosine_similarity(estimate.flatten(1), exact.flatten(1))
    assert (cosine > 0.9).all(), cosine


def reference_spsa(model, x, y, eps, iterations, samples, delta, lr):
    """SPSA on one point as a plain loop over iterations and samples (Uesato et al. 2018, with Adam): each iteration
    draws its +-1 directions as one (samples, 1, ...) tensor, as the batched implementation does for one point."""
    adv, best, best_value = x.clone(), x.clone(), margin(model(x), y).item()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, iterations + 1):
        if best_value < 0:
            break
        directions = torch.randint(0, 2, (samples, 1, *x.shape[1:])).float() * 2 - 1
        grad = torch.zeros_like(x)
        for d in directions:
            grad += (margin(model(adv + delta * d), y) - margin(model(adv - delta * d), y)).item() / (2 * delta) * d
        grad /= samples
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        adv = project(adv - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8), x, eps, "Linf")
        value = margin(model(adv), y).item()
        if value < best_value:
            best, best_value = adv.clone(), value
    return best


@torch.no_grad()
def test_spsa_matches_a_plain_loop_and_breaks_an_undefended_model(model_and_batch) -> None:
    model, x, y = model_and_batch
    settings = dict(iterations=10, samples=8, delta=0.01, lr=0.01)
    wide = copy.deepcopy(model).double()  # float64: a batch and a loop of single images round alike
    for i in range(3):
        xi = x[i:i + 1].double()
        torch.manual_seed(i)
        batched = spsa(wide, xi, y[i:i + 1], Threat("Linf", 0.1), **settings)
        torch.manual_seed(i)
        assert torch.allclose(batched, reference_spsa(wide, xi, y[i:i + 1], 0.1, **settings), atol=1e-9)
    torch.manual_seed(0)
    found = spsa(model, x, y, Threat("Linf", 0.1), **{**settings, "iterations": 20})
    assert (found - x).abs().max() <= 0.1 + 1e-6 and found.min() >= 0 and found.max() <= 1
    broken = (predict(model, found, CPU, 16) != y).float().mean().item()
    assert broken >= 0.5, broken


@torch.no_grad()
def test_hopskipjump_breaks_an_undefended_model_inside_the_ball_only(model_and_batch) -> None:
    model, x, y = model_and_batch
    x, y = x[:6], y[:6]
    view = DrawAverage(model, 1)
    budget = dict(max_iter=5, max_eval=200, init_eval=20)
    torch.manual_seed(0)
    found, queries = hopskipjump(view, x, y, Threat("L2", 3.0), 10, **budget)
    torch.manual_seed(0)
    again, _ = hopskipjump(view, x, y, Threat("L2", 3.0), 10, **budget)
    assert torch.equal(found, again)  # seeded from the torch RNG: reproducible
    moved = (found - x).flatten(1).norm(dim=1) > 0
    assert ((found - x).flatten(1).norm(dim=1) <= 3.0 * (1 + 1e-5)).all() and found.min() >= 0 and found.max() <= 1
    assert torch.equal(moved, predict(model, found, CPU, 6) != y) and moved.float().mean() >= 0.5
    assert (queries > 0).all()
    torch.manual_seed(0)
    tight, _ = hopskipjump(view, x, y, Threat("L2", 1e-3), 10, **budget)
    assert torch.equal(tight, x)  # nothing it found lies within 1e-3: every point counts as not broken


def test_the_l1_threat_projects_into_the_ball_and_the_box() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    far = x + 2 * torch.randn_like(x)
    for eps in (0.5, 5.0):
        inside = project(far, x, eps, "L1")
        assert ((inside - x).flatten(1).abs().sum(dim=1) <= eps * (1 + 1e-4)).all()  # float32 rounding
        assert inside.min() >= 0 and inside.max() <= 1
        assert Threat("L1", eps).contains(inside, x).all()
    near = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(project(near, x, 5.0, "L1"), near, atol=1e-6)  # already inside: untouched


def test_the_l1_step_is_sparse_unit_and_stays_in_the_box() -> None:
    torch.manual_seed(0)
    grad = torch.randn(4, 1, 20, 20)
    x = torch.rand(4, 1, 20, 20)
    x[:, :, :5] = 1.0  # saturated pixels: a step pushing them above 1 is wasted
    step = ascent_direction(grad, "L1", x)
    assert torch.allclose(step.flatten(1).abs().sum(dim=1), torch.ones(4))
    assert ((step != 0).flatten(1).sum(dim=1) <= 20).all()  # the largest 5% of 400 coordinates
    assert not ((x >= 1) & (step > 0)).any()


def test_l1_pgd_breaks_an_undefended_model_inside_the_ball(model_and_batch) -> None:
    model, x, y = model_and_batch
    torch.manual_seed(0)
    x_adv = attack(model, x, y, AttackSpec("pgd", eps=5.0, steps=20, step_size=1.0, norm="L1", loss="dlr"))
    assert ((x_adv - x).flatten(1).abs().sum(dim=1) <= 5.0 * (1 + 1e-4)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (predict(model, x_adv, CPU, 16) != y).float().mean() >= 0.5


def test_query_attacks_refuse_a_wrong_setting_in_one_sentence(tiny_params) -> None:
    bad = copy.deepcopy(tiny_params)
    section = bad["evaluation"]["defences"]["at"]
    section["hopskipjump"] = {"enabled": True, "n_points": 10, "max_iter": 5, "max_eval": 100, "init_eval": 10,
                              "draws": [1]}
    bad["evaluation"]["norm"] = "L1"
    with pytest.raises(UserError, match="hopskipjump' is enabled but evaluation.norm is L1") as caught:
        validate(bad, "params.yaml")
    assert str(caught.value).count(". ") <= 1
    bad = copy.deepcopy(tiny_params)
    bad["evaluation"]["defences"]["at"]["spsa"] = {"enabled": True, "n_points": 10, "iterations": 5, "samples": 0,
                                                   "delta": 0.01, "lr": 0.01, "draws": [1]}
    with pytest.raises(UserError, match="spsa"):
        validate(bad, "params.yaml")
    bad = copy.deepcopy(tiny_params)
    bad["evaluation"]["defences"]["at"]["hopskipjump"]["init_eval"] = 100  # above its max_eval, 40
    with pytest.raises(UserError, match="hopskipjump.init_eval' \\(100\\) is larger than its max_eval \\(40\\)"):
        validate(bad, "params.yaml")
