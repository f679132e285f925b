"""Query attacks on the default run's trained defences: what SPSA and HopSkipJump cost per point and what they leave,
to size their budgets in params.yaml (carso.evaluation.families.spsa / hopskipjump).

For each defence of a finished run (its trained files under ROOT/data/<dataset>/), on the first --points test points
it classifies correctly by the k-draw view: SPSA (--spsa ITERATIONSxSAMPLES) and HopSkipJump (--hsj MAX_ITER, init_eval
--hsj-init, max_eval --hsj-max) through the view with each k of --draws (a deterministic defence: k = 1 only), at the
run's threat (evaluation.norm / eps). Prints seconds per point, queries per point (HopSkipJump: counted) and the share
of points the attack broke by the judge's fresh draws (verdict_draws of the defence's section).
Run: python bench/query_attacks.py --root /path/to/run [--defences at carso atop_rt atop] [--points 20]
     [--spsa 20x32] [--hsj 10] [--draws 1 8]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from carso.data import load_split
from carso.defences import defence, resolve
from carso.device import configure_threads
from carso.evaluation import Threat, is_randomised
from carso.evaluation.families.hopskipjump import hopskipjump
from carso.evaluation.families.spsa import spsa
from carso.evaluation.views import DrawAverage
from carso.params import defence_params, load_params
from carso.stages import graph
from carso.verdicts import Judge

CPU = torch.device("cpu")


def load_defence(root: Path, params: dict, name: str, dataset: str) -> torch.nn.Module:
    spec = defence(name, params)
    folder = root / "data" / dataset
    built = defence_params(params, name, "params.yaml")
    return resolve(spec.load)(folder / "classifier/model.safetensors", [folder / a for a in spec.artifacts], dataset,
                              built)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="a finished run: its params.yaml and data/")
    ap.add_argument("--defences", nargs="+", default=["at", "carso", "atop_rt", "atop"])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--spsa", default="20x32", help="ITERATIONSxSAMPLES (each iteration: 2 x SAMPLES queries)")
    ap.add_argument("--hsj", type=int, default=10, help="HopSkipJump max_iter")
    ap.add_argument("--hsj-init", type=int, default=50)
    ap.add_argument("--hsj-max", type=int, default=500)
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    configure_threads(args.threads)
    params = load_params(args.root / "params.yaml")
    dataset = params["datasets"][0] if isinstance(params["datasets"], list) else params["datasets"]
    threat = Threat(params["evaluation"]["norm"], params["evaluation"]["eps"])
    iterations, samples = (int(v) for v in args.spsa.split("x"))
    x_all, y_all = load_split(args.root / "data" / dataset / "dataset", "test")
    print(f"threat {threat.label}; SPSA {iterations} x {2 * samples} queries; HopSkipJump max_iter {args.hsj}, "
          f"init_eval {args.hsj_init}, max_eval {args.hsj_max}; {args.points} points; {torch.get_num_threads()} threads")
    assert graph(params)  # the params file is a valid pipeline
    for name in args.defences:
        model = load_defence(args.root, params, name, dataset).eval()
        cfg = params["evaluation"]["defences"][name]
        randomised = is_randomised(model, x_all[:16], y_all[:16])
        judge = Judge(model, randomised, cfg["verdict_draws"], cfg["verdict_repeats"], CPU, 64)
        x, y = x_all[:4 * args.points], y_all[:4 * args.points]
        keep = judge(x, y).select > 0.5
        x, y = x[keep][:args.points], y[keep][:args.points]
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        for k in (args.draws if randomised else [1]):
            view = DrawAverage(model, k, cfg.get("engine", {}).get("pass_images") if isinstance(
                cfg.get("engine", {}).get("pass_images"), int) else None)
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.no_grad():
                found = spsa(view, x, y, threat, iterations, samples, 0.01, 0.01)
            t_spsa = time.perf_counter() - start
            left_spsa = judge(found, y).estimate.mean().item()
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.no_grad():
                found, queries = hopskipjump(view, x, y, threat, classes, args.hsj, args.hsj_max, args.hsj_init)
            t_hsj = time.perf_counter() - start
            left_hsj = judge(found, y).estimate.mean().item()
            print(f"{name:9s} k={k:<2d} SPSA {t_spsa / len(y):6.2f} s/point, {100 * left_spsa:5.1f}% left | "
                  f"HopSkipJump {t_hsj / len(y):6.2f} s/point, {queries.mean().item():6.0f} queries/point, "
                  f"{100 * left_hsj:5.1f}% left  (n={len(y)})", flush=True)


if __name__ == "__main__":
    main()
