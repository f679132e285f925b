"""The input gradient every attack follows is the true gradient of the defence: the attacks' own gradient
(`carso.attacks._input_gradient`, what PGD and PGD-EoT step along) against central finite differences, in
float64, for each defence on a tiny model with its randomness fixed. A defence or an attack that detached a
part, substituted an identity (BPDA) or lost precision would fail here while "the gradient is non-zero" holds."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from carso.attacks import LOSSES, _input_gradient, attack_loss
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import Inpainter, InpainterConfig
from carso.methods.atop.transforms import TransformConfig
from carso.methods.carso.defence import CarsoDefence
from carso.methods.carso.purifier import Purifier, PurifierConfig
from carso.methods.carso.representation import RepresentationExtractor
from carso.models import build_classifier

MEAN, STD = [0.286], [0.353]


class Seeded(nn.Module):
    """A randomised defence with its randomness fixed: every forward pass draws from the same seed, so the
    defence is one deterministic function whose derivative finite differences can check."""

    def __init__(self, model: nn.Module, seed: int = 7) -> None:
        super().__init__()
        self.model, self.seed = model, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(self.seed)
        return self.model(x)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=MEAN, std=STD,
                            width=4, hidden=16).eval()


def _carso(aggregation: str) -> nn.Module:
    clf = _classifier()
    extractor = RepresentationExtractor(clf)
    purifier = Purifier(PurifierConfig(condition_dim=8, latent_dim=4, decoder_channels=(8, 4, 4)),
                        extractor.shapes(torch.rand(2, 1, 28, 28)), (1, 28, 28), MEAN, STD)
    return CarsoDefence(clf, purifier, extractor, n_samples=3, aggregation=aggregation)


def _atop(kind: str) -> nn.Module:
    clf = _classifier()
    inpainter = Inpainter(InpainterConfig(width=4, refine_width=4, dilations=(2,)), 1)
    return AtopDefence(clf, AtopPurifier(TransformConfig(kind=kind), inpainter))


DEFENCES: dict[str, Callable[[], nn.Module]] = {
    "at": _classifier,
    "carso_peel": lambda: _carso("peel"),
    "carso_logit": lambda: _carso("logit"),
    "carso_prob": lambda: _carso("prob"),
    "atop_rt2": lambda: _atop("rt2"),
    "atop_rt3": lambda: _atop("rt3"),
}


def _directional_derivative(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, loss: str,
                            h: float = 1e-5) -> torch.Tensor:
    """Central finite difference of each point's attack loss along the direction v (one per point). h = 1e-5: on
    an AMD EPYC host the float64 loss of CARSO-prob carries roundoff near 1e-14, which at h = 1e-6 already moved
    the difference quotient by 1e-8 (h = 1e-4 and 1e-5 agree with the analytic gradient to 1e-10)."""
    with torch.no_grad():
        up = attack_loss(model(x + h * v), y, loss)
        down = attack_loss(model(x - h * v), y, loss)
    return (up - down) / (2 * h)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(DEFENCES))
def test_the_attacks_gradient_matches_finite_differences_in_float64(name: str, loss: str) -> None:
    model = Seeded(DEFENCES[name]().double().eval())
    gen = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(3, 1, 28, 28, generator=gen, dtype=torch.float64)  # inside the box: no clipping
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 10  # not the top class: the margin losses are not at a tie
    grad = _input_gradient(model, x, y, autocast=None, eot=1, loss=loss)
    assert grad.dtype == torch.float64 and grad.flatten(1).abs().amax(1).min() > 0
    for direction in range(3):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        v /= v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        numeric = _directional_derivative(model, x, y, v, loss)
        analytic = (grad * v).flatten(1).sum(1)
        assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (direction, analytic, numeric)


def test_the_check_fails_when_the_gradient_skips_the_purifier() -> None:
    """BPDA's identity in place of CARSO's purifier gives a non-zero gradient that is not the defence's: the
    comparison above tells them apart."""
    carso = _carso("logit").double().eval()
    model = Seeded(carso)
    gen = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.tensor([3, 5])
    bpda = _input_gradient(carso.classifier, x, y, autocast=None, loss="ce")  # the classifier alone's gradient
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    numeric = _directional_derivative(model, x, y, v, "ce")
    assert not torch.allclose((bpda * v).flatten(1).sum(1), numeric, rtol=1e-3)
