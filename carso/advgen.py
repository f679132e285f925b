"""Adversarial examples against the frozen classifier, stored losslessly for the purifier and transfer tests."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.attacks import AttackSpec, attack_dataset, predict
from carso.data import load_split
from carso.device import describe
from carso.io import save_tensors, write_json

log = logging.getLogger(__name__)


def attack_spec(cfg: dict[str, Any], norm: str = "Linf") -> AttackSpec:
    """An `adversarial.attacks` entry of params.yaml as an AttackSpec (FGSM without random start) in `norm`."""
    if cfg["method"] == "fgsm":
        return AttackSpec("fgsm", eps=cfg["eps"], steps=1, step_size=cfg["eps"], random_start=False, norm=norm)
    return AttackSpec("pgd", eps=cfg["eps"], steps=cfg["steps"], step_size=cfg["step_size"],
                      restarts=cfg.get("restarts", 1), norm=norm)


def generate_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: dict[str, Any],
                   device: torch.device, batch_size: int, split: str,
                   norm: str = "Linf") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every configured attack on one split, stored as float32 (perturbations are not multiples of 1/255)."""
    tensors = {"clean": x, "labels": y}
    clean_ok = predict(model, x, device, batch_size) == y
    summary: dict[str, Any] = {"points": len(y), "clean_accuracy": clean_ok.float().mean().item()}
    for name, cfg in attacks.items():
        t0 = time.perf_counter()
        x_adv = attack_dataset(model, x, y, attack_spec(cfg, norm), device, batch_size, desc=f"{split}/{name}")
        adv_ok = predict(model, x_adv, device, batch_size) == y
        success = (clean_ok & ~adv_ok).sum().item() / max(1, clean_ok.sum().item())
        tensors[name] = x_adv
        summary[name] = {**cfg, "accuracy": adv_ok.float().mean().item(),
                         "success_rate": success, "seconds": time.perf_counter() - t0}
        log.info("%s/%s: accuracy %.4f, success rate %.4f on the clean-correct points",
                 split, name, summary[name]["accuracy"], success)
    return tensors, summary


def generate_adversarial(model: nn.Module, data_dir: Path, out_dir: Path, cfg: dict[str, Any],
                         device: torch.device, norm: str = "Linf") -> dict[str, Any]:
    """Attack the first `train_points` / `test_points` images in `norm` (evaluation.norm); write one safetensors
    file per split."""
    model = model.to(device, memory_format=torch.channels_last).eval()  # a layout: still fp32
    summary: dict[str, Any] = {"precision": "fp32", "norm": norm, **describe(device)}
    for split, limit in (("train", cfg["train_points"]), ("test", cfg["test_points"])):
        x, y = load_split(data_dir, split, limit=limit)
        tensors, summary[split] = generate_split(model, x, y, cfg["attacks"], device, cfg["batch_size"], split, norm)
        save_tensors(out_dir / f"{split}.safetensors", tensors,
                     {"split": split, "attacks": cfg["attacks"], "norm": norm, "note": "the success rate counts only the clean-correct points"})
    write_json(out_dir / "summary.json", summary)
    return summary
