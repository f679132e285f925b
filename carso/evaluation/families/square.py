"""Square (Andriushchenko et al. 2020, pyautoattack's code): a score-based random search on the margin loss, no
gradients of the defence."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from carso.attacks import square_attack
from carso.evaluation.families import Attack, Target
from carso.evaluation.families._query import attack_name, draw_counts
from carso.evaluation.views import DrawAverage
from carso.io import sha256_tensor
from carso.verdicts import Verdict


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """Square with `cfg.square`'s budget, when enabled; on a randomised defence one run per k of its `draws` (each
    query the mean of k draws' probabilities, `carso.evaluation.views`; default: k = 1 only)."""
    square = cfg["square"]
    if not square["enabled"]:
        return []
    out = []
    for k in draw_counts(target, {"draws": square.get("draws", [1])}):
        per_query = f", {k} draws per query" if k > 1 else ""
        info = {"kind": "square", "title": f"Square ({square['n_queries']} queries{per_query})",
                "n_queries": square["n_queries"], "p_init": square["p_init"], "query_draws": k}
        out.append(Attack(attack_name("square", k), info, functools.partial(run, target, cfg=square, k=k)))
    return out


def run(target: Target, idx: torch.Tensor, cfg: dict[str, Any], k: int = 1) -> tuple[Verdict, torch.Tensor]:
    """Square on the points `idx` through the `k`-draw view, batch by batch (seed `seed + i` for batch i, resumable
    through the cache), judged by the judge with fresh draws."""
    x, y, threat = target.x[idx], target.y[idx], target.threat
    settings = {"eps": threat.eps, "norm": threat.norm, "n_queries": cfg["n_queries"], "p_init": cfg["p_init"],
                "labels": sha256_tensor(y), "x": sha256_tensor(x), **({"draws": k} if k > 1 else {})}
    view = DrawAverage(target.model, k, target.pass_images) if k > 1 else target.model

    def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
        return {"x_adv": square_attack(view, x[sl], y[sl], threat.eps, threat.norm, cfg["n_queries"],
                                       cfg["p_init"], target.seed + i, target.device)}

    name = attack_name("square", k)
    x_adv = target.cache.batches(name, settings, len(y), target.batch_size,
                                 f"{name} ({cfg['n_queries']} queries, {threat.label})", one_batch)["x_adv"]
    return target.judge(x_adv, y), x_adv
