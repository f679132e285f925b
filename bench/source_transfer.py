"""Transfer from the unseen source models on a finished run: for every defence and every threat it is evaluated in,
the judge's verdict on each set of points craft_sources made (as the evaluation judges them: fresh draws for a
randomised defence), with its seconds, and the stage times of train_sources and craft_sources from the run's
benchmarks/. It measures what the sources add to each evaluation without the cascade (which only lowers it: a later
source attack is judged on the points the earlier ones left), and the transfer figures themselves.

Run: python bench/source_transfer.py --root /path/to/run [--params params.yaml] [--dataset fashion_mnist]
     [--only at carso atop_rt atop]
Nothing else should run meanwhile (two torch processes on 2 cores slow each other several-fold).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from carso.data import load_split
from carso.defences import defence, resolve
from carso.device import configure_threads, select_device
from carso.engine import engine_settings, prepare
from carso.evaluation.families.autoattack import is_randomised
from carso.params import defence_params, load_params
from carso.sources import load_crafted
from carso.stages import MODEL, crafted_folder
from carso.verdicts import Judge


def stage_seconds(bench: Path) -> float | None:
    """Snakemake's benchmark file of a stage: its wall seconds (None: not there)."""
    if not bench.exists():
        return None
    with bench.open() as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the finished run (its data/<dataset>/ folders)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--only", nargs="*", default=None, help="these defences (default: every evaluated one)")
    args = parser.parse_args()
    params = load_params(args.params)
    configure_threads(None)
    device = select_device(params["runtime"]["device"])
    folder = args.root / "data" / args.dataset
    benches = args.root / "benchmarks" / args.dataset
    threats = params["evaluation"].get("threats") or {}
    for stage in ("train_sources", "craft_sources", *(f"craft_sources_under_{t}" for t in threats)):
        seconds = stage_seconds(benches / f"{stage}.tsv")
        print(f"stage {stage}: {'not in benchmarks/' if seconds is None else f'{seconds:.0f} s'}")
    x, y = load_split(folder / "dataset", "test")
    total = 0.0
    print(f"{'defence':10} {'threat':9} {'attack':18} {'n':>4} {'accuracy':>9} {'seconds':>8}")
    for threat in (None, *threats):
        t = threats.get(threat, {})
        norm, eps = (t["norm"], t["eps"]) if threat else (params["evaluation"]["norm"], params["evaluation"]["eps"])
        crafted = load_crafted(folder / crafted_folder(threat) / "points.safetensors", norm, eps, y)
        for name in [d for d in t.get("defences", list(params["evaluation"]["defences"]))
                     if args.only is None or d in args.only]:
            cfg = params["evaluation"]["defences"][name]
            spec = defence(name, params)
            model = resolve(spec.load)(folder / MODEL, [folder / a for a in spec.artifacts], args.dataset,
                                       defence_params(params, name, args.params))
            engine = engine_settings(cfg, device, model)
            model = prepare(model, device, engine["compile"], engine["layout"])
            n = min(cfg["n_points"], t.get("n_points", cfg["n_points"]))
            randomised = is_randomised(model, x[:cfg["batch_size"]].to(device), y[:cfg["batch_size"]].to(device))
            judge = Judge(model, randomised, cfg["verdict_draws"], cfg["verdict_repeats"], device, cfg["batch_size"],
                          engine["pass_images"])
            for key, (points, _) in crafted.items():
                m = min(n, len(points))
                start = time.perf_counter()
                verdict = judge(points[:m], y[:m])
                seconds = time.perf_counter() - start
                total += seconds
                accuracy = 100 * verdict.estimate.mean().item()
                print(f"{name:10} {threat or 'training':9} {key:18} {m:4d} {accuracy:8.1f}% {seconds:8.1f}", flush=True)
    print(f"judging every crafted set on every evaluated defence: {total:.0f} s ({total / 60:.1f} min)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
