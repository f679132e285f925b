"""The unseen threats' cost: every (defence, threat) evaluation of a params file's evaluation.threats, run on a finished
run's trained files, one after the other (nothing else should run), with its seconds in total and per attack of the
cascade, and the worst case it measured. Sizes the threats' suites (n_points, pgd_runs, the defence sections'
sanity.n_points) against the default run's time budget.

Run: python bench/threat_matrix.py --root /path/to/run [--params params.yaml] [--dataset fashion_mnist]
     [--out /tmp/threat_matrix] [--only at:l2 atop:l1]
It calls `python -m carso evaluate --threat T` exactly as the evaluate_threat rule does, writing under --out (not the
run's own threats/ folders). Prints one row per pair and the total.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from carso.params import load_params
from carso.stages import Stage, evaluate_stage, graph, unseen


def command(stage: Stage, root: Path, params_file: str, dataset: str, out: Path) -> list[str]:
    """The evaluate_threat rule's command for `stage`, reading the run under `root` and writing to `out`."""
    folder = root / "data" / dataset
    args = [sys.executable, "-m", "carso", "evaluate", "--params", params_file, "--dataset", dataset, *stage.extra]
    for flag, relative in stage.args:
        args += [flag, str(folder / relative)]
    return args + ["--out", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the finished run (its data/<dataset>/ folders)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--out", type=Path, default=Path("/tmp/threat_matrix"))
    parser.add_argument("--only", nargs="*", default=None, help="defence:threat pairs (default: all)")
    args = parser.parse_args()
    params = load_params(args.params)
    stages, pairs = graph(params), unseen(params)
    if args.only:
        pairs = [p for p in pairs if f"{p[0]}:{p[1]}" in args.only]
    total = 0.0
    print(f"{'defence':10} {'threat':6} {'seconds':>8}  worst case (n)  per attack (s)")
    for name, threat in pairs:
        out = args.out / threat / name
        start = time.perf_counter()
        done = subprocess.run(command(stages[evaluate_stage(name, threat)], args.root, args.params, args.dataset, out),
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            print(f"{name:10} {threat:6} failed: {done.stderr[-500:]}")
            continue
        total += seconds
        m = json.loads((out / "metrics.json").read_text())
        steps = ", ".join(f"{s['attack']} {s['seconds']:.0f}" for s in m["cascade"])
        worst = m["robust_worst_case"]
        print(f"{name:10} {threat:6} {seconds:8.0f}  {100 * worst['accuracy']:.1f}% ({worst['n']})  {steps}", flush=True)
    print(f"total {total:.0f} s ({total / 60:.1f} min) for {len(pairs)} evaluations")


if __name__ == "__main__":
    main()
