"""AutoAttack (pyautoattack, the reference attack code): `standard` for a deterministic defence, `rand` (APGD-CE and
APGD-DLR with 20 EoT iterations) for a randomised one, in any of its norms (Linf, L2, L1)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.attacks import BatchedEoT, predict
from carso.evaluation.families import Attack, Target
from carso.io import sha256_tensor
from carso.verdicts import Verdict

log = logging.getLogger(__name__)


# The order AutoAttack runs its attacks in, where it differs from pyautoattack's: the same attacks, but the margin
# loss first, so a cross-entropy that saturates (blind: METHOD.md section 1) costs only the points DLR left correct.
AUTOATTACK_ORDER = {"rand": ["apgd-dlr", "apgd-ce"]}


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str,
                   device: torch.device, batch_size: int, seed: int,
                   state_path: Path, norm: str = "Linf",
                   pass_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack (pyautoattack, the reference attack code) at `norm` radius `eps`; returns per-point robustness
    and the adversarial points (the clean point where no attack succeeded in this run). Where APGD uses EoT
    (version rand), its draws run in batched passes of up to `pass_images` images (`carso.attacks.BatchedEoT`).

    The caller resumes batch by batch (`_autoattack`). A state file left by a run killed inside this batch is
    discarded and the batch runs again from its start: pyautoattack 0.2.0 cannot read its own state back (it writes
    the set of attacks as a string, and every later run refuses the file), and a fresh run keeps the batch's result
    identical to an uninterrupted one's. The file is removed once the run is complete.
    """
    from pyautoattack import AutoAttack
    from pyautoattack.state import EvaluationState

    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, device=str(device), seed=seed)
    if adversary.apgd.eot_iter > 1:  # rand: APGD's EoT draws computed in batched passes, the same estimate
        adversary.apgd.model = BatchedEoT(model, adversary.apgd.eot_iter, pass_images)
        adversary.apgd.is_tf_model = True
    if version in AUTOATTACK_ORDER:
        assert set(AUTOATTACK_ORDER[version]) == set(adversary.attacks_to_run)  # reordered, never changed
        adversary.attacks_to_run = list(AUTOATTACK_ORDER[version])
    state_path = state_path.resolve()
    if state_path.exists():
        log.warning("%s: left by a run killed inside this AutoAttack batch; running the batch again", state_path)
        state_path.unlink()
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    flags = EvaluationState.from_disk(state_path).robust_flags
    state_path.unlink()
    x_adv = x_adv.detach().cpu()
    if flags is None:  # no attack needed to run (e.g. every point was already misclassified)
        return predict(model, x_adv, device, batch_size) == y, x_adv
    return flags.cpu().bool(), x_adv


def is_randomised(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """AutoAttack's own check: do repeated forward passes on the same inputs disagree?"""
    from pyautoattack import checks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks.check_randomized(model, x, y, bs=len(x))
    return any("randomized defense" in str(w.message) for w in caught)


def plan(target: Target, cfg: dict[str, Any], common: dict[str, Any]) -> list[Attack]:
    """AutoAttack of `cfg.autoattack.version`, when enabled."""
    if not cfg["autoattack"]["enabled"]:
        return []
    version = cfg["autoattack"]["version"]
    info = {"kind": "autoattack", "title": f"AutoAttack ({version})", "version": version,
            "order": AUTOATTACK_ORDER.get(version)}
    return [Attack("autoattack", info, lambda idx: run(target, idx, version))]


def run(target: Target, idx: torch.Tensor, version: str) -> tuple[Verdict, torch.Tensor]:
    """AutoAttack's final points (it picks them with its own checks: APGD's best iterate, one pass per check), judged
    by `judge`. For a randomised defence its own verdict is a noisy check that chose the point, so it is not reused:
    the judge's fresh draws decide. For a deterministic one it is the same classification, kept so that a point it
    broke stays broken whatever the rounding of another batch.

    One AutoAttack run per batch of `batch_size` points (seed `seed + i` for batch i), each kept by the cache once
    done, so an evaluation killed by a cluster's time limit loses at most one batch: AutoAttack's own state
    (inside a batch) would restart an interrupted attack on every still-robust point of the whole set."""
    x, y, threat, bs = target.x[idx], target.y[idx], target.threat, target.batch_size
    settings = {"eps": threat.eps, "norm": threat.norm, "version": version, "order": AUTOATTACK_ORDER.get(version),
                "labels": sha256_tensor(y), "x": sha256_tensor(x)}

    def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
        folder.mkdir(parents=True, exist_ok=True)
        flags, x_adv = run_autoattack(target.model, x[sl], y[sl], threat.eps, version, target.device, bs,
                                      target.seed + i, folder / f"batch_{i:05d}_autoattack_state.json", threat.norm,
                                      target.pass_images)
        return {"robust": flags, "x_adv": x_adv}

    found = target.cache.batches("autoattack", settings, len(y), bs, f"AutoAttack {version} ({threat.label})",
                                 one_batch)
    flags, x_aa = found["robust"].bool(), found["x_adv"]
    verdict = target.judge(x_aa, y)
    return (verdict if target.judge.randomised else verdict & Verdict.certain(flags)), x_aa
