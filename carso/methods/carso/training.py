"""The train_purifier stage: CARSO's purifier trained on adversarially-balanced batches, the classifier frozen."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from argparse import Namespace
from typing import Any, Iterable

import torch
from tqdm import tqdm

from carso.checkpoint import load_classifier
from carso.device import autocast, describe_training, memory_format, with_precision
from carso.data import load_adversarial
from carso.distributed import Team, parallel
from carso.io import fingerprint, sha256_file, write_json, write_text
from carso.methods.carso.purifier import Purifier, PurifierConfig, beta_schedule, build_purifier, purifier_loss, save_purifier
from carso.methods.carso.representation import RepresentationExtractor
from carso.resume import EpochCheckpoint, code_digest, seed_epoch

log = logging.getLogger(__name__)


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around an inner optimizer: every `k` steps the slow weights move
    `alpha` of the way to the fast ones, and the fast weights restart from there."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.8) -> None:
        self.inner, self.k, self.alpha, self.counter = inner, k, alpha, 0
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = inner.state
        self.slow = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self.inner.step(closure)
        self.counter += 1
        if self.counter % self.k == 0:
            for group, slow in zip(self.param_groups, self.slow):
                for p, s in zip(group["params"], slow):
                    s.add_(p - s, alpha=self.alpha)
                    p.copy_(s)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "slow": self.slow, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the inner optimizer and the slow weights, each slow weight on its parameter's device and dtype
        (a checkpoint is loaded onto the CPU; the run may train on a GPU)."""
        self.inner.load_state_dict(state["inner"])
        self.slow = [[s.to(device=p.device, dtype=p.dtype) for s, p in zip(slow, group["params"], strict=True)]
                     for slow, group in zip(state["slow"], self.param_groups, strict=True)]
        self.counter = state["counter"]


def lr_factor(step: int, total: int, warmup: float = 0.125, flat: float = 0.125) -> float:
    """Warm-up (linear from ~0 to 1) over `warmup` of training, flat for `flat`, then linear anneal to 0."""
    t = step / max(total, 1)
    if t < warmup:
        return (step + 1) / (warmup * total)
    if t < warmup + flat:
        return 1.0
    return max(0.0, (1.0 - t) / (1.0 - warmup - flat))


def balanced_batches(n: int, batch_size: int, attacks: list[str], adv_fraction: float,
                     gen: torch.Generator) -> Iterable[tuple[torch.Tensor, list[str]]]:
    """Shuffled batches of indices, each with its source per example: `adv_fraction` of every batch is
    adversarial, split equally among `attacks`; the rest is clean."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        n_adv = round(adv_fraction * len(idx))
        sources = [attacks[i % len(attacks)] for i in range(n_adv)] + ["clean"] * (len(idx) - n_adv)
        yield idx, sources


def gather_inputs(tensors: dict[str, torch.Tensor], idx: torch.Tensor, sources: list[str]) -> torch.Tensor:
    """Row i of the batch is example idx[i] taken from tensors[sources[i]] (one gather per source)."""
    out = torch.empty((len(idx), *tensors["clean"].shape[1:]), dtype=tensors["clean"].dtype)
    for name in sorted(set(sources)):
        pos = torch.tensor([i for i, s in enumerate(sources) if s == name])
        out[pos] = tensors[name][idx[pos]]
    return out


def _epoch(net: torch.nn.Module, extractor: RepresentationExtractor, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LambdaLR, data: dict[str, torch.Tensor], cfg: dict[str, Any],
           beta: float, device: torch.device, gen: torch.Generator, team: Team, desc: str) -> dict[str, float]:
    """One pass over the balanced batches; under torchrun each process trains on its shard of every batch."""
    sums = {"loss": 0.0, "bce": 0.0, "kl": 0.0}
    n = len(data["labels"])
    net.train()
    batches = balanced_batches(n, cfg["batch_size"], cfg["attacks"], cfg["adversarial_fraction"], gen)
    for idx, sources in tqdm(list(batches), desc=desc, unit="batch", leave=False, mininterval=5,
                             disable=not team.is_main):
        if not team.covers(len(idx)):
            continue
        idx, sources = team.shard(idx), team.shard(sources)
        x_in = gather_inputs(data, idx, sources).to(device)
        target = data["clean"][idx].to(device)
        with torch.no_grad(), autocast(device, cfg["precision"]):
            acts = [a.float() for a in extractor(x_in)]
        with autocast(device, cfg["precision"]):
            recon, mu, logvar = net(x_in, acts)
        loss, bce, kl = purifier_loss(recon.float(), target, mu.float(), logvar.float(), beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for key, value in (("loss", loss), ("bce", bce), ("kl", kl)):
            sums[key] += value.item() * len(idx)
    totals = team.sum(list(sums.values()))
    return {k: v / n for k, v in zip(sums, totals)}


@torch.no_grad()
def monitor(purifier: Purifier, extractor: RepresentationExtractor, x: torch.Tensor, y: torch.Tensor,
            device: torch.device, batch_size: int = 500) -> float:
    """Accuracy of the frozen classifier on one reconstruction per point (z ~ N(0, I)), in fp32."""
    purifier.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        c = purifier.condition(extractor(xb))
        z = torch.randn(len(xb), purifier.cfg.latent_dim, device=device)
        correct += (extractor.classifier(purifier.decode(z, c)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def train_purifier(purifier: Purifier, extractor: RepresentationExtractor, data: dict[str, torch.Tensor],
                   cfg: dict[str, Any], seed: int, device: torch.device, checkpoint_path: Path,
                   data_key: str, monitor_data: dict[str, torch.Tensor] | None = None,
                   team: Team = Team()) -> list[dict[str, Any]]:
    """Train `purifier` for cfg["epochs"] epochs on `data` (clean images, labels and one tensor per
    attack); returns the per-epoch curve. Resumes from `checkpoint_path` when it matches this run.
    With `monitor_data` (clean, labels and cfg["monitor_attack"] test images), each epoch also records
    the classifier's accuracy on one reconstruction of every clean and adversarial monitor point.
    Under torchrun the team trains data-parallel; rank 0 alone monitors, checkpoints and gets the curve."""
    extractor.classifier.eval()
    for p in extractor.classifier.parameters():
        p.requires_grad_(False)
    purifier.to(device)
    steps = cfg["epochs"] * -(-len(data["labels"]) // cfg["batch_size"])
    inner = torch.optim.RAdam(purifier.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    opt: torch.optim.Optimizer = Lookahead(inner) if cfg["lookahead"] else inner
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: lr_factor(s, steps))
    checkpoint = EpochCheckpoint(checkpoint_path, fingerprint({"cfg": cfg, "seed": seed, "data": data_key}))
    curve = checkpoint.restore({"model": purifier, "optimizer": opt, "scheduler": sched})
    net = parallel(purifier, team, device)
    for epoch in range(len(curve) + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        gen = seed_epoch(seed, epoch, team.rank)
        beta = beta_schedule(epoch - 1, cfg["epochs"], cfg["beta_warmup"]["delay"], cfg["beta_warmup"]["ramp"])
        row = _epoch(net, extractor, opt, sched, data, cfg, beta, device, gen, team,
                     f"epoch {epoch}/{cfg['epochs']}")
        speed = len(data["labels"]) / (time.perf_counter() - t0)  # training images per second, all processes
        if not team.is_main:
            continue
        row = {"epoch": epoch, "device": str(device), "beta": beta, "lr": inner.param_groups[0]["lr"], **row,
               "images_per_second": speed}
        if monitor_data is not None:
            row["recon_clean_acc"] = monitor(purifier, extractor, monitor_data["clean"], monitor_data["labels"], device)
            row["recon_adv_acc"] = monitor(purifier, extractor, monitor_data[cfg["monitor_attack"]],
                                           monitor_data["labels"], device)
        row["seconds"] = time.perf_counter() - t0
        curve.append(row)
        log.info("epoch %d: loss %.2f (BCE %.2f, KL %.2f, beta %.3f), reconstruction accuracy clean %.4f / "
                 "adversarial %.4f, %.0f images/s, %.1f s", epoch, row["loss"], row["bce"], row["kl"], beta,
                 row.get("recon_clean_acc", float("nan")), row.get("recon_adv_acc", float("nan")), speed,
                 row["seconds"])
        checkpoint.save({"model": purifier, "optimizer": opt, "scheduler": sched}, curve)
    return curve


PURIFIER_TRAINING_MODULES = ("methods/carso/training", "methods/carso/purifier", "methods/carso/representation",
                             "models", "checkpoint", "data", "device", "resume", "distributed")
CURVE_COLUMNS = ["epoch", "beta", "lr", "loss", "bce", "kl", "recon_clean_acc", "recon_adv_acc", "images_per_second",
                 "seconds"]


def run_purifier_training(dataset: str, classifier_path: Path, adversarial_dir: Path, out_dir: Path,
                          cfg: dict[str, Any], seed: int, device: torch.device, team: Team = Team()) -> dict[str, Any]:
    """The train_purifier stage: build, train (resumably) and save the purifier, its curve and metrics
    (rank 0 alone writes under torchrun; the other processes return an empty dict)."""
    cfg = with_precision(cfg, device)
    classifier = load_classifier(classifier_path, dataset).to(device, memory_format=memory_format(cfg["channels_last"]))
    purifier, extractor = build_purifier(classifier, dataset, PurifierConfig.from_params(cfg), cfg["layers"])
    purifier = purifier.to(device, memory_format=memory_format(cfg["channels_last"]))
    train_path = adversarial_dir / "train.safetensors"
    data = load_adversarial(train_path, cfg["attacks"])
    mon = load_adversarial(adversarial_dir / "test.safetensors", [cfg["monitor_attack"]], cfg["monitor_points"])
    classifier_sha = sha256_file(classifier_path)
    key = fingerprint({"train": sha256_file(train_path), "classifier": classifier_sha,
                       "code": code_digest(PURIFIER_TRAINING_MODULES)})
    log.info("training the purifier on %d points (%s) for %d epochs", len(data["labels"]),
             ", ".join(cfg["attacks"]), cfg["epochs"])
    curve = train_purifier(purifier, extractor, data, cfg, seed, device, out_dir / "checkpoint.pt", key, mon, team)
    if not team.is_main:
        return {}
    save_purifier(out_dir / "model.safetensors", purifier, dataset, extractor.layers, classifier_sha)
    lines = [",".join(CURVE_COLUMNS)] + [",".join(f"{r[c]:.6g}" for c in CURVE_COLUMNS) for r in curve]
    write_text(out_dir / "curve.csv", "\n".join(lines) + "\n")
    last = curve[-1]
    metrics = {"epochs": len(curve), "train_points": len(data["labels"]), "layers": extractor.layers,
               "parameters": sum(p.numel() for p in purifier.parameters()), "final_loss": last["loss"],
               "final_bce": last["bce"], "final_kl": last["kl"], "final_recon_clean_acc": last["recon_clean_acc"],
               "final_recon_adv_acc": last["recon_adv_acc"], "monitor_points": len(mon["labels"]),
               "monitor_attack": cfg["monitor_attack"], "train_seconds": sum(r["seconds"] for r in curve),
               "final_images_per_second": last["images_per_second"],
               "precision": cfg["precision"], "channels_last": cfg["channels_last"], **describe_training(device, curve),
               **team.describe()}
    write_json(out_dir / "train_metrics.json", metrics)
    return metrics


def stage(args: Namespace, params: dict[str, Any], device: torch.device, team: Team) -> None:
    """`python -m carso train-purifier`: the classifier (--model) and generate_adversarial's folder in, --out out."""
    run_purifier_training(args.dataset, Path(args.model), Path(args.adversarial), Path(args.out), params["purifier"],
                          params["runtime"]["seed"], device, team)
