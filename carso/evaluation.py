"""Clean accuracy, PGD and AutoAttack robust accuracy, all in fp32, each with a confidence interval."""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.attacks import AttackSpec, attack_dataset, predict
from carso.device import describe
from carso.io import fingerprint, sha256_tensor
from carso.stats import summarise

log = logging.getLogger(__name__)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str,
                   device: torch.device, batch_size: int, seed: int, state_path: Path) -> torch.Tensor:
    """AutoAttack (pyautoattack, the reference attack code) at L-inf `eps`; returns per-point robustness.

    Resumable: AutoAttack records in `state_path` which attacks already ran and which points are still
    robust, so a killed evaluation continues where it stopped. The file is removed once the run is complete.
    """
    from pyautoattack import AutoAttack
    from pyautoattack.state import EvaluationState

    adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, device=str(device), seed=seed)
    state_path = state_path.resolve()
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    flags = EvaluationState.from_disk(state_path).robust_flags
    state_path.unlink()
    if flags is None:  # no attack needed to run (e.g. every point was already misclassified)
        return predict(model, x_adv.cpu(), device, batch_size) == y
    return flags.cpu().bool()


def is_randomised(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """AutoAttack's own check: do repeated forward passes on the same inputs disagree?"""
    from pyautoattack import checks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks.check_randomized(model, x, y, bs=len(x))
    return any("randomized defense" in str(w.message) for w in caught)


def pgd_eot_spec(eps: float, steps: int = 200, eot: int = 20, reference_step: float = 0.007,
                 reference_eps: float = 8 / 255) -> AttackSpec:
    """PGD with Expectation over Transformation as in Lee & Kim (2023): 200 steps, 20 EoT samples per
    step, cross-entropy; the step size is theirs (0.007 at eps 8/255) scaled to the configured eps."""
    return AttackSpec("pgd", eps=eps, steps=steps, step_size=reference_step * eps / reference_eps, eot=eot)


def repeated_verdict(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, repeats: int,
                     device: torch.device, batch_size: int) -> tuple[float, torch.Tensor]:
    """Classify the final adversarial points `repeats` times: the mean accuracy, and per point whether
    every repeat was correct (the worst case of a stochastic defence's noisy verdict)."""
    correct = torch.stack([predict(model, x_adv, device, batch_size) == y for _ in range(repeats)])  # (R, n)
    return correct.float().mean().item(), correct.all(dim=0)


def model_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, so resumable state never outlives the model it belongs to."""
    return fingerprint([sha256_tensor(t.detach().float()) for t in model.state_dict().values()])


def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any],
                        device: torch.device, seed: int, work_dir: Path) -> dict[str, Any]:
    """All attacks of the protocol on the first `n_points` test points; the headline is the per-point worst case."""
    conf, bs = cfg["confidence"], cfg["batch_size"]
    work_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device, memory_format=torch.channels_last).eval()  # a layout: still fp32
    results: dict[str, Any] = {"eps": cfg["eps"], "norm": "Linf", "precision": "fp32", **describe(device)}
    t0 = time.perf_counter()
    clean_pred = predict(model, x, device, bs) == y
    results["clean"] = summarise(clean_pred.tolist(), conf)
    log.info("clean accuracy %.4f on %d points", results["clean"]["accuracy"], len(y))
    n = min(cfg["n_points"], len(y))
    xs, ys = x[:n], y[:n]
    p = cfg["pgd"]
    pgd = AttackSpec("pgd", eps=cfg["eps"], steps=p["steps"], step_size=p["step_size"], restarts=p["restarts"])
    x_pgd = attack_dataset(model, xs, ys, pgd, device, bs, desc=f"PGD-{p['steps']}")
    pgd_ok = predict(model, x_pgd, device, bs) == ys
    results["pgd"] = {**summarise(pgd_ok.tolist(), conf), "steps": p["steps"], "restarts": p["restarts"]}
    log.info("PGD-%d accuracy %.4f on %d points", p["steps"], results["pgd"]["accuracy"], n)
    per_point = clean_pred[:n] & pgd_ok
    results["randomised"] = is_randomised(model, xs[:bs].to(device), ys[:bs].to(device))
    aa = cfg["autoattack"]
    if aa["enabled"]:
        key = fingerprint({"eps": cfg["eps"], "n": n, "version": aa["version"], "seed": seed,
                           "labels": sha256_tensor(ys), "model": model_digest(model)})
        aa_ok = run_autoattack(model, xs, ys, cfg["eps"], aa["version"], device, bs, seed,
                               work_dir / f"autoattack_state_{key}.json")
        results["autoattack"] = {**summarise(aa_ok.tolist(), conf), "version": aa["version"]}
        log.info("AutoAttack (%s) accuracy %.4f on %d points", aa["version"], results["autoattack"]["accuracy"], n)
        per_point &= aa_ok
    results["robust_worst_case"] = summarise(per_point.tolist(), conf)
    results["clean_subset"] = summarise(clean_pred[:n].tolist(), conf)
    results["seconds"] = time.perf_counter() - t0
    return results
