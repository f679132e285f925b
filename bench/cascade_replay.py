"""What a higher cascade threshold would save, and what it would cost the headline, for one randomised defence.

The cascade (carso.evaluation.Cascade) attacks a point past the standalone subset while at least one of the judge's
picking draws still finds the defence correct there (a picking share above 0): exact, since no later attack can then
be picked. A threshold tau > 0 would stop earlier, on points whose picking share is at most tau, and could overstate
the headline (those points are attacked no further). This script evaluates one defence of a finished run with the
exact cascade, records every attack's per-point verdict, then replays the cascade at several thresholds: for each,
the headline it would report and the attack seconds it would spend (each attack's seconds per attacked point,
measured, times the points it would attack). Nothing of the run is changed: the evaluation writes under --out.

Run (from a finished default run's project root; minutes: one full evaluation of the defence):
    python bench/cascade_replay.py --defence atop_rt
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from carso import evaluation

THRESHOLDS = (0, 1 / 32, 2 / 32, 4 / 32, 6 / 32, 8 / 32, 12 / 32, 16 / 32)


def record_cascade() -> list[dict[str, Any]]:
    """Patch the cascade so that it keeps the clean verdict and every attack's verdict, per point; returns the list
    it fills."""
    records: list[dict[str, Any]] = []
    init, record = evaluation.Cascade.__init__, evaluation.Cascade.record

    def keep(name: str, verdict: Any, **extra: Any) -> None:
        records.append({"name": name, "select": verdict.select.tolist(), "estimate": verdict.estimate.tolist(), **extra})

    def patched_init(self: Any, clean: Any, m: int, confidence: float) -> None:
        keep("clean", clean, subset=m)
        init(self, clean, m, confidence)

    def patched_record(self: Any, name: str, verdict: Any, attacked: int, seconds: float) -> None:
        keep(name, verdict, attacked=attacked, seconds=seconds)
        record(self, name, verdict, attacked, seconds)

    evaluation.Cascade.__init__, evaluation.Cascade.record = patched_init, patched_record
    return records


def replay(records: list[dict[str, Any]], tau: float) -> tuple[float, float]:
    """The headline and the attack seconds of the cascade at threshold `tau` (the exact one at 0)."""
    clean, steps = records[0], records[1:]
    select, estimate = np.array(clean["select"]), np.array(clean["estimate"])
    subset = np.arange(len(select)) < clean["subset"]
    alive = select > 0
    seconds = 0.0
    for step in steps:
        if step["name"] == "more_steps":  # the strongest PGD run continued on the subset points its base left
            targets = subset & alive & (select > tau)
        else:
            targets = alive & (subset | (select > tau))
        s, e = np.array(step["select"]), np.array(step["estimate"])
        take = targets & (s < select)
        select, estimate = np.where(take, s, select), np.where(take, e, estimate)
        seconds += step["seconds"] / max(1, step["attacked"]) * targets.sum()
    return float(estimate.mean()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defence", required=True, help="a randomised defence of params.yaml (carso, atop_rt, atop)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--out", default="runs/bench/cascade_replay", help="where the evaluation writes")
    args = parser.parse_args()
    from carso.defences import defence

    records = record_cascade()
    from carso.cli import main as cli

    d = f"data/{args.dataset}"
    artifacts = [f"{d}/{a}" for a in defence(args.defence).artifacts]
    rc = cli(["evaluate", "--params", args.params, "--dataset", args.dataset, "--defence", args.defence,
              "--model", f"{d}/classifier/model.safetensors", *(["--artifacts", *artifacts] if artifacts else []),
              "--data", f"{d}/dataset", "--adversarial", f"{d}/adversarial", "--out", args.out])
    if rc:
        raise SystemExit(rc)
    Path(args.out, "cascade_records.json").write_text(json.dumps(records))
    steps = ", ".join(f"{s['name']} {s['attacked']} points {s['seconds']:.0f} s" for s in records[1:])
    print(f"# {args.defence}: the exact cascade ran {steps}")
    print(f"{'threshold':>10}{'headline %':>12}{'attack s':>10}")
    for tau in THRESHOLDS:
        headline, seconds = replay(records, tau)
        print(f"{tau:>10.3f}{100 * headline:>12.2f}{seconds:>10.0f}")


if __name__ == "__main__":
    main()
