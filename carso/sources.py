"""Models no defence saw: the sources of the unseen-model transfer attacks (params section `sources`).

Stage train_sources trains each model of `sources.models` with the classifier's own training loop and settings, but
its own architecture, epochs and attack (null: standard training; else adversarial training in the training threat's
norm). Stage craft_sources crafts every attack of `sources.attacks` (PGD, and MI-FGSM: momentum, which transfers
better) on each source, at the training threat (`craft_sources`) and at each unseen threat of evaluation.threats
(`craft_sources@<threat>`), on the first `sources.n_points` test points, and stores them with the source's own
accuracy on them (white-box there). Every evaluation then judges its defence on the points of its threat
(carso.evaluation.families.sources): an attack that uses no gradient, no output and no training data of the defence
or of its classifier, so a defence's figure there is the transferability of attacks in general, not of attacks on its
own classifier (the stored transfer attack, generate_adversarial)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.attacks import AttackSpec, attack_dataset, inside, momentum_attack, predict
from carso.checkpoint import load_classifier
from carso.data import load_split
from carso.device import describe
from carso.distributed import Team
from carso.errors import UserError
from carso.io import load_tensors, save_tensors, write_json
from carso.stages import SOURCE_KEYS, TRAINING_BALL
from carso.training import train_classifier, training_radii

log = logging.getLogger(__name__)

def source_cfg(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Source `name`'s training settings: the classifier's (SOURCE_KEYS) with its own architecture, epochs and
    attack (null: standard training)."""
    own = params["sources"]["models"][name]
    cfg = {k: params["classifier"][k] for k in SOURCE_KEYS}
    return {**cfg, "arch": own["arch"], "arch_kwargs": own["arch_kwargs"], "epochs": own["epochs"],
            "attack": own["attack"], "pretrained": None}


def describe_source(params: dict[str, Any], name: str) -> str:
    """`name` in words, e.g. "cnn_v1, adversarially trained (pgd, eps 0.1)"."""
    own = params["sources"]["models"][name]
    a = own["attack"]
    how = f"adversarially trained ({a['method']}, eps {a['eps']})" if a else "standard training"
    return f"{own['arch']}, {how}"


def train_sources(dataset: str, data_dir: Path, out_dir: Path, params: dict[str, Any], device: torch.device,
                  team: Team) -> None:
    """Every source model into `out_dir/<name>/` (model.safetensors, curve.csv, train_metrics.json), each resumable
    from its own checkpoint as the classifier is. The per-epoch PGD-10 check of a standard source runs at the
    classifier's training radius."""
    monitor = max(training_radii(params["classifier"]))
    for name in params["sources"]["models"]:
        log.info("source %s: %s", name, describe_source(params, name))
        train_classifier(dataset, data_dir, out_dir / name, source_cfg(params, name), params["runtime"]["seed"],
                         device, team, params["evaluation"]["norm"], monitor_eps=monitor)


def ball(params: dict[str, Any], threat: str) -> tuple[str, float]:
    """The norm and radius the points of `threat` are crafted in: the training threat's (TRAINING_BALL) or an unseen
    one's."""
    if threat == TRAINING_BALL:
        return params["evaluation"].get("norm", "Linf"), params["evaluation"]["eps"]
    threats = params["evaluation"].get("threats") or {}
    if threat not in threats:
        raise UserError(f"--threat {threat}: evaluation.threats has no such threat ({', '.join(threats) or 'none'}); "
                        f"give one of them, or leave --threat out for the training threat.")
    return threats[threat]["norm"], threats[threat]["eps"]


def craft_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any], norm: str, eps: float,
              device: torch.device, batch_size: int) -> torch.Tensor:
    """One `sources.attacks` entry on `model`: pgd (random start, step 2.5 eps / steps, cross-entropy) or mifgsm."""
    if cfg["method"] == "pgd":
        spec = AttackSpec("pgd", eps=eps, steps=cfg["steps"], norm=norm)
        return attack_dataset(model, x, y, spec, device, batch_size)
    if cfg["method"] == "mifgsm":
        return torch.cat([momentum_attack(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device),
                                          eps, norm, cfg["steps"], cfg.get("decay", 1.0)).cpu()
                          for i in range(0, len(x), batch_size)])
    raise UserError(f"sources.attacks: unknown method {cfg['method']!r}; use pgd or mifgsm.")


def craft_sources(dataset: str, data_dir: Path, models_dir: Path, out_dir: Path, params: dict[str, Any],
                  threat_name: str, device: torch.device) -> dict[str, Any]:
    """Every attack of `sources.attacks` on every source model, in the ball of `threat_name`, on the first
    `sources.n_points` test points, in fp32: `points.safetensors` (`labels`, and `<source>/<attack>` per pair, with
    each source described in its metadata) and `summary.json` (each source's clean accuracy and its accuracy on each
    attack crafted on it: a white-box figure, which says the attack did its job on the source)."""
    cfg = params["sources"]
    norm, eps = ball(params, threat_name)
    label = f"{norm} eps {eps:.4g}"
    x, y = load_split(data_dir, "test", limit=cfg["n_points"])
    tensors: dict[str, torch.Tensor] = {"labels": y}
    summary: dict[str, Any] = {"threat": threat_name, "norm": norm, "eps": eps, "points": len(y),
                               "precision": "fp32", **describe(device), "sources": {}}
    for name in cfg["models"]:
        model = load_classifier(models_dir / name / "model.safetensors", dataset).to(device).eval()
        clean = (predict(model, x, device, cfg["batch_size"]) == y).float().mean().item()
        entry: dict[str, Any] = {"description": describe_source(params, name), "clean_accuracy": clean, "attacks": {}}
        for i, (attack, a) in enumerate(cfg["attacks"].items()):
            t0 = time.perf_counter()
            torch.manual_seed(params["runtime"]["seed"] + i)  # PGD's random start: the same points on every rerun
            x_adv = craft_one(model, x, y, a, norm, eps, device, cfg["batch_size"])
            outside = ~inside(x_adv, x, eps, norm)
            if bool(outside.any()):
                raise RuntimeError(f"{attack} on source {name} left {int(outside.sum())} points outside {label} or "
                                   "[0, 1]")
            tensors[f"{name}/{attack}"] = x_adv
            own = (predict(model, x_adv, device, cfg["batch_size"]) == y).float().mean().item()
            entry["attacks"][attack] = {**a, "white_box_accuracy": own, "seconds": round(time.perf_counter() - t0, 1)}
            log.info("%s on source %s (%s): its own accuracy %.4f (clean %.4f) on %d points", attack, name, label,
                     own, clean, len(y))
        summary["sources"][name] = entry
    meta = {"threat": threat_name, "norm": norm, "eps": eps, "order": [k for k in tensors if k != "labels"],
            "sources": {n: e["description"] for n, e in summary["sources"].items()}}
    save_tensors(out_dir / "points.safetensors", tensors, meta)
    write_json(out_dir / "summary.json", summary)
    return summary


def load_crafted(path: Path, norm: str, eps: float, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, str]]:
    """The crafted points of `path` (craft_sources' points.safetensors) for an evaluation in the `norm` ball of
    radius `eps` on the test labels `y`: `<source>/<attack>` -> (points, words naming the source). Refuses points of
    another threat or of other test points in one sentence."""
    tensors, meta = load_tensors(path)
    if meta.get("norm") != norm or abs(float(meta.get("eps", -1)) - eps) > 1e-9:
        raise UserError(f"{path} holds points crafted in {meta.get('norm')} eps {meta.get('eps')}, but this "
                        f"evaluation attacks in {norm} eps {eps:.4g}; give --sources the craft_sources folder of its "
                        "own threat (rerun craft_sources if the radius changed).")
    labels = tensors.pop("labels")
    if not torch.equal(labels, y[:len(labels)]):
        raise UserError(f"{path} was crafted on other test points than this dataset's first {len(labels)}; rerun "
                        "the craft_sources stage.")
    order = meta.get("order") or sorted(tensors)  # (safetensors keeps its keys sorted: the crafting order is here)
    return {key: (tensors[key], f"{key.split('/')[0]} ({meta['sources'][key.split('/')[0]]})") for key in order}
