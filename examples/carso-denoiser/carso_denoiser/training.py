"""Stage train_denoiser: fit the denoiser to map each stored adversarial training example (and each clean one) to
its clean image, by mean squared error; resumable per epoch."""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from carso.plugin import EpochCheckpoint, checkpoint_key, load_adversarial, save_tensors, seed_epoch, write_json, write_text
from carso_denoiser.model import Denoiser

log = logging.getLogger(__name__)


def stage(args: Namespace, params: dict[str, Any], device: torch.device, team: Any) -> None:
    cfg, seed = params["denoiser"], params["runtime"]["seed"]
    attacks = list(params["adversarial"]["attacks"])
    data = load_adversarial(Path(args.adversarial) / "train.safetensors", attacks, cfg["train_points"])
    noisy = torch.cat([data["clean"], *(data[a] for a in attacks)])
    clean = data["clean"].repeat(len(attacks) + 1, 1, 1, 1)
    torch.manual_seed(seed)
    model = Denoiser(clean.shape[1], cfg["width"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = EpochCheckpoint(out / "checkpoint.pt", checkpoint_key("denoiser", cfg, attacks, seed, len(noisy)))
    curve = ckpt.restore({"model": model, "optimizer": opt})
    start = time.perf_counter()
    for epoch in range(len(curve) + 1, cfg["epochs"] + 1):
        gen = seed_epoch(seed, epoch)
        order, total = torch.randperm(len(noisy), generator=gen), 0.0
        for i in range(0, len(order), cfg["batch_size"]):
            idx = order[i:i + cfg["batch_size"]]
            loss = torch.nn.functional.mse_loss(model(noisy[idx].to(device)), clean[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        curve.append({"epoch": epoch, "mse": total / len(order)})
        log.info("epoch %d/%d: mse %.5f", epoch, cfg["epochs"], curve[-1]["mse"])
        ckpt.save({"model": model, "optimizer": opt}, curve)
    save_tensors(out / "model.safetensors", {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 {"kind": "denoiser", "width": cfg["width"]})
    write_text(out / "curve.csv", "epoch,mse\n" + "".join(f"{r['epoch']},{r['mse']:.6f}\n" for r in curve))
    write_json(out / "train_metrics.json", {"epochs": cfg["epochs"], "train_pairs": len(noisy), "attacks": attacks,
                                            "final_mse": curve[-1]["mse"], "seconds": time.perf_counter() - start})
