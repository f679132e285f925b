"""Transfer: the stored adversarial points crafted on the classifier alone (stage generate_adversarial), judged on
the defence. They use no gradient of the defence, so a defence that masks its gradients does not blind them."""
from __future__ import annotations

from typing import Any

import torch

from carso.evaluation.families import Attack, Target
from carso.verdicts import Verdict


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """The stored transfer attack (`evaluation.transfer_attack`), when the suite was given its points."""
    if target.x_transfer is None:
        return []
    points = target.x_transfer[:len(target.y)]
    stored = common.get("transfer_attack", "transfer")

    def run(idx: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
        return target.judge(points[idx], target.y[idx]), points[idx]

    info = {"kind": "transfer", "title": f"transfer ({stored}, crafted on the classifier alone)", "attack": stored}
    return [Attack("transfer", info, run)]
