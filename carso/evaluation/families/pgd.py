"""PGD and PGD-EoT (`carso.attacks.pgd_tracked`: each point's best iterate, the trajectory for the indicators), one
attack per run of `evaluation.defences.<name>.pgd`, each with its loss and EoT draws, through a surrogate's gradients
where the run names one (BPDA-style)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from carso.attacks import AttackSpec
from carso.defences import overrides_text
from carso.evaluation.cascade import Cascade, Runner
from carso.evaluation.families import Attack, Target
from carso.params import pgd_run_name
from carso.verdicts import Verdict


def pgd_eot_spec(eps: float, steps: int = 200, eot: int = 20, reference_step: float = 0.007,
                 reference_eps: float = 8 / 255) -> AttackSpec:
    """PGD with Expectation over Transformation as in Lee & Kim (2023): 200 steps, 20 EoT samples per
    step, cross-entropy; the step size is theirs (0.007 at eps 8/255) scaled to the configured eps."""
    return AttackSpec("pgd", eps=eps, steps=steps, step_size=reference_step * eps / reference_eps, eot=eot)


def pgd_spec(eps: float, cfg: dict[str, Any], norm: str = "Linf", pass_images: int | None = None) -> AttackSpec:
    """One run of `evaluation.defences.<name>.pgd` as an AttackSpec. step_size null: Lee & Kim's step scaled to
    eps (L-inf), or 2.5 eps / steps (L2 and L1, Madry et al.'s rule)."""
    if cfg["step_size"] is not None:
        step = cfg["step_size"]
    else:
        step = pgd_eot_spec(eps).alpha if norm == "Linf" else 2.5 * eps / cfg["steps"]
    return AttackSpec("pgd", eps=eps, steps=cfg["steps"], step_size=step, eot=cfg["eot"], restarts=cfg["restarts"],
                      zero_grad_patience=cfg["zero_grad_patience"], loss=cfg.get("loss", "ce"), norm=norm,
                      pass_images=pass_images)


@dataclass(frozen=True)
class PgdRun:
    """One PGD(-EoT) run of a defence's suite. With `surrogate` (dotted params.yaml keys and their values) its
    gradients come from the defence built with those settings (BPDA-style), while its verdicts are the real
    defence's."""

    name: str
    spec: AttackSpec
    surrogate: dict[str, Any] | None = None

    @property
    def title(self) -> str:
        via = f", gradients through {overrides_text(self.surrogate)}" if self.surrogate else ""
        return f"PGD-{self.spec.steps} ({self.spec.loss}, EoT {self.spec.eot}{via})"


def pgd_runs(eps: float, norm: str, cfgs: list[dict[str, Any]], pass_images: int | None = None) -> list[PgdRun]:
    """`evaluation.defences.<name>.pgd` (a list of runs) in the order given; EoT draws batched up to `pass_images`."""
    return [PgdRun(pgd_run_name(c), pgd_spec(eps, c, norm, pass_images), c.get("surrogate") or None) for c in cfgs]


def strongest(runs: list[PgdRun], cascade: Cascade, verdicts: dict[str, Verdict]) -> PgdRun:
    """The PGD run (not through a surrogate) that left the least accuracy on the subset, by the selection draws (the
    estimate draws only ever give figures); the first listed on a tie."""
    own = [r for r in runs if r.surrogate is None] or runs
    return min(own, key=lambda r: cascade.standalone(verdicts[r.name]).select.sum().item())


def crafted(target: Target, name: str, spec: AttackSpec, x_start: torch.Tensor | None = None,
            source: nn.Module | None = None, tag: dict[str, Any] | None = None) -> Runner:
    """An attack crafted batch by batch (resumable, the cache) on `source` (a surrogate's model, named by `tag`; by
    default the defence) at the points `idx`, judged by the judge on the defence; its trajectory goes to
    `target.traces[name]`."""
    def run(idx: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
        x_adv, trace = target.cache.run(name, target.model if source is None else source, target.x[idx],
                                        target.y[idx], spec, target.device, target.batch_size,
                                        x_start=None if x_start is None else x_start[idx], tag=tag)
        target.traces[name] = (idx, trace)
        return target.judge(x_adv, target.y[idx]), x_adv
    return run


def runs_of(target: Target, cfg: dict[str, Any]) -> list[PgdRun]:
    """The PGD runs of a defence's section at the target's threat."""
    return pgd_runs(target.threat.eps, target.threat.norm, cfg["pgd"], target.pass_images)


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """One attack per PGD run, in the order listed."""
    out = []
    for run in runs_of(target, cfg):
        info = {"kind": "pgd", "title": run.title, "loss": run.spec.loss, "steps": run.spec.steps,
                "eot": run.spec.eot, "step_size": run.spec.alpha, "restarts": run.spec.restarts,
                "zero_grad_patience": run.spec.zero_grad_patience, "surrogate": run.surrogate}
        source = target.surrogates[run.name] if run.surrogate else None
        out.append(Attack(run.name, info, crafted(target, run.name, run.spec, source=source, tag=run.surrogate)))
    return out
