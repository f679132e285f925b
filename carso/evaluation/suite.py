"""One defence's evaluation: clean accuracy, then the attack suite as a cascade (transfer, AutoAttack, Square, the
PGD runs; `families`), the gradient-masking probes (`sanity`), and what the results say of the attacks
(`checks`), all in fp32, each figure with its number of points and a confidence interval."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.attacks import predict
from carso.device import describe
from carso.engine import engine_settings, prepare
from carso.errors import UserError
from carso.evaluation.cache import AttackCache, model_digest
from carso.evaluation.cascade import Cascade, Runner, place, worst_of
from carso.evaluation.families import Target, families
from carso.evaluation.families.autoattack import is_randomised
from carso.evaluation.families.pgd import runs_of, strongest
from carso.evaluation.checks import indicators, masking_checks, naive_figure
from carso.evaluation.sanity import gradients, sanity
from carso.evaluation.threat import Threat
from carso.stats import summarise
from carso.verdicts import Judge, Verdict, neutral, scatter, seed_from

log = logging.getLogger(__name__)


def deterministic_protocol(cfg: dict[str, Any]) -> list[str]:
    """What in a defence's evaluation section attacks it as if it were deterministic (empty when nothing does):
    a randomised defence needs AutoAttack's rand version, EoT in at least one PGD run, and fresh draws to judge
    its final points (the estimate's draws; the strict rule's repeats)."""
    found = []
    if cfg["autoattack"]["enabled"] and cfg["autoattack"]["version"] != "rand":
        found.append(f"autoattack.version is {cfg['autoattack']['version']} (use rand: APGD with 20 EoT iterations)")
    if all(run["eot"] == 1 for run in cfg["pgd"]):
        found.append("every pgd run has eot: 1 (give at least one run eot > 1)")
    if cfg["verdict_draws"] == 1:
        found.append("verdict_draws is 1 (use 32 or more: each final point's probability of a correct answer is "
                     "estimated from that many fresh draws)")
    if cfg["verdict_repeats"] == 1:
        found.append("verdict_repeats is 1 (use more: the strict rule counts a point only if every repeat is correct)")
    return found


def evaluate_defence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_transfer: torch.Tensor | None,
                     common: dict[str, Any], cfg: dict[str, Any], device: torch.device, seed: int,
                     work_dir: Path, surrogates: dict[str, nn.Module] | None = None,
                     section: str = "the defence's evaluation section", naive: tuple[str, ...] = (),
                     sources: dict[str, tuple[torch.Tensor, str]] | None = None
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Verdict]:
    """Every attack of the protocol on the first `n_points` test points of one defence, in fp32, as a cascade
    (`Cascade`) in the order of `families`: transfer, the unseen sources' points, AutoAttack, Square, each PGD(-EoT)
    run in the order listed, SPSA and HopSkipJump where enabled; then the gradient-masking checks and the
    attack-failure indicators.

    `x_transfer` holds stored adversarial versions of the first test points, crafted on the classifier alone.
    `surrogates` maps a PGD run's name to the model its gradients come from (`PgdRun.surrogate`). `sources` holds
    the points crafted on unseen source models in this threat (carso.sources.load_crafted), each judged as an
    attack. Every attack's final points are judged with fresh draws (carso.verdicts): the headline is the per-point
    worst case over all attacks, the expected accuracy under the attack the selection draws picked for each point,
    and beside it the strict rule (every attack and every repeat correct). Returns the metrics, the adversarial
    points of each attack (for the report's examples) and the per-point worst-case verdict (so defences can be
    compared on the same points). A randomised defence whose `cfg` (named `section` in the error) would attack it
    as a deterministic one is refused before any attack runs. `naive` names the attacks whose worst case a naive
    evaluation of this defence would report (a positive control's, carso.methods.controls): their figure is given
    as `naive`.
    """
    conf, bs = common["confidence"], cfg["batch_size"]
    threat = Threat(common.get("norm", "Linf"), common["eps"])
    engine = engine_settings(cfg, device, model)
    model = prepare(model, device, engine["compile"], engine["layout"])  # folded, laid out, compiled: still fp32
    surrogates = {k: prepare(m, device, engine["compile"], engine["layout"]) for k, m in (surrogates or {}).items()}
    results: dict[str, Any] = {"eps": threat.eps, "norm": threat.norm, "precision": "fp32", **describe(device),
                               "engine": engine}
    t0 = time.perf_counter()
    seed_from(x)
    results["clean"] = {**summarise((predict(model, x, device, max(bs, 256)) == y).tolist(), conf), "draws": 1}
    log.info("clean accuracy %.4f on %d points", results["clean"]["accuracy"], len(y))
    n = min(cfg["n_points"], len(y))
    xs, ys = x[:n], y[:n]
    results["randomised"] = is_randomised(model, xs[:bs].to(device), ys[:bs].to(device))
    if results["randomised"] and (found := deterministic_protocol(cfg)):
        raise UserError(f"this defence is randomised (repeated passes on the same inputs disagree: AutoAttack's "
                        f"check) but {section} attacks it as a deterministic one: {'; '.join(found)}.")
    judge = Judge(model, results["randomised"], cfg["verdict_draws"], cfg["verdict_repeats"], device, bs,
                  engine["pass_images"])
    results["verdict_draws"], results["verdict_repeats"] = judge.draws, judge.repeats
    target = Target(model, xs, ys, threat, device, bs, seed, AttackCache(work_dir / "work", model_digest(model), seed),
                    judge, engine["pass_images"], x_transfer=x_transfer, surrogates=surrogates,
                    sources=sources or {})
    cascade = Cascade(judge(xs, ys), min(cfg["sanity"]["n_points"], n), conf)
    results["clean_subset"] = cascade.clean.entry(conf)
    verdicts: dict[str, Verdict] = {}
    adversarial = {"clean": xs}
    attacks: dict[str, dict[str, Any]] = {}  # name -> kind, title and settings, in the order they ran

    def step(name: str, idx: torch.Tensor, run: Runner) -> None:
        start = time.perf_counter()
        part, x_adv = run(idx) if len(idx) else (neutral(0), xs[idx])  # nothing left to attack
        verdicts[name], adversarial[name] = scatter(part, idx, n), place(xs, idx, x_adv)
        cascade.record(name, verdicts[name], len(idx), time.perf_counter() - start)

    for plan in families(cfg.get("pgd_first", False)):
        for attack in plan(target, cfg, common):
            attacks[attack.name] = attack.info
            step(attack.name, cascade.targets(), attack.run)
    results["attacks"] = {}
    for name, info in attacks.items():
        results["attacks"][name] = cascade.standalone(verdicts[name], info.get("points")).entry(
            conf, scope="standalone", **info)
        log.info("%s alone: accuracy %.4f on the first %d points", info["title"], results["attacks"][name]["accuracy"],
                 results["attacks"][name]["n"])
    if family := [n for n, info in attacks.items() if info["kind"] == "source"]:
        results["sources"] = source_family(family, attacks, verdicts, cascade, conf)
    runs = runs_of(target, cfg)
    best = strongest(runs, cascade, verdicts)
    results["strongest_pgd"] = best.name
    results["gradients"] = gradients(model, xs, ys, adversarial[best.name], cascade.targets(subset_only=True),
                                     best.spec.eot, device, bs, engine["pass_images"])
    losses = list(dict.fromkeys(r.spec.loss for r in runs if r.surrogate is None)) or [best.spec.loss]
    results["sanity"] = sanity(target, cascade, verdicts, step, best, adversarial[best.name], losses, cfg["sanity"],
                               conf)
    results["cascade"] = cascade.summary()
    results["robust_worst_case"] = cascade.worst.entry(conf, scope="cumulative")
    results["strongest_per_point"] = cascade.strongest()
    standalone = {name: cascade.standalone(v, attacks.get(name, {}).get("points")) for name, v in verdicts.items()}
    results["gradient_masking"] = masking_checks(results, standalone, conf)
    for line in results["gradient_masking"]:
        log.warning("possible gradient masking: %s", line)
    results["indicators"] = indicators(results, standalone, target.traces, cascade, runs, conf)
    for found in results["indicators"]:
        failed = found["fired"] and found["severity"] == "failure"
        (log.warning if failed else log.info)("indicator %s (%s): %s", found["indicator"], found["attack"], found["text"])
    if naive:
        results["naive"] = naive_figure(naive, standalone, cascade, results, conf, section)
    results["seconds"] = time.perf_counter() - t0
    shutil.rmtree(work_dir / "work", ignore_errors=True)
    return results, adversarial, cascade.worst


def source_family(names: list[str], attacks: dict[str, dict[str, Any]], verdicts: dict[str, Verdict],
                  cascade: Cascade, conf: float) -> dict[str, Any]:
    """Transfer from the unseen source models as one family: per point the strongest of its attacks (every source,
    every attack), alone on the standalone subset, with the sources it drew on and its per-point outcomes (`per_point`:
    the headline's probability and the strict verdict, for the report's paired test against `at`)."""
    points = min(attacks[n]["points"] for n in names)
    family = cascade.standalone(worst_of([verdicts[n] for n in names]), points)
    return {**family.entry(conf, scope="standalone", kind="source_family", attacks=names,
                           sources=sorted({attacks[n]["source"] for n in names}),
                           title=f"transfer from unseen models (the strongest of {len(names)} per point)"),
            "per_point": {"expected": family.estimate.double().tolist(), "strict": family.ok.bool().tolist()}}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a person diffs (DVC's metrics file of an evaluation): clean accuracy on the whole test set (one
    draw per point); on the attacked points, clean and the per-point worst case, each attack alone (on the sanity
    subset, as the masking checks compare them; the transfers from unseen models as one figure, `sources`), each as
    the headline (`acc`: the expected accuracy over the estimate draws) and the strict rule (`strict`: all repeats
    correct), with its number of points; and the numbers of draws and repeats behind them (1 and 1: a deterministic
    defence, whose two figures coincide). The intervals, settings, timings and diagnostics stay in metrics.json."""
    def entry(e: dict[str, Any]) -> dict[str, Any]:
        return {"acc": round(e["accuracy"], 4), "strict": round(e["strict"]["accuracy"], 4), "n": e["n"]}

    return {"clean": {"acc": round(metrics["clean"]["accuracy"], 4), "n": metrics["clean"]["n"]},
            "clean_attacked": entry(metrics["clean_subset"]), "worst_case": entry(metrics["robust_worst_case"]),
            "alone": {name: entry(e) for name, e in metrics["attacks"].items() if e["kind"] != "source"},
            **({"sources": entry(metrics["sources"])} if "sources" in metrics else {}),
            "verdict_draws": metrics["verdict_draws"], "verdict_repeats": metrics["verdict_repeats"]}


@torch.no_grad()
def example_tensors(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, device: torch.device,
                    k: int = 6) -> dict[str, torch.Tensor]:
    """A few clean and adversarial points with the defence's predictions and, for a defence that shows what it
    makes of its input (a `stages(x) -> {name: (k, S, C, H, W) images}` method, e.g. CARSO's reconstructions),
    each stage's images as `<stage>_clean` / `<stage>_adversarial` with the classifier's label for each."""
    x, x_adv, y = x[:k], x_adv[:k], y[:k]
    out = {"clean": x, "adversarial": x_adv, "labels": y, "pred_clean": predict(model, x, device, k),
           "pred_adversarial": predict(model, x_adv, device, k)}
    if hasattr(model, "stages"):
        for name, images in (("clean", x), ("adversarial", x_adv)):
            for stage, shown in model.stages(images.to(device)).items():  # (k, S, C, H, W)
                out[f"{stage}_{name}"] = shown.cpu()
                out[f"{stage}_{name}_pred"] = model.classifier(shown.flatten(0, 1)).argmax(1).view(len(x), -1).cpu()
    return out
