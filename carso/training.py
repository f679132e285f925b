"""Adversarial training of the classifier (PGD / Madry, or FGSM with random start), resumable per epoch."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from carso.attacks import AttackSpec, accuracy, attack, robust_accuracy
from carso.checkpoint import load_classifier, save_classifier
from carso.data import dataset_spec, load_split
from carso.device import autocast, describe_training, eval_mode, memory_format, with_precision
from carso.distributed import Team, parallel
from carso.io import fingerprint, read_json, sha256_file, write_json, write_text
from carso.models import build_classifier
from carso.resume import EpochCheckpoint, code_digest, seed_epoch

log = logging.getLogger(__name__)

TRAINING_MODULES = ("training", "attacks", "models", "data", "device", "checkpoint", "resume", "distributed")
CURVE_COLUMNS = ["epoch", "lr", "train_loss", "train_adv_acc", "test_clean_acc", "test_adv_acc", "images_per_second",
                 "seconds"]


def training_radii(cfg: dict[str, Any]) -> list[float]:
    """classifier.attack.eps as a list: one radius, or several that share each batch equally."""
    eps = cfg["attack"]["eps"]
    return list(eps) if isinstance(eps, list) else [eps]


def training_attack(cfg: dict[str, Any], norm: str = "Linf") -> list[AttackSpec]:
    """The attacks used inside training, one per radius of classifier.attack.eps, in the threat model's `norm`
    (evaluation.norm): `pgd` (Madry) or `fgsm_rs` (FGSM from a random start)."""
    a = cfg["attack"]
    method, steps = ("fgsm", 1) if a["method"] == "fgsm_rs" else ("pgd", a["steps"])
    return [AttackSpec(method, eps=e, steps=steps, step_size=a["step_size"], random_start=True, norm=norm)
            for e in training_radii(cfg)]


def attack_shares(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: list[AttackSpec],
                  autocast: Any = None) -> torch.Tensor:
    """`x` made adversarial in equal consecutive shares, the i-th share with specs[i] (one spec: the whole batch)."""
    parts = zip(torch.tensor_split(x, len(specs)), torch.tensor_split(y, len(specs)), specs)
    return torch.cat([attack(model, xs, ys, spec, autocast) for xs, ys, spec in parts if len(ys)])


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Batched augmentation: `none`, or `crop_flip` (random 4-pixel-padded crop + horizontal flip)."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=gen).to(x.device)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]  # (N, H, 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, out.flip(3), out).contiguous()


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                           weight_decay=cfg["weight_decay"], nesterov=cfg["momentum"] > 0)


def make_scheduler(opt: torch.optim.Optimizer, cfg: dict[str, Any], total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule: `onecycle` (warm-up then anneal), `cosine`, or `constant`."""
    if cfg["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total_steps,
                                                   pct_start=cfg["warmup_fraction"], anneal_strategy="linear")
    if cfg["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _train_epoch(model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor,
                 y: torch.Tensor, cfg: dict[str, Any], specs: list[AttackSpec], device: torch.device, gen: torch.Generator,
                 team: Team, desc: str, augment_fn: Augment | None = None) -> tuple[float, float]:
    """One pass over the data: attack each batch (in equal shares, one per training radius; no attack: standard
    training), then step on the adversarial batch. `augment_fn` replaces `cfg["augment"]` when given.

    `net` is `model` as trained (wrapped for data parallelism under torchrun): every process draws the
    same order and augmentation for the global batch, then attacks and trains on its own shard. The
    attack runs on `model` itself, so its input gradients never trigger a gradient exchange."""
    fmt = memory_format(cfg["channels_last"])
    order = torch.randperm(len(y), generator=gen)
    bs, loss_sum, correct = cfg["batch_size"], 0.0, 0
    net.train()
    batches = range(0, len(y), bs)
    for start in tqdm(batches, desc=desc, unit="batch", leave=False, mininterval=5, disable=not team.is_main):
        idx = order[start:start + bs]
        if not team.covers(len(idx)):
            continue
        xb = x[idx].to(device)
        xb = augment_fn(xb, gen) if augment_fn else augment(xb, cfg["augment"], gen)
        xb = team.shard(xb).contiguous(memory_format=fmt)
        yb = team.shard(y[idx]).to(device)
        xb_adv = attack_shares(model, xb, yb, specs, autocast(device, cfg["precision"])) if specs else xb
        with autocast(device, cfg["precision"]):
            logits = net(xb_adv).float()
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
    loss_sum, correct = team.sum([loss_sum, correct])
    return loss_sum / len(y), correct / len(y)


def _monitor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
             device: torch.device, norm: str = "Linf") -> tuple[float, float]:
    """Clean and PGD-10 accuracy at radius `eps` on a fixed test subset, in fp32 and eval mode."""
    spec = AttackSpec("pgd", eps=eps, steps=10, step_size=eps / 4, norm=norm)
    with eval_mode(model):
        clean = accuracy(model, x, y, device, batch_size=500)
        adv = robust_accuracy(model, x, y, spec, device, batch_size=500)
    return clean, adv


def _fresh_state(model: nn.Module, cfg: dict[str, Any], steps_per_epoch: int):
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, cfg["epochs"] * steps_per_epoch)
    return opt, sched


def train_classifier(dataset: str, data_dir: Path, out_dir: Path, cfg: dict[str, Any], seed: int,
                     device: torch.device, team: Team = Team(), norm: str = "Linf", init: Path | None = None,
                     augment_fn: Augment | None = None, monitor_eps: float | None = None) -> dict[str, Any]:
    """Adversarially train the classifier described by `cfg` against attacks in `norm` (evaluation.norm); resume
    from `out_dir/checkpoint.pt`. `cfg["attack"]` None: standard training (no attack; the monitor's PGD-10 at
    `monitor_eps`). `init`: a classifier file to start from (a fine-tune). `augment_fn`: a batch augmentation in
    place of `cfg["augment"]` (cfg must name it, as it names the run's checkpoint).

    Under torchrun, `team`'s processes train one model data-parallel and rank 0 alone monitors and
    writes; the others return an empty dict."""
    cfg = with_precision(cfg, device)
    spec_ds = dataset_spec(dataset)
    x_train, y_train = load_split(data_dir, "train")
    x_mon, y_mon = load_split(data_dir, "test", limit=cfg["monitor_points"])
    model = build_classifier(cfg["arch"], in_channels=spec_ds.channels, num_classes=spec_ds.num_classes,
                             image_size=spec_ds.side, mean=spec_ds.mean, std=spec_ds.std, **cfg["arch_kwargs"])
    if init is not None:
        model.load_state_dict(load_classifier(init, dataset).state_dict())
    model = model.to(device, memory_format=memory_format(cfg["channels_last"]))
    steps_per_epoch = -(-len(y_train) // cfg["batch_size"])
    opt, sched = _fresh_state(model, cfg, steps_per_epoch)
    manifest = read_json(data_dir / "manifest.json")
    key = fingerprint({"cfg": cfg, "norm": norm, "seed": seed, "data": manifest["splits"]["train"],
                       "code": code_digest(TRAINING_MODULES), **({"init": sha256_file(init)} if init else {})})
    checkpoint = EpochCheckpoint(out_dir / "checkpoint.pt", key)
    curve = checkpoint.restore({"model": model, "optimizer": opt, "scheduler": sched})
    net = parallel(model, team, device)
    specs = training_attack(cfg, norm) if cfg["attack"] else []
    eps = max(training_radii(cfg)) if cfg["attack"] else monitor_eps
    for epoch in range(len(curve) + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        gen = seed_epoch(seed, epoch, team.rank)
        loss, adv_acc = _train_epoch(model, net, opt, sched, x_train, y_train, cfg, specs, device, gen, team,
                                     f"epoch {epoch}/{cfg['epochs']}", augment_fn)
        speed = len(y_train) / (time.perf_counter() - t0)  # training images (attack included) per second, all processes
        if not team.is_main:
            continue
        clean_mon, adv_mon = _monitor(model, x_mon, y_mon, eps, device, norm)
        row = {"epoch": epoch, "device": str(device), "lr": opt.param_groups[0]["lr"], "train_loss": loss,
               "train_adv_acc": adv_acc,
               "test_clean_acc": clean_mon, "test_adv_acc": adv_mon, "images_per_second": speed,
               "seconds": time.perf_counter() - t0}
        curve.append(row)
        log.info("epoch %d: loss %.4f, train adv acc %.4f, test clean %.4f, test PGD-10 %.4f (%.0f images/s, %.1f s)",
                 epoch, loss, adv_acc, clean_mon, adv_mon, speed, row["seconds"])
        checkpoint.save({"model": model, "optimizer": opt, "scheduler": sched}, curve)
    return _finish(model, dataset, cfg, curve, out_dir, device, team) if team.is_main else {}


def _finish(model: nn.Module, dataset: str, cfg: dict[str, Any], curve: list[dict[str, Any]],
            out_dir: Path, device: torch.device, team: Team) -> dict[str, Any]:
    save_classifier(out_dir / "model.safetensors", model, dataset, cfg["arch"], cfg["arch_kwargs"])
    lines = [",".join(CURVE_COLUMNS)] + [",".join(f"{r[c]:.6g}" for c in CURVE_COLUMNS) for r in curve]
    write_text(out_dir / "curve.csv", "\n".join(lines) + "\n")
    last = curve[-1] if curve else {}
    metrics = {"epochs": len(curve), "final_train_loss": last.get("train_loss"),
               "final_test_clean_acc": last.get("test_clean_acc"), "final_test_adv_acc": last.get("test_adv_acc"),
               "monitor_points": cfg["monitor_points"], "train_seconds": sum(r["seconds"] for r in curve),
               "final_images_per_second": last.get("images_per_second"),
               "precision": cfg["precision"], "channels_last": cfg["channels_last"], **describe_training(device, curve),
               **team.describe()}
    write_json(out_dir / "train_metrics.json", metrics)
    return metrics
