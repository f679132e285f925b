"""Transfer from models the defence never saw: the points craft_sources made on each source model of `sources`
(another architecture, standard or adversarial training; carso.sources) in this evaluation's threat, judged on the
defence. They use no gradient, no output and no training of the defence or of its classifier."""
from __future__ import annotations

from typing import Any

import torch

from carso.evaluation.families import Attack, Target
from carso.verdicts import Verdict, scatter


def attack_name(key: str) -> str:
    """`<source>/<attack>` of the crafted file as an attack name of the suite: src_<source>_<attack>."""
    source, attack = key.split("/")
    return f"src_{source}_{attack}"


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """One attack per (source, attack) crafted for this threat, on the first points it holds (all of the attacked
    points when the sources crafted at least as many)."""
    return [_attack(target, key, points, words) for key, (points, words) in target.sources.items()]


def _attack(target: Target, key: str, points: torch.Tensor, words: str) -> Attack:
    limit = min(len(points), len(target.y))

    def run(idx: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
        keep = (idx < limit).nonzero().squeeze(1)
        x_all = target.x[idx].clone()
        x_all[keep] = points[idx[keep]]
        return scatter(target.judge(points[idx[keep]], target.y[idx[keep]]), keep, len(idx)), x_all

    source, attack = key.split("/")
    info = {"kind": "source", "title": f"transfer from {words}: {attack}", "source": source, "source_attack": attack,
            "points": limit}
    return Attack(attack_name(key), info, run)
