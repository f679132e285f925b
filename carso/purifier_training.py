"""Training CARSO's purifier on adversarially-balanced batches, with the classifier frozen."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from carso.device import autocast
from carso.io import fingerprint
from carso.purifier import Purifier, beta_schedule, purifier_loss
from carso.representation import RepresentationExtractor
from carso.resume import EpochCheckpoint, seed_epoch

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
        self.inner.load_state_dict(state["inner"])
        self.slow, self.counter = state["slow"], state["counter"]


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


def _epoch(purifier: Purifier, extractor: RepresentationExtractor, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LambdaLR, data: dict[str, torch.Tensor], cfg: dict[str, Any],
           beta: float, device: torch.device, gen: torch.Generator, desc: str) -> dict[str, float]:
    sums = {"loss": 0.0, "bce": 0.0, "kl": 0.0}
    n = len(data["labels"])
    purifier.train()
    batches = balanced_batches(n, cfg["batch_size"], cfg["attacks"], cfg["adversarial_fraction"], gen)
    for idx, sources in tqdm(list(batches), desc=desc, unit="batch", leave=False, mininterval=5):
        x_in = gather_inputs(data, idx, sources).to(device)
        target = data["clean"][idx].to(device)
        with torch.no_grad(), autocast(device, cfg["precision"]):
            acts = [a.float() for a in extractor(x_in)]
        with autocast(device, cfg["precision"]):
            recon, mu, logvar = purifier(x_in, acts)
        loss, bce, kl = purifier_loss(recon.float(), target, mu.float(), logvar.float(), beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for key, value in (("loss", loss), ("bce", bce), ("kl", kl)):
            sums[key] += value.item() * len(idx)
    return {k: v / n for k, v in sums.items()}


def train_purifier(purifier: Purifier, extractor: RepresentationExtractor, data: dict[str, torch.Tensor],
                   cfg: dict[str, Any], seed: int, device: torch.device, checkpoint_path: Path,
                   data_key: str) -> list[dict[str, float]]:
    """Train `purifier` for cfg["epochs"] epochs on `data` (clean images, labels and one tensor per
    attack); returns the per-epoch curve. Resumes from `checkpoint_path` when it matches this run."""
    extractor.classifier.eval()
    for p in extractor.classifier.parameters():
        p.requires_grad_(False)
    purifier.to(device)
    steps = cfg["epochs"] * -(-len(data["labels"]) // cfg["batch_size"])
    inner = torch.optim.RAdam(purifier.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    opt: torch.optim.Optimizer = Lookahead(inner) if cfg["lookahead"] else inner
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: lr_factor(s, steps))
    checkpoint = EpochCheckpoint(checkpoint_path, fingerprint({"cfg": cfg, "seed": seed, "data": data_key}))
    curve = checkpoint.restore(purifier, opt, sched)
    for epoch in range(len(curve) + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        gen = seed_epoch(seed, epoch)
        beta = beta_schedule(epoch - 1, cfg["epochs"])
        row = _epoch(purifier, extractor, opt, sched, data, cfg, beta, device, gen, f"epoch {epoch}/{cfg['epochs']}")
        row = {"epoch": epoch, "beta": beta, "lr": inner.param_groups[0]["lr"], **row,
               "seconds": time.perf_counter() - t0}
        curve.append(row)
        log.info("epoch %d: loss %.2f (BCE %.2f, KL %.2f, beta %.3f), %.1f s", epoch, row["loss"], row["bce"],
                 row["kl"], beta, row["seconds"])
        checkpoint.save(purifier, opt, sched, curve)
    return curve
