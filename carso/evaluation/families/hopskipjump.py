"""HopSkipJump (Chen, Jordan and Wainwright 2020), the Adversarial Robustness Toolbox's implementation: a
decision-based attack that sees only the defence's labels (through the k-draw view's majority,
`carso.evaluation.views`). It is a minimum-norm attack: it walks along the decision boundary towards the clean point
and returns the closest misclassified point it found, at whatever distance. A point counts as broken only if that
point lies inside the threat's ball and the judge's fresh draws say so; a farther one is replaced by the clean point.
L-inf and L2 only (ART has no L1 version)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from carso.evaluation.families import Attack, Target
from carso.evaluation.families._query import attacks
from carso.evaluation.threat import Threat
from carso.evaluation.views import DrawAverage

NORMS = {"Linf": np.inf, "L2": 2}
INIT_TRIES = 100  # random uniform images tried as each point's starting adversarial (ART's init_size)


class _Labels:
    """The view's majority labels as the one-hot scores ART's black-box classifier wants, counting the queries."""

    def __init__(self, view: DrawAverage, device: torch.device, classes: int) -> None:
        self.view, self.device, self.classes, self.queries = view, device, classes, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.queries += len(x)
        labels = self.view.decide(torch.from_numpy(np.ascontiguousarray(x)).to(self.device)).cpu()
        return torch.nn.functional.one_hot(labels, self.classes).numpy().astype(np.float32)


def starting_points(view: DrawAverage, x: torch.Tensor, y: torch.Tensor, tries: int = INIT_TRIES
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A misclassified starting point per point: the first of `tries` uniform random images (from the global torch
    RNG, so a seeded batch is reproducible; ART's own search draws from an unseeded generator) that the view labels
    other than `y`. Returns them and whether one was found."""
    noise = torch.rand(tries, *x.shape[1:], device=x.device)
    labels = view.decide(noise)
    other = labels[None, :] != y[:, None]  # (B, tries)
    found = other.any(dim=1)
    return noise[other.float().argmax(dim=1)], found


def hopskipjump(view: DrawAverage, x: torch.Tensor, y: torch.Tensor, threat: Threat, classes: int, max_iter: int,
                max_eval: int, init_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HopSkipJump on a batch (untargeted, ART's loop, one point after another), then the threat's rule: a point
    whose adversarial lies outside the ball gets its clean point back. Returns the points and the queries each took.
    Seeds numpy's global RNG (ART's gradient estimates use it) from the torch RNG."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    np.random.seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    start, found = starting_points(view, x, y)
    labels = _Labels(view, x.device, classes)
    art_model = BlackBoxClassifier(labels, tuple(x.shape[1:]), classes, clip_values=(0.0, 1.0))
    attack = HopSkipJump(art_model, batch_size=256, targeted=False, norm=NORMS[threat.norm], max_iter=max_iter,
                         max_eval=max_eval, init_eval=init_eval, verbose=False)
    x_adv = x.clone()
    sel = found.nonzero().squeeze(1)  # a point without a misclassified start stays clean (ART would search unseeded)
    if len(sel):
        as_np = lambda t: t.detach().cpu().numpy().astype(np.float32)  # noqa: E731
        x_adv[sel] = torch.from_numpy(attack.generate(as_np(x[sel]), x_adv_init=as_np(start[sel]))).to(x)
    inside = threat.contains(x_adv, x)
    x_adv[~inside] = x[~inside]
    queries = torch.full((len(x),), labels.queries / max(1, len(x)))
    return x_adv, queries


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """HopSkipJump with `cfg.hopskipjump`'s budget (absent or disabled: none), one run per k of its `draws`."""
    section = cfg.get("hopskipjump")
    if not section or not section["enabled"]:
        return []
    if target.threat.norm not in NORMS:  # carso.params refuses such a params file
        raise ValueError(f"HopSkipJump (ART) has no {target.threat.norm} version, only {', '.join(NORMS)}")
    settings = {k: section[k] for k in ("max_iter", "max_eval", "init_eval")}
    title = f"HopSkipJump ({section['max_iter']} iterations, decisions only)"
    with torch.no_grad():
        classes = int(target.model(target.x[:1].to(target.device)).shape[1])

    def craft(view: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        x_adv, queries = hopskipjump(view, x, y, target.threat, classes, **settings)
        return {"x_adv": x_adv, "queries": queries}

    return attacks(target, "hopskipjump", title, section, settings, craft)
