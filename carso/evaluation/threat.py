"""The threat model an evaluation attacks in: a norm and a radius, as one small value passed to every attack."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from carso.attacks import NORMS, distance, inside, project


@dataclass(frozen=True)
class Threat:
    """Perturbations of at most `eps` in `norm` (Linf, L2 or L1) around a point of [0, 1]^d; `name` labels it in the
    metrics and the report (e.g. the key of `evaluation.threats`)."""

    norm: str
    eps: float
    name: str = ""

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        if not self.eps > 0:
            raise ValueError(f"a threat's radius must be positive, not {self.eps!r}")

    @property
    def label(self) -> str:
        return f"{self.norm} eps {self.eps:.4g}"

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x_adv` moved into this ball around `x` and into [0, 1]."""
        return project(x_adv, x, self.eps, self.norm)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-point distance in this threat's norm."""
        return distance(x_adv, x, self.norm)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, slack: float = 1e-4) -> torch.Tensor:
        """Per point: does `x_adv` lie in this ball and in [0, 1] (`carso.attacks.inside`)?"""
        return inside(x_adv, x, self.eps, self.norm, slack)


def unseen_section(cfg: dict[str, Any], threat: dict[str, Any]) -> dict[str, Any]:
    """The suite a defence gets under an unseen threat (`evaluation.threats.<name>`), derived from its own section
    `cfg` (`evaluation.defences.<defence>`): the same AutoAttack version, judge, batching and engine; its first
    `pgd_runs` PGD runs on the defence itself (with their loss and EoT) plus every run through a surrogate, each with
    at most `pgd_steps` steps and its step size scaled to this radius (step_size null), run before AutoAttack where
    `pgd_first`; Square where both enable it; no query attack (their thousands of queries per point run under the
    training threat); on the threat's first `n_points` (at most the defence's), every attack alone and the masking
    checks (at the threat's `large_eps`) on the first `sanity_points` of them (at most the defence's). The stored
    transfer points were crafted in the training threat's ball, so the caller gives none."""
    out = copy.deepcopy(cfg)
    for key in ("spsa", "hopskipjump"):
        out.pop(key, None)
    own = [run for run in cfg["pgd"] if not run.get("surrogate")][:threat["pgd_runs"]]
    out["pgd"] = [{**run, "step_size": None, "steps": min(run["steps"], threat["pgd_steps"])}
                  for run in cfg["pgd"] if run in own or run.get("surrogate")]
    out["n_points"] = min(cfg["n_points"], threat["n_points"])
    out["sanity"] = {**cfg["sanity"], "n_points": min(cfg["sanity"]["n_points"], threat["sanity_points"],
                                                      out["n_points"]), "large_eps": threat["large_eps"]}
    out["pgd_first"] = threat["pgd_first"]
    out["square"] = {**cfg["square"], "enabled": cfg["square"]["enabled"] and threat["square"]}
    return out
