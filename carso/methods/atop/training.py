"""AToP's two training stages, one training loop:

- pretrain_inpainter: clean training images behind the configured random transform; L1 of both stages' outputs
  against the clean image + the generator's hinge GAN term (not detached: it really trains the generator), with
  an SN-PatchGAN discriminator trained on the same batches.
- finetune_inpainter (AToP proper): the same, from the pre-trained networks, plus lambda * CE(f(g(RT(x_adv))), y)
  from `ce_from_epoch` on, with the classifier f frozen. x_adv is FGSM at `adversary.eps`, crafted per batch
  against the classifier alone (the paper) or against the whole purified pipeline; the clean and adversarial
  halves of a batch go through the same masks and noise.

Both: Adam with the configured rate and betas for each network, one checkpoint per epoch (resumed when the
settings, data, classifier and code match), a progress bar, and a curve per epoch (losses, and the classifier's
accuracy on purified clean and purified stored-adversarial test images) for DVC plots and the report.
"""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from carso.attacks import AttackSpec, attack
from carso.checkpoint import load_classifier
from carso.data import load_adversarial, load_split
from carso.datasets import dataset_spec
from carso.device import autocast, describe_training, memory_format, with_precision
from carso.distributed import Team
from carso.io import fingerprint, read_json, sha256_file, write_json, write_text
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import (Inpainter, InpainterConfig, PatchDiscriminator, hinge_d_loss, hinge_g_loss,
                                          load_discriminator, load_inpainter, save_network)
from carso.methods.atop.transforms import TransformConfig, draw
from carso.resume import EpochCheckpoint, code_digest, seed_epoch

log = logging.getLogger(__name__)

TRAINING_MODULES = ("methods/atop/training", "methods/atop/inpainter", "methods/atop/transforms", "methods/atop/defence",
                    "attacks", "models", "checkpoint", "data", "device", "resume")
CURVE_COLUMNS = ["epoch", "l1_coarse", "l1_refined", "d_loss", "g_loss", "ce", "purified_clean_acc",
                 "purified_adv_acc", "images_per_second", "seconds"]


@dataclass
class Networks:
    """What one AToP training step updates: the purifier's inpainter and the discriminator, with their optimizers."""

    purifier: AtopPurifier
    discriminator: PatchDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    def parts(self) -> dict[str, Any]:
        return {"inpainter": self.purifier.inpainter, "discriminator": self.discriminator,
                "opt_g": self.opt_g, "opt_d": self.opt_d}


def make_networks(inpainter: Inpainter, discriminator: PatchDiscriminator, transform: TransformConfig,
                  cfg: dict[str, Any], device: torch.device) -> Networks:
    """The networks on `device` (channels_last if asked), each with Adam(lr, betas)."""
    fmt = memory_format(cfg["channels_last"])
    inpainter, discriminator = inpainter.to(device, memory_format=fmt), discriminator.to(device, memory_format=fmt)
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]))  # noqa: E731
    return Networks(AtopPurifier(transform, inpainter), discriminator, adam(inpainter), adam(discriminator))


@dataclass(frozen=True)
class Adversary:
    """FGSM at `eps` against `model` (the classifier alone or the whole pipeline), for the CE term."""

    model: nn.Module
    eps: float
    norm: str = "Linf"  # evaluation.norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
        spec = AttackSpec("fgsm", eps=self.eps, steps=1, step_size=self.eps, random_start=False, norm=self.norm)
        return attack(self.model, x, y, spec, autocast(x.device, precision))


def _requires_grad(net: nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag)


def discriminator_step(nets: Networks, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor,
                       precision: str) -> torch.Tensor:
    """One hinge step of the discriminator on clean images against (detached) purified ones."""
    with autocast(real.device, precision):
        scores = nets.discriminator(torch.cat([real, fake.detach()]), torch.cat([mask, mask]))
    loss = hinge_d_loss(*scores.float().chunk(2))
    nets.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    nets.opt_d.step()
    return loss.detach()


def generator_step(nets: Networks, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, coarse: torch.Tensor,
                   refined: torch.Tensor, mask: torch.Tensor, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One step of the inpainter: L1 of both stages on the clean half, the GAN term on the refined output (through
    the discriminator, whose weights it leaves alone), and, when the batch has an adversarial half, the
    classifier's CE on it."""
    b = x.shape[0]
    _requires_grad(nets.discriminator, False)
    with autocast(x.device, cfg["precision"]):
        g_loss = hinge_g_loss(nets.discriminator(refined[:b], mask).float())
    _requires_grad(nets.discriminator, True)
    l1_coarse, l1_refined = (coarse[:b] - x).abs().mean(), (refined[:b] - x).abs().mean()
    loss = l1_coarse + l1_refined + cfg["gan_weight"] * g_loss
    ce = torch.zeros((), device=x.device)
    if len(refined) > b:
        with autocast(x.device, cfg["precision"]):
            ce = F.cross_entropy(classifier(refined[b:]).float(), y)
        loss = loss + cfg["ce_weight"] * ce
    nets.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    nets.opt_g.step()
    return {"l1_coarse": l1_coarse.detach(), "l1_refined": l1_refined.detach(), "g_loss": g_loss.detach(),
            "ce": ce.detach()}


def train_step(nets: Networks, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any],
               adversary: Adversary | None) -> dict[str, torch.Tensor]:
    """One batch: the clean images and, with an `adversary`, their FGSM versions go through the purifier under
    the same draw of masks and noise; then a discriminator step and a generator step. Returns the loss terms."""
    b = x.shape[0]
    d = draw(nets.purifier.transform, x)
    inputs = x
    if adversary is not None:
        inputs, d = torch.cat([x, adversary(x, y, cfg["precision"])]), d.repeat(2)
    with autocast(x.device, cfg["precision"]):
        _, coarse, refined = nets.purifier.outputs(inputs, d)
    coarse, refined = coarse.float(), refined.float()
    mask = d.masks[:b].amax(dim=1)  # (B, 1, H, W): every pixel some mask hides (all of them for rt3)
    d_loss = discriminator_step(nets, x, refined[:b], mask, cfg["precision"])
    return {**generator_step(nets, classifier, x, y, coarse, refined, mask, cfg), "d_loss": d_loss}


def train_epoch(nets: Networks, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any],
                adversary: Adversary | None, device: torch.device, gen: torch.Generator, desc: str) -> dict[str, float]:
    """One shuffled pass over (x, y); returns the mean of each loss term over the images."""
    fmt = memory_format(cfg["channels_last"])
    order = torch.randperm(len(y), generator=gen)
    sums: dict[str, float] = {}
    nets.purifier.train()
    nets.discriminator.train()
    for start in tqdm(range(0, len(y), cfg["batch_size"]), desc=desc, unit="batch", leave=False, mininterval=5):
        idx = order[start:start + cfg["batch_size"]]
        terms = train_step(nets, classifier, x[idx].to(device).contiguous(memory_format=fmt), y[idx].to(device),
                           cfg, adversary)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value.item() * len(idx)
    return {k: v / len(y) for k, v in sums.items()}


@torch.no_grad()
def purified_accuracy(purifier: AtopPurifier, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      device: torch.device, batch_size: int = 500) -> float:
    """The frozen classifier's accuracy on purified images (one fresh transform per image), in fp32."""
    purifier.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        correct += (classifier(purifier(xb)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def train_inpainter(nets: Networks, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    monitor: dict[str, torch.Tensor], cfg: dict[str, Any], adversary: Adversary | None, seed: int,
                    device: torch.device, checkpoint: EpochCheckpoint) -> list[dict[str, Any]]:
    """cfg["epochs"] epochs (the CE term from cfg["ce_from_epoch"] when `adversary` is given), resumed from
    `checkpoint` when it matches; returns the per-epoch curve."""
    curve = checkpoint.restore(nets.parts())
    for epoch in range(len(curve) + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        gen = seed_epoch(seed, epoch)
        active = adversary if adversary is not None and epoch >= cfg["ce_from_epoch"] else None
        row = train_epoch(nets, classifier, x, y, cfg, active, device, gen, f"epoch {epoch}/{cfg['epochs']}")
        row = {"epoch": epoch, "device": str(device), **row, "images_per_second": len(y) / (time.perf_counter() - t0)}
        row["purified_clean_acc"] = purified_accuracy(nets.purifier, classifier, monitor["clean"], monitor["labels"],
                                                      device)
        row["purified_adv_acc"] = purified_accuracy(nets.purifier, classifier, monitor[cfg["monitor_attack"]],
                                                    monitor["labels"], device)
        row["seconds"] = time.perf_counter() - t0
        curve.append(row)
        log.info("epoch %d: L1 coarse %.4f / refined %.4f, D %.3f, G %.3f, CE %.3f; classifier on purified test images "
                 "clean %.4f / %s %.4f; %.0f training images/s (%.1f s)", epoch, row["l1_coarse"], row["l1_refined"],
                 row["d_loss"], row["g_loss"], row["ce"], row["purified_clean_acc"], cfg["monitor_attack"],
                 row["purified_adv_acc"], row["images_per_second"], row["seconds"])
        checkpoint.save(nets.parts(), curve)
    return curve


def _frozen_classifier(path: Path, dataset: str, device: torch.device, channels_last: bool) -> nn.Module:
    classifier = load_classifier(path, dataset).to(device, memory_format=memory_format(channels_last)).eval()
    _requires_grad(classifier, False)
    return classifier


def _write_outputs(out_dir: Path, curve: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    lines = [",".join(CURVE_COLUMNS)] + [",".join(f"{r[c]:.6g}" for c in CURVE_COLUMNS) for r in curve]
    write_text(out_dir / "curve.csv", "\n".join(lines) + "\n")
    write_json(out_dir / "train_metrics.json", metrics)


def _start(stage: str, args: Namespace, atop: dict[str, Any],
           seed: int) -> tuple[Inpainter, PatchDiscriminator, dict[str, str]]:
    """The networks a stage starts from: fresh ones (pre-training, seeded) or the pre-trained inpainter and
    discriminator of --pretrained (fine-tuning), and what identifies them in the checkpoint's key."""
    channels = dataset_spec(args.dataset).channels
    if stage == "pretrain_inpainter":
        torch.manual_seed(seed)
        return (Inpainter(InpainterConfig.from_params(atop["inpainter"]), channels),
                PatchDiscriminator(channels, atop["discriminator"]["channels"]), {})
    pretrained = Path(args.pretrained)
    return (load_inpainter(pretrained / "inpainter.safetensors", args.dataset),
            load_discriminator(pretrained / "discriminator.safetensors", args.dataset),
            {"pretrained": sha256_file(pretrained / "inpainter.safetensors")})


def _adversary(stage: str, cfg: dict[str, Any], classifier: nn.Module, nets: Networks,
               params: dict[str, Any]) -> Adversary | None:
    """Fine-tuning's FGSM under the threat model's norm (evaluation.norm), against the classifier alone or the
    whole purified pipeline; none for pre-training, which reads no attack setting."""
    if stage == "pretrain_inpainter":
        return None
    target = classifier if cfg["adversary"]["target"] == "classifier" else AtopDefence(classifier, nets.purifier)
    return Adversary(target, cfg["adversary"]["eps"], params["evaluation"]["norm"])


def run_stage(stage: str, args: Namespace, params: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """pretrain_inpainter (fresh networks, no CE term) or finetune_inpainter (from --pretrained, with the CE
    term): train, then write the inpainter (and, after pre-training, the discriminator), curve and metrics."""
    atop, seed = params["atop"], params["runtime"]["seed"]
    cfg = with_precision(atop[stage.split("_")[0]], device)
    transform = TransformConfig.from_params(atop["transform"])
    classifier_path, out_dir = Path(args.model), Path(args.out)
    classifier = _frozen_classifier(classifier_path, args.dataset, device, cfg["channels_last"])
    inpainter, discriminator, start = _start(stage, args, atop, seed)
    nets = make_networks(inpainter, discriminator, transform, cfg, device)
    x, y = load_split(Path(args.data), "train", limit=cfg["train_points"])
    monitor = load_adversarial(Path(args.adversarial) / "test.safetensors", [cfg["monitor_attack"]],
                               cfg["monitor_points"])
    adversary = _adversary(stage, cfg, classifier, nets, params)
    key = {"cfg": cfg, "atop": {k: atop[k] for k in ("transform", "inpainter", "discriminator")}, "seed": seed,
           "data": read_json(Path(args.data) / "manifest.json")["splits"]["train"],
           "classifier": sha256_file(classifier_path), "code": code_digest(TRAINING_MODULES), **start,
           **({"norm": adversary.norm} if adversary else {})}
    log.info("%s: %d training images, %s transform, %d epochs", stage, len(y), transform.kind, cfg["epochs"])
    curve = train_inpainter(nets, classifier, x, y, monitor, cfg, adversary,
                            seed, device, EpochCheckpoint(out_dir / "checkpoint.pt", fingerprint(key)))
    return _finish(stage, nets, curve, args.dataset, transform, cfg, len(y), len(monitor["labels"]),
                   sha256_file(classifier_path), out_dir, device)


def _finish(stage: str, nets: Networks, curve: list[dict[str, Any]], dataset: str, transform: TransformConfig,
            cfg: dict[str, Any], n_train: int, n_monitor: int, classifier_sha: str, out_dir: Path,
            device: torch.device) -> dict[str, Any]:
    inpainter = nets.purifier.inpainter
    meta = {"kind": "inpainter", "dataset": dataset, "stage": stage, "config": inpainter.cfg.as_dict(),
            "transform": transform.as_dict()}
    if stage == "finetune_inpainter":  # tuned against this classifier: refused with any other
        meta["classifier_sha256"] = classifier_sha
    else:
        save_network(out_dir / "discriminator.safetensors", nets.discriminator,
                     {"kind": "discriminator", "dataset": dataset, "channels": nets.discriminator.widths})
    save_network(out_dir / "inpainter.safetensors", inpainter, meta)
    last = curve[-1]
    metrics = {"stage": stage, "epochs": len(curve), "train_points": n_train, "transform": transform.as_dict(),
               "parameters": sum(p.numel() for p in inpainter.parameters()),
               **{f"final_{k}": last[k] for k in CURVE_COLUMNS[1:-1]}, "monitor_points": n_monitor,
               "monitor_attack": cfg["monitor_attack"], "train_seconds": sum(r["seconds"] for r in curve),
               "precision": cfg["precision"], "channels_last": cfg["channels_last"],
               **describe_training(device, curve)}
    if stage == "finetune_inpainter":
        metrics.update(ce_weight=cfg["ce_weight"], ce_from_epoch=cfg["ce_from_epoch"], adversary=cfg["adversary"])
    _write_outputs(out_dir, curve, metrics)
    return metrics


def pretrain_stage(args: Namespace, params: dict[str, Any], device: torch.device, team: Team) -> None:
    """`python -m carso pretrain-inpainter`."""
    run_stage("pretrain_inpainter", args, params, device)


def finetune_stage(args: Namespace, params: dict[str, Any], device: torch.device, team: Team) -> None:
    """`python -m carso finetune-inpainter`."""
    run_stage("finetune_inpainter", args, params, device)
