"""The checks a suite runs beside its attacks: each attack loss's gradient diagnostics, and the gradient-masking
probes on the standalone subset (more steps, one FGSM step, one EoT draw per step, an unbounded attack)."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from carso.attacks import LOSSES, AttackSpec, gradient_diagnostics
from carso.evaluation.cascade import Cascade, Runner
from carso.evaluation.families import Target
from carso.evaluation.families.pgd import PgdRun, crafted
from carso.verdicts import Verdict, scatter, seed_from

log = logging.getLogger(__name__)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_pgd: torch.Tensor, idx: torch.Tensor, eot: int,
               device: torch.device, bs: int, pass_images: int | None) -> dict[str, Any]:
    """Each attack loss's gradient diagnostics on the subset's clean-correct points, clean and after PGD."""
    out = {}
    for loss in LOSSES:
        seed_from(x[idx])
        out[loss] = {"clean": gradient_diagnostics(model, x[idx], y[idx], eot, device, bs, loss, pass_images),
                     "pgd_final": gradient_diagnostics(model, x_pgd[idx], y[idx], eot, device, bs, loss, pass_images)}
        zero = [100 * out[loss][k].get("zero_gradient_share", 0) for k in ("clean", "pgd_final")]
        log.info("%s gradient exactly zero on %.0f%% of %d clean points, %.0f%% after PGD", loss, zero[0], len(idx),
                 zero[1])
    return out


def sanity(target: Target, cascade: Cascade, verdicts: dict[str, Verdict],
           step: Callable[[str, torch.Tensor, Runner], None], strongest: PgdRun, x_pgd: torch.Tensor,
           losses: list[str], cfg: dict[str, Any], conf: float) -> dict[str, Any]:
    """Gradient-masking checks on the standalone subset: the strongest PGD run continued to `more_steps_factor` x
    its steps (from where it stopped, on the points it left correct: the others keep its verdict; it joins the
    worst case); one FGSM step from the clean point with its loss and draws (iterative must beat single-step; it
    joins the worst case); for a randomised defence the same run with one draw per step instead of its EoT (the EoT
    gain; it joins the worst case); and PGD at a very large eps from the clean point with each attack loss of the
    suite (on every point of the subset; another threat model, never in the worst case: a gradient that is exactly
    zero leaves the points where they were, clean, so the check sees it). `verdicts` gains `base_steps`,
    `more_steps`, `fgsm`, `eot_single` (randomised) and `large_eps_<loss>`."""
    spec = strongest.spec
    base = verdicts[strongest.name]
    out: dict[str, Any] = {"base_steps": cascade.standalone(base).entry(conf, steps=spec.steps, run=strongest.name)}
    more = base
    if cfg["more_steps_factor"] > 1:
        extra = replace(spec, steps=(cfg["more_steps_factor"] - 1) * spec.steps, random_start=False, restarts=1)
        survivors = (cascade.subset & (cascade.clean.select > 0) & (base.select > 0)).nonzero().squeeze(1)
        step("more_steps", survivors, crafted(target, "pgd_more_steps", extra, x_start=x_pgd))
        more = verdicts["more_steps"] & base
    verdicts.update(base_steps=base, more_steps=more)
    out["more_steps"] = cascade.standalone(more).entry(conf, steps=cfg["more_steps_factor"] * spec.steps,
                                                       run=strongest.name)
    fgsm = AttackSpec("fgsm", eps=spec.eps, steps=1, step_size=spec.eps, random_start=False, eot=spec.eot,
                      loss=spec.loss, norm=spec.norm, pass_images=spec.pass_images)
    step("fgsm", cascade.targets(subset_only=True), crafted(target, "fgsm", fgsm))
    out["fgsm"] = cascade.standalone(verdicts["fgsm"]).entry(conf, loss=spec.loss, eot=spec.eot)
    if target.judge.randomised and spec.eot > 1:
        step("eot_single", cascade.targets(subset_only=True), crafted(target, "pgd_eot_single", replace(spec, eot=1)))
        out["eot_single"] = cascade.standalone(verdicts["eot_single"]).entry(conf, run=strongest.name, eot=1,
                                                                             steps=spec.steps)
    out["large_eps"] = {}
    subset = torch.arange(cascade.m)  # every point of the subset, misclassified clean or not: its figure must fall too
    for loss in losses:
        large = AttackSpec("pgd", eps=cfg["large_eps"], steps=cfg["large_eps_steps"], eot=spec.eot, loss=loss,
                           random_start=False, zero_grad_patience=spec.zero_grad_patience, norm=spec.norm,
                           pass_images=spec.pass_images)
        name = f"large_eps_{loss}"
        verdicts[name] = scatter(crafted(target, f"pgd_{name}", large)(subset)[0], subset, len(x_pgd))
        out["large_eps"][loss] = verdicts[name].head(cascade.m).entry(conf, eps=cfg["large_eps"],
                                                                      steps=cfg["large_eps_steps"])
    log.info("sanity on %d points: %s %d steps %.4f -> %d steps %.4f; eps %.3g: %s", out["base_steps"]["n"],
             strongest.name, spec.steps, out["base_steps"]["accuracy"], out["more_steps"]["steps"],
             out["more_steps"]["accuracy"], cfg["large_eps"],
             ", ".join(f"{k} {e['accuracy']:.4f}" for k, e in out["large_eps"].items()))
    return out
