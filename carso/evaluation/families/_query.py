"""What the query attacks (SPSA, HopSkipJump) share: the k-draw view of the defence for each k they are run with, a
cap on the points they attack, and their runs batch by batch through the cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from carso.evaluation.families import Attack, Target
from carso.evaluation.views import DrawAverage
from carso.io import sha256_tensor
from carso.verdicts import Verdict, scatter

Craft = Callable[[DrawAverage, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]  # view, x, y, seed -> found


def draw_counts(target: Target, cfg: dict[str, Any]) -> list[int]:
    """The k of each run: `cfg.draws` for a randomised defence; a deterministic one answers every k alike, so k = 1."""
    return sorted(set(cfg["draws"])) if target.judge.randomised else [1]


def attack_name(family: str, k: int) -> str:
    """`<family>` for one draw per query (a deterministic defence's only run), `<family>_k<k>` for k draws."""
    return family if k == 1 else f"{family}_k{k}"


def attacks(target: Target, family: str, title: str, cfg: dict[str, Any], settings: dict[str, Any],
            craft: Craft) -> list[Attack]:
    """One attack per k of `draw_counts` (`attack_name`), each on at most `cfg.n_points` of the points it is given
    (the first ones), crafted by `craft` through the k-draw view."""
    out = []
    for k in draw_counts(target, cfg):
        name = attack_name(family, k)
        info = {"kind": family, "title": f"{title}, {k} draw{'s' if k > 1 else ''} per query" if target.judge.randomised
                else title, "query_draws": k, "points": cfg["n_points"], **settings}
        out.append(Attack(name, info, _runner(target, name, k, cfg["n_points"], settings, craft)))
    return out


def _runner(target: Target, name: str, k: int, limit: int, settings: dict[str, Any], craft: Craft):
    def run(idx: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
        keep = (idx < limit).nonzero().squeeze(1)
        x, y = target.x[idx[keep]], target.y[idx[keep]]
        view = DrawAverage(target.model, k, target.pass_images)
        key = {**settings, "draws": k, "threat": [target.threat.norm, target.threat.eps], "x": sha256_tensor(x),
               "labels": sha256_tensor(y)}

        def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
            return craft(view, x[sl].to(target.device), y[sl].to(target.device), target.seed + i)

        found = target.cache.batches(name, key, len(y), target.batch_size, f"{name} ({target.threat.label})",
                                     one_batch) if len(y) else {"x_adv": x}
        x_all = target.x[idx].clone()
        x_all[keep] = found["x_adv"]
        return scatter(target.judge(found["x_adv"], y), keep, len(idx)), x_all
    return run
