"""The attack families of the protocol, one module each behind one call shape.

A family's `plan(target, cfg, common)` returns the attacks it contributes to a defence's suite (none when its section of
`evaluation.defences.<name>` is disabled), each an `Attack`: a name, what the metrics say of it, and a `Runner`
(point indices in, the judge's per-point verdict and the adversarial points out). The suite runs them as a cascade
in the order of `FAMILIES`. A new attack is one module here and one entry in that table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from carso.evaluation.cache import AttackCache
from carso.evaluation.cascade import Runner
from carso.evaluation.threat import Threat
from carso.verdicts import Judge


@dataclass
class Target:
    """What every family is given: the defence, the attacked points, the threat, and the evaluation's tools (the
    resumable cache, the judge that re-draws, the batching). `traces` collects the PGD runs' trajectories for the
    indicators; `x_transfer` and `surrogates` are the transfer points and the models surrogate runs differentiate;
    `sources` maps each `<source>/<attack>` crafted on an unseen model (carso.sources) to its points and the source
    in words."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    threat: Threat
    device: torch.device
    batch_size: int
    seed: int
    cache: AttackCache
    judge: Judge
    pass_images: int | None = None
    x_transfer: torch.Tensor | None = None
    surrogates: dict[str, nn.Module] = field(default_factory=dict)
    sources: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)
    traces: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    """One attack of a suite: its name (a key of the metrics' `attacks`), what the metrics record of it (`kind`,
    `title` and its settings) and how to run it."""

    name: str
    info: dict[str, Any]
    run: Runner


Plan = Callable[[Target, dict[str, Any], dict[str, Any]], list[Attack]]  # (target, its section, evaluation)


def families(pgd_first: bool = False) -> tuple[Plan, ...]:
    """The families in the order a suite runs them: transfer (from the classifier, then from the unseen source
    models: cheap, one judgement each), AutoAttack and Square first, so the cascade leaves the
    PGD runs only the points they did not break; the query attacks (SPSA, HopSkipJump), thousands of queries per
    point, last, on the standalone subset and the points everything before them left standing. `pgd_first`: the PGD
    runs before AutoAttack and Square (an unseen threat's suite, where short PGD runs break most points for far less
    than AutoAttack rand's 20 EoT draws on every point). The order changes what the suite costs, not what it finds:
    each point keeps being attacked while any picking draw finds it correct."""
    from carso.evaluation.families import autoattack, hopskipjump, pgd, sources, spsa, square, transfer

    if pgd_first:
        return (transfer.plan, sources.plan, pgd.plan, autoattack.plan, square.plan, spsa.plan, hopskipjump.plan)
    return (transfer.plan, sources.plan, autoattack.plan, square.plan, pgd.plan, spsa.plan, hopskipjump.plan)
