"""Attacks stay inside the eps-ball and [0, 1], and raise the loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from carso.attacks import AttackSpec, attack
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
