"""SPSA (Uesato et al. 2018, "Adversarial risk and the dangers of evaluating against weak attacks"): a score-based
attack that estimates the gradient of the margin loss from finite differences along random +-1 directions, and
follows it with Adam, projected onto the threat's ball. It reads only the defence's outputs (through the k-draw view,
`carso.evaluation.views`), so no masking of gradients can blind it. No maintained package ships it (advertorch does
not import on torch 2; cleverhans pulls tensorflow): this is the algorithm as published, checked against a plain
loop in tests/test_query_attacks.py."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from carso.attacks import attack_loss
from carso.evaluation.families import Attack, Target
from carso.evaluation.families._query import attacks
from carso.evaluation.threat import Threat

PASS_IMAGES = 1024  # queries per forward pass (times the view's draws)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per point: positive while the point is classified correctly (SPSA minimises it); the
    negated `cw` attack loss."""
    return -attack_loss(logits, y, "cw")


@torch.no_grad()
def gradient_estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor,
                      delta: float, chunk: int = PASS_IMAGES) -> torch.Tensor:
    """SPSA's estimate of the margin's gradient at `x` (B points) from `directions` (S, B, ...) of +-1 entries:
    the mean over them of (f(x + delta v) - f(x - delta v)) / (2 delta) * v; the 2 S B queries in passes of at most
    `chunk` images."""
    s = len(directions)
    probes = torch.cat([x[None] + delta * directions, x[None] - delta * directions]).flatten(0, 1)
    logits = torch.cat([model(part) for part in probes.split(chunk)])
    values = margin(logits, y.repeat(2 * s)).view(2, s, len(x))
    slope = (values[0] - values[1]) / (2 * delta)  # (S, B)
    return (slope.view(s, len(x), *([1] * (x.dim() - 1))) * directions).mean(dim=0)


@torch.no_grad()
def spsa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, iterations: int, samples: int,
         delta: float, lr: float) -> torch.Tensor:
    """SPSA on a batch: `iterations` Adam steps (learning rate `lr`) on the margin, each from `samples` random
    directions (2 x samples queries per point), every iterate projected onto the threat's ball and [0, 1]. A point
    stops, and keeps its iterate, once the margin is below 0 (misclassified by the queries it sees); the others
    return their lowest-margin iterate. Draws from the global torch RNG (the caller seeds it)."""
    x_adv = x.clone()
    best, best_margin = x.clone(), margin(model(x), y)
    active = best_margin >= 0
    moment, second = torch.zeros_like(x), torch.zeros_like(x)
    beta1, beta2, tiny = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        directions = torch.randint(0, 2, (samples, len(idx), *x.shape[1:]), device=x.device).to(x.dtype) * 2 - 1
        grad = gradient_estimate(model, x_adv[idx], y[idx], directions, delta)
        moment[idx] = beta1 * moment[idx] + (1 - beta1) * grad
        second[idx] = beta2 * second[idx] + (1 - beta2) * grad ** 2
        step = lr * (moment[idx] / (1 - beta1 ** t)) / ((second[idx] / (1 - beta2 ** t)).sqrt() + tiny)
        x_adv[idx] = threat.project(x_adv[idx] - step, x[idx])
        value = margin(model(x_adv[idx]), y[idx])
        better = value < best_margin[idx]
        best[idx[better]], best_margin[idx[better]] = x_adv[idx[better]], value[better]
        active[idx[value < 0]] = False
    return best


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """SPSA with `cfg.spsa`'s budget (absent or disabled: none), one run per k of its `draws`."""
    section = cfg.get("spsa")
    if not section or not section["enabled"]:
        return []
    settings = {k: section[k] for k in ("iterations", "samples", "delta", "lr")}
    title = f"SPSA ({section['iterations']} x {2 * section['samples']} queries)"

    def craft(view: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {"x_adv": spsa(view, x, y, target.threat, **settings)}

    return attacks(target, "spsa", title, section, settings, craft)
