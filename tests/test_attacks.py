"""Attacks stay inside the eps-ball and [0, 1], and raise the loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from carso.attacks import project, square_attack, AttackSpec, attack, attack_loss, gradient_diagnostics
from carso.data import load_split
from carso.models import build_classifier


@pytest.fixture(scope="module")
def model_and_batch(fm_subset: Path):
    torch.manual_seed(0)
    model = build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28,
                             mean=[0.286], std=[0.353]).eval()
    x, y = load_split(fm_subset, "test", limit=64)
    return model, x, y


SPECS = [AttackSpec("fgsm", eps=0.1, steps=1, step_size=0.1, random_start=False),
         AttackSpec("fgsm", eps=0.1, steps=1, step_size=0.125, random_start=True),
         AttackSpec("pgd", eps=0.1, steps=10, step_size=0.025),
         AttackSpec("pgd", eps=0.03, steps=5, step_size=0.01, restarts=3)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-eps{s.eps}-r{s.restarts}")
def test_attack_stays_in_ball_and_box(model_and_batch, spec: AttackSpec) -> None:
    model, x, y = model_and_batch
    x_adv = attack(model, x, y, spec)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= spec.eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: f"{s.method}-eps{s.eps}")
def test_attack_raises_the_loss(model_and_batch, spec: AttackSpec) -> None:
    model, x, y = model_and_batch
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y).item()
        adv_loss = F.cross_entropy(model(attack(model, x, y, spec)), y).item()
    assert adv_loss > clean_loss + 0.05


def test_pgd_beats_fgsm_on_loss(model_and_batch) -> None:
    model, x, y = model_and_batch
    fgsm = attack(model, x, y, SPECS[0])
    pgd = attack(model, x, y, SPECS[2])
    with torch.no_grad():
        assert F.cross_entropy(model(pgd), y) >= F.cross_entropy(model(fgsm), y) - 1e-4


def test_attack_under_bf16_autocast_still_respects_the_ball(model_and_batch) -> None:
    model, x, y = model_and_batch
    x_adv = attack(model, x, y, SPECS[2], torch.autocast("cpu", dtype=torch.bfloat16))
    assert (x_adv - x).abs().max().item() <= 0.1 + 1e-6
    assert x_adv.dtype == torch.float32


def test_restarts_never_weaken_the_attack(model_and_batch) -> None:
    model, x, y = model_and_batch
    torch.manual_seed(1)
    one = attack(model, x, y, AttackSpec("pgd", eps=0.03, steps=3, step_size=0.01, restarts=1))
    torch.manual_seed(1)
    three = attack(model, x, y, AttackSpec("pgd", eps=0.03, steps=3, step_size=0.01, restarts=3))
    with torch.no_grad():
        assert (model(three).argmax(1) == y).sum() <= (model(one).argmax(1) == y).sum()


def test_eot_averages_gradients_over_repeated_passes(model_and_batch) -> None:
    model, x, y = model_and_batch
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    x_adv = attack(model, x, y, AttackSpec("pgd", eps=0.1, steps=3, step_size=0.03, eot=4))
    handle.remove()
    assert len(calls) == 3 * 4
    assert (x_adv - x).abs().max().item() <= 0.1 + 1e-6


def test_eot_on_a_deterministic_model_equals_plain_pgd(model_and_batch) -> None:
    model, x, y = model_and_batch
    torch.manual_seed(5)
    plain = attack(model, x, y, AttackSpec("pgd", eps=0.1, steps=3, step_size=0.03))
    torch.manual_seed(5)
    eot = attack(model, x, y, AttackSpec("pgd", eps=0.1, steps=3, step_size=0.03, eot=2))
    assert torch.allclose(plain, eot, atol=1e-6)


class Steep(torch.nn.Module):
    """A model's logits scaled up steeply: the same decisions, but the cross-entropy of every point it classifies
    correctly is exactly 0 in fp32, and so is its input gradient (what `peel` does to CARSO's output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return 1e6 * self.model(x)


def test_pgd_stops_on_points_whose_gradient_is_exactly_zero(model_and_batch) -> None:
    model, x, _ = model_and_batch
    y = model(x).argmax(1)  # every point correct: a saturated loss everywhere
    steep = Steep(model)
    spec = AttackSpec("pgd", eps=1e-4, steps=20, step_size=1e-4, zero_grad_patience=3)  # no decision flips
    torch.manual_seed(0)
    x_adv = attack(steep, x, y, spec)
    assert steep.calls == 3 * len(x)  # three blind steps, then nothing left to attack
    torch.manual_seed(0)
    start = (x + torch.empty_like(x).uniform_(-1e-4, 1e-4)).clamp(0, 1)
    assert torch.equal(x_adv, start)  # a zero gradient never moved a point


def test_pgd_with_patience_equals_plain_pgd_where_gradients_are_informative(model_and_batch) -> None:
    model, x, y = model_and_batch
    plain = AttackSpec("pgd", eps=0.03, steps=5, step_size=0.01)
    runs = []
    for spec in (plain, AttackSpec(**{**plain.__dict__, "zero_grad_patience": 2})):
        torch.manual_seed(0)
        runs.append(attack(model, x, y, spec))
    assert torch.equal(runs[0], runs[1])


def test_gradient_diagnostics_see_a_saturated_loss(model_and_batch) -> None:
    model, x, _ = model_and_batch
    y = model(x).argmax(1)
    steep = gradient_diagnostics(Steep(model), x, y, eot=2, device=torch.device("cpu"), batch_size=32)
    plain = gradient_diagnostics(model, x, y, eot=1, device=torch.device("cpu"), batch_size=32)
    assert steep["points"] == plain["points"] == len(x)
    assert steep["zero_gradient_share"] == steep["zero_loss_share"] == 1.0 and steep["median_gradient_l1"] == 0
    assert plain["zero_gradient_share"] == plain["zero_loss_share"] == 0.0 and plain["median_gradient_l1"] > 0
    assert steep["nonfinite_share"] == plain["nonfinite_share"] == 0.0
    for loss in ("dlr", "cw"):  # the margin losses keep their gradient on the steep output
        margin = gradient_diagnostics(Steep(model), x, y, eot=1, device=torch.device("cpu"), batch_size=32, loss=loss)
        assert margin["zero_gradient_share"] == 0.0 and margin["median_gradient_l1"] > 0


def test_attack_losses_match_hand_computed_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    # cw: best other logit minus the true one; dlr: that over the gap between the 1st and 3rd largest logit
    assert attack_loss(logits, y, "cw").tolist() == [1.0 - 3.0, 5.0 - 2.0]
    assert attack_loss(logits, y, "dlr").tolist() == pytest.approx([-2.0 / (3.0 - 0.0), 3.0 / (5.0 - 1.0)])
    ce = [-torch.log_softmax(logits[i], 0)[y[i]].item() for i in range(2)]
    assert attack_loss(logits, y, "ce").tolist() == pytest.approx(ce)
    assert attack_loss(7 * logits + 3, y, "dlr").tolist() == pytest.approx(attack_loss(logits, y, "dlr").tolist())
    with pytest.raises(ValueError, match="unknown attack loss"):
        attack_loss(logits, y, "hinge")


def test_a_steeply_scaled_output_blinds_cross_entropy_pgd_but_not_the_margin_losses(model_and_batch) -> None:
    model, x, _ = model_and_batch
    y = model(x).argmax(1)  # every point correct to start with
    steep = Steep(model)
    broken = {}
    for loss in ("ce", "dlr", "cw"):
        torch.manual_seed(0)
        x_adv = attack(steep, x, y, AttackSpec("pgd", eps=0.1, steps=10, step_size=0.025, loss=loss))
        broken[loss] = (model(x_adv).argmax(1) != y).float().mean().item()
    torch.manual_seed(0)
    plain = attack(model, x, y, AttackSpec("pgd", eps=0.1, steps=10, step_size=0.025))
    assert broken["ce"] < 0.2 < (model(plain).argmax(1) != y).float().mean().item()  # CE PGD is blind on it
    assert broken["dlr"] > 0.5 and broken["cw"] > 0.5


def test_l2_projection_keeps_points_in_the_ball_and_in_the_unit_box() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    far = x + 3 * torch.randn_like(x)  # far outside both the ball and [0, 1]
    near = x + 0.01 * torch.randn_like(x)  # already inside the ball: only the box may move it
    for eps in (0.5, 2.0):
        for x_adv in (project(far, x, eps, "L2"), project(near, x, eps, "L2")):
            assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
            assert x_adv.min() >= 0 and x_adv.max() <= 1
    inside = project(near, x, 2.0, "L2")
    assert torch.allclose(inside, near.clamp(0, 1))  # inside the ball: untouched but for the box
    with pytest.raises(ValueError, match="unknown norm"):
        project(x, x, 0.5, "L0")  # L1 is a threat now (tests/test_query_attacks.py); L0 is none


def test_l2_pgd_stays_in_the_ball_and_breaks_what_it_should(model_and_batch) -> None:
    model, x, y = model_and_batch
    torch.manual_seed(0)
    x_adv = attack(model, x, y, AttackSpec("pgd", eps=1.5, steps=10, step_size=0.3, norm="L2", loss="dlr"))
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.1  # an L2 step concentrates where the gradient is: no L-inf box at 1.5 / 28
    assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


class Linear(torch.nn.Module):
    """A tiny linear classifier on 1 x 8 x 8 images (3 classes), whose nearest adversarial points are known."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 64, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.t()


def test_square_finds_the_adversarial_points_of_a_tiny_linear_model() -> None:
    model = Linear()
    torch.manual_seed(1)
    x = torch.rand(64, 1, 8, 8) * 0.5 + 0.25  # away from the box's edges: the L-inf ball is all free to move in
    y = model(x).argmax(1)
    eps = 0.03

    def breakable(radius: float) -> torch.Tensor:  # a linear model's best L-inf attack moves each pixel by radius
        with torch.no_grad():
            logits = model(x)
            diff = model.w[y][:, None, :] - model.w[None, :, :]  # (n, classes, 64)
            worst = logits.gather(1, y[:, None]) - logits - radius * diff.abs().sum(dim=2)
            return worst.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), float("inf")).amin(dim=1) < 0

    assert 5 < breakable(eps).sum() < len(x)  # some points can be broken at eps, some provably cannot
    x_adv = square_attack(model, x, y, eps, "Linf", n_queries=1000, p_init=0.8, seed=0, device=torch.device("cpu"))
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    fooled = model(x_adv).argmax(1) != y
    assert not fooled[~breakable(eps)].any()  # nothing Square reports is impossible
    assert fooled[breakable(0.5 * eps)].all()  # it finds every point breakable with room to spare,
    assert fooled[breakable(eps)].float().mean() >= 0.75  # and most of those that need the whole ball
