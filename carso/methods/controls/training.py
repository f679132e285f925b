"""The positive controls' training stages: train_plain (classifier.arch without adversarial training) and
finetune_resize (that classifier fine-tuned under random resize-and-pad), both through the classifier's own
resumable training loop (carso.training) with its settings, epochs and augmentation aside."""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import torch

from carso.distributed import Team
from carso.methods.controls import CLASSIFIER_KEYS
from carso.methods.controls.defence import resize_pad
from carso.training import train_classifier, training_radii


def _plain_cfg(params: dict[str, Any]) -> dict[str, Any]:
    """The classifier's training settings (CLASSIFIER_KEYS), with no attack and controls.plain.epochs."""
    cfg = {k: params["classifier"][k] for k in CLASSIFIER_KEYS}
    return {**cfg, "attack": None, "pretrained": None, "epochs": params["controls"]["plain"]["epochs"]}


def plain_stage(args: argparse.Namespace, params: dict[str, Any], device: torch.device, team: Team) -> None:
    """train_plain: the undefended base of the positive controls."""
    train_classifier(args.dataset, Path(args.data), Path(args.out), _plain_cfg(params), params["runtime"]["seed"],
                     device, team, params["evaluation"]["norm"], monitor_eps=_monitor_eps(params))


def resize_stage(args: argparse.Namespace, params: dict[str, Any], device: torch.device, team: Team) -> None:
    """finetune_resize: train_plain's classifier, controls.resize.epochs more epochs under random resize-and-pad."""
    cfg = params["controls"]["resize"]
    settings = {**_plain_cfg(params), "epochs": cfg["epochs"], "augment": f"resize_pad(min_scale={cfg['min_scale']})"}
    train_classifier(args.dataset, Path(args.data), Path(args.out), settings, params["runtime"]["seed"], device, team,
                     params["evaluation"]["norm"], init=Path(args.plain) / "model.safetensors",
                     augment_fn=partial(_augment, min_scale=cfg["min_scale"]),
                     monitor_eps=_monitor_eps(params))


def _monitor_eps(params: dict[str, Any]) -> float:
    """The per-epoch PGD-10 check's radius: the adversarially-trained classifier's (its largest training radius)."""
    return max(training_radii(params["classifier"]))


def _augment(x: torch.Tensor, generator: torch.Generator, min_scale: float) -> torch.Tensor:
    return resize_pad(x, min_scale, generator)
