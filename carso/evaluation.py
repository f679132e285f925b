"""Clean accuracy and robust accuracy under a suite of attacks (transfer, AutoAttack, Square, PGD runs with
several losses, through surrogates where configured), all in fp32, each with a confidence interval."""
from __future__ import annotations

import functools
import logging
import operator
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tqdm import tqdm

from carso.attacks import LOSSES, AttackSpec, BatchedEoT, gradient_diagnostics, pgd_tracked, predict, square_attack
from carso.device import describe
from carso.engine import engine_settings, prepare
from carso.io import fingerprint, load_tensors, save_tensors, sha256_tensor
from carso.defences import overrides_text
from carso.errors import UserError
from carso.params import pgd_run_name
from carso.stats import paired_expected, summarise
from carso.verdicts import Judge, Verdict, neutral, scatter, seed_from

log = logging.getLogger(__name__)


# The order AutoAttack runs its attacks in, where it differs from pyautoattack's: the same attacks, but the margin
# loss first, so a cross-entropy that saturates (blind: METHOD.md section 1) costs only the points DLR left correct.
AUTOATTACK_ORDER = {"rand": ["apgd-dlr", "apgd-ce"]}


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str,
                   device: torch.device, batch_size: int, seed: int,
                   state_path: Path, norm: str = "Linf",
                   pass_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack (pyautoattack, the reference attack code) at `norm` radius `eps`; returns per-point robustness
    and the adversarial points (the clean point where no attack succeeded in this run). Where APGD uses EoT
    (version rand), its draws run in batched passes of up to `pass_images` images (`carso.attacks.BatchedEoT`).

    The caller resumes batch by batch (`_autoattack`). A state file left by a run killed inside this batch is
    discarded and the batch runs again from its start: pyautoattack 0.2.0 cannot read its own state back (it writes
    the set of attacks as a string, and every later run refuses the file), and a fresh run keeps the batch's result
    identical to an uninterrupted one's. The file is removed once the run is complete.
    """
    from pyautoattack import AutoAttack
    from pyautoattack.state import EvaluationState

    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, device=str(device), seed=seed)
    if adversary.apgd.eot_iter > 1:  # rand: APGD's EoT draws computed in batched passes, the same estimate
        adversary.apgd.model = BatchedEoT(model, adversary.apgd.eot_iter, pass_images)
        adversary.apgd.is_tf_model = True
    if version in AUTOATTACK_ORDER:
        assert set(AUTOATTACK_ORDER[version]) == set(adversary.attacks_to_run)  # reordered, never changed
        adversary.attacks_to_run = list(AUTOATTACK_ORDER[version])
    state_path = state_path.resolve()
    if state_path.exists():
        log.warning("%s: left by a run killed inside this AutoAttack batch; running the batch again", state_path)
        state_path.unlink()
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    flags = EvaluationState.from_disk(state_path).robust_flags
    state_path.unlink()
    x_adv = x_adv.detach().cpu()
    if flags is None:  # no attack needed to run (e.g. every point was already misclassified)
        return predict(model, x_adv, device, batch_size) == y, x_adv
    return flags.cpu().bool(), x_adv


def is_randomised(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """AutoAttack's own check: do repeated forward passes on the same inputs disagree?"""
    from pyautoattack import checks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks.check_randomized(model, x, y, bs=len(x))
    return any("randomized defense" in str(w.message) for w in caught)


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


def pgd_eot_spec(eps: float, steps: int = 200, eot: int = 20, reference_step: float = 0.007,
                 reference_eps: float = 8 / 255) -> AttackSpec:
    """PGD with Expectation over Transformation as in Lee & Kim (2023): 200 steps, 20 EoT samples per
    step, cross-entropy; the step size is theirs (0.007 at eps 8/255) scaled to the configured eps."""
    return AttackSpec("pgd", eps=eps, steps=steps, step_size=reference_step * eps / reference_eps, eot=eot)


def pgd_spec(eps: float, cfg: dict[str, Any], norm: str = "Linf", pass_images: int | None = None) -> AttackSpec:
    """One run of `evaluation.defences.<name>.pgd` as an AttackSpec. step_size null: Lee & Kim's step scaled to
    eps (L-inf), or 2.5 eps / steps (L2, Madry et al.'s rule)."""
    if cfg["step_size"] is not None:
        step = cfg["step_size"]
    else:
        step = pgd_eot_spec(eps).alpha if norm == "Linf" else 2.5 * eps / cfg["steps"]
    return AttackSpec("pgd", eps=eps, steps=cfg["steps"], step_size=step, eot=cfg["eot"], restarts=cfg["restarts"],
                      zero_grad_patience=cfg["zero_grad_patience"], loss=cfg.get("loss", "ce"), norm=norm,
                      pass_images=pass_images)


@dataclass(frozen=True)
class PgdRun:
    """One PGD(-EoT) run of a defence's suite. With `surrogate` (dotted params.yaml keys and their values) its
    gradients come from the defence built with those settings (BPDA-style), while its verdicts are the real
    defence's."""

    name: str
    spec: AttackSpec
    surrogate: dict[str, Any] | None = None

    @property
    def title(self) -> str:
        via = f", gradients through {overrides_text(self.surrogate)}" if self.surrogate else ""
        return f"PGD-{self.spec.steps} ({self.spec.loss}, EoT {self.spec.eot}{via})"


def pgd_runs(eps: float, norm: str, cfgs: list[dict[str, Any]], pass_images: int | None = None) -> list[PgdRun]:
    """`evaluation.defences.<name>.pgd` (a list of runs) in the order given; EoT draws batched up to `pass_images`."""
    return [PgdRun(pgd_run_name(c), pgd_spec(eps, c, norm, pass_images), c.get("surrogate") or None) for c in cfgs]


def model_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, so resumable state never outlives the model it belongs to."""
    return fingerprint([sha256_tensor(t.detach().float()) for t in model.state_dict().values()])


class AttackCache:
    """Runs attacks batch by batch and keeps every finished batch on disk, so a killed evaluation resumes
    where it stopped. Each batch draws from its own seed, so a resumed run equals an uninterrupted one."""

    def __init__(self, folder: Path, model_key: str, seed: int) -> None:
        self.folder, self.model_key, self.seed = folder, model_key, seed

    def batches(self, name: str, settings: dict[str, Any], n: int, batch_size: int, desc: str,
                compute: Callable[[int, slice, Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`compute(i, points, folder)` for every batch `i` of `n` points, each batch's tensors saved once it is
        done and loaded instead of recomputed on a rerun; returns them concatenated over the batches.
        `settings` (with the model and the seed) name the run: other settings never reuse a stored batch."""
        key = fingerprint({**settings, "model": self.model_key, "seed": self.seed})
        folder = self.folder / f"{name}_{key[:16]}"
        parts = []
        starts = range(0, n, batch_size)
        for i, start in enumerate(tqdm(starts, desc=desc, unit="batch", mininterval=10)):
            path = folder / f"batch_{i:05d}.safetensors"
            if path.exists():
                parts.append(load_tensors(path)[0])
                continue
            torch.manual_seed(int(key[:12], 16) + i)
            part = {k: v.cpu() for k, v in compute(i, slice(start, start + batch_size), folder).items()}
            save_tensors(path, part, {"attack": name})
            parts.append(part)
            log.info("%s: batch %d/%d done", name, i + 1, len(starts))
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}

    def run(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
            device: torch.device, batch_size: int, x_start: torch.Tensor | None = None,
            tag: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`pgd_tracked` (PGD, FGSM, with EoT; each point's best iterate) on `x`, batch by batch; returns the
        adversarial points and the run's trajectory (for the indicators). `tag`: more settings that name the run (a
        surrogate's, whose weights equal the defence's)."""
        settings = {"spec": asdict(spec), "x": sha256_tensor(x), "y": sha256_tensor(y),
                    "start": None if x_start is None else sha256_tensor(x_start), "tag": tag, "best_iterate": True}

        def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
            x_adv, trace = pgd_tracked(model, x[sl].to(device), y[sl].to(device), spec,
                                       x_start=None if x_start is None else x_start[sl].to(device))
            return {"x_adv": x_adv, **trace}

        desc = f"{name} ({spec.steps} steps x {spec.eot} EoT, eps {spec.eps:.4g})"
        found = self.batches(name, settings, len(x), batch_size, desc, one_batch)
        return found.pop("x_adv"), found


MASKING_LIMITS = {"large_eps_max_accuracy": 0.10}
WHITE_BOX = ("autoattack", "pgd")  # the kinds of attack that follow the defence's own gradients
PROBES = {"transfer": "the transfer attack (crafted on the classifier alone)",
          "square": "the black-box Square attack (no gradients)"}


def _clearly_more(first: Verdict, second: Verdict, confidence: float) -> bool:
    """Did `first` leave clearly more accuracy than `second` on the same points (the headline's paired test: the
    estimate draws' per-point probabilities, p < 1 - confidence)?"""
    d = paired_expected(first.estimate.tolist(), second.estimate.tolist(), confidence)
    return d["verdict"] == "real" and d["difference"] > 0


def masking_checks(results: dict[str, Any], verdicts: dict[str, Verdict], confidence: float) -> list[str]:
    """Signatures of gradient masking in one defence's results, in words (empty when none was seen).

    An attack that needs no gradient of the defence (transfer from the classifier alone, black-box Square) must
    not beat one that follows them (AutoAttack, PGD); at a very large eps at least one attack loss must bring
    accuracy near 0; more PGD steps must not leave more points correct. A difference between two attacks counts
    only when the paired test on the same points finds it (carso.stats.paired_expected), so noise is not reported
    as masking."""
    found = []
    attacks = results["attacks"]
    white = [n for n, a in attacks.items() if a["kind"] in WHITE_BOX and not a.get("surrogate")]
    for probe, words in ((p, w) for p, w in PROBES.items() if p in verdicts):
        for name in white:
            if _clearly_more(verdicts[name], verdicts[probe], confidence):
                found.append(f"{words} left {100 * attacks[probe]['accuracy']:.2f}% correct, clearly fewer than "
                             f"white-box {attacks[name]['title']} ({100 * attacks[name]['accuracy']:.2f}%): its "
                             "gradients through this defence are weaker than they should be")
    sanity = results.get("sanity")
    if sanity:
        large = sanity["large_eps"]
        best = min(e["accuracy"] for e in large.values())
        if best > MASKING_LIMITS["large_eps_max_accuracy"]:
            each = ", ".join(f"{loss} {100 * e['accuracy']:.2f}%" for loss, e in large.items())
            eps = next(iter(large.values()))["eps"]
            found.append(f"at eps {eps:.3g}, starting from the clean points, no attack loss brought accuracy near 0 "
                         f"({each}; near 0: at most {100 * MASKING_LIMITS['large_eps_max_accuracy']:.0f}% from at "
                         "least one, as an unbounded attack leaves a classifier nothing)")
        more, base = sanity["more_steps"], sanity["base_steps"]
        if _clearly_more(verdicts["more_steps"], verdicts["base_steps"], confidence):
            found.append(f"{more['steps']} PGD steps left {100 * more['accuracy']:.2f}% correct, clearly more than "
                         f"{base['steps']} steps ({100 * base['accuracy']:.2f}%) on the same {more['n']} points")
    return found


ZERO_GRADIENT_SHARE = 0.5   # a loss whose input gradient is exactly zero at more of the clean points than this is blind
LATE_WINDOW = 0.1           # incomplete optimisation: the last tenth of a run's steps against the tenth before it
LATE_RISE = 0.1             # ... flagged when the loss of its unbroken points still rose by this share of its total rise


def worst_of(verdicts: list[Verdict]) -> Verdict:
    """Several attacks' verdicts on the same points as one: per point the strongest (`Verdict.__and__`)."""
    return functools.reduce(operator.and_, verdicts)


def indicators(results: dict[str, Any], standalone: dict[str, Verdict], traces: dict[str, tuple[torch.Tensor, dict]],
               cascade: "Cascade", runs: list[PgdRun], conf: float) -> list[dict[str, Any]]:
    """Indicators of attack failure (Pintor et al. 2022; Carlini et al. 2019, section on sanity checks) beyond the
    masking checks, one entry per (indicator, attack), each with `fired`, its figures and a sentence. `severity`
    "failure": when fired, a figure that ignored it would overstate the defence; "note": a fact about the defence
    to read beside its figures (a randomised defence's predictions flip between draws)."""
    found: list[dict[str, Any]] = []
    for loss, g in results["gradients"].items():
        share = g["clean"].get("zero_gradient_share", 0.0)
        fired = share > ZERO_GRADIENT_SHARE
        found.append({"indicator": "zero_gradient", "attack": loss, "severity": "failure", "fired": fired,
                      "share": share, "text": f"the {loss} loss's input gradient is exactly zero at "
                      f"{100 * share:.0f}% of the clean points" + (": an attack that follows it alone cannot move "
                      "them (a naive figure)" if fired else "")})
    for run in runs:
        if run.name in traces:
            found += _trace_indicators(run, *traces[run.name])
    sanity = results["sanity"]
    own = [r.name for r in runs if r.surrogate is None] or [r.name for r in runs]
    pgd = worst_of([standalone[name] for name in own])
    fgsm = standalone["fgsm"]
    beats = int(((fgsm.select == 0) & (pgd.select > 0)).sum())
    fired = _clearly_more(pgd, fgsm, conf)
    found.append({"indicator": "fgsm_beats_pgd", "attack": "fgsm", "severity": "failure", "fired": fired,
                  "fgsm": fgsm.estimate.mean().item(), "pgd": pgd.estimate.mean().item(), "points": beats,
                  "text": f"one FGSM step left {100 * fgsm.estimate.mean().item():.2f}% correct, the PGD runs together "
                  f"{100 * pgd.estimate.mean().item():.2f}% on the same {cascade.m} points; FGSM alone broke {beats} "
                  "point(s) that no PGD run broke" + (": the iterative attacks are failing (clearly fewer broken "
                  "than by one step)" if fired else "")})
    if "eot_single" in sanity:
        single, strongest = standalone["eot_single"], standalone[results["strongest_pgd"]]
        gain = single.estimate.mean().item() - strongest.estimate.mean().item()
        fired = _clearly_more(single, strongest, conf)
        found.append({"indicator": "eot_gain", "attack": results["strongest_pgd"], "severity": "failure",
                      "fired": fired, "single": single.estimate.mean().item(), "eot": strongest.estimate.mean().item(),
                      "text": f"{results['attacks'][results['strongest_pgd']]['title']} with one draw per step instead "
                      f"of its EoT left {100 * single.estimate.mean().item():.2f}% correct against "
                      f"{100 * strongest.estimate.mean().item():.2f}% (gain {100 * gain:+.2f} points)" +
                      (": an evaluation without EoT overstates this defence" if fired else "")})
        clean = cascade.clean.head(cascade.m).select
        flips = int(((clean > 0) & (clean < 1)).sum())
        found.append({"indicator": "unstable_predictions", "attack": "clean", "severity": "note", "fired": flips > 0,
                      "points": flips, "text": f"the defence's own randomness changes its clean prediction on {flips} "
                      f"of {cascade.m} points (some but not all of {cascade.clean.draws} draws correct)"})
    return found


def _trace_indicators(run: PgdRun, idx: torch.Tensor, trace: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """A PGD run's silent successes (its last iterate correct by the attacker's draws where an earlier one fooled
    them all: best-iterate tracking keeps those) and incomplete optimisation (the points still unbroken before the
    last tenth of the steps: their mean loss still rising there, or some breaking there only)."""
    kept = int(((trace["best"] == 0) & (trace["last"] >= 0.5)).sum())
    out = [{"indicator": "silent_success", "attack": run.name, "severity": "note", "fired": kept > 0, "points": kept,
            "attacked": len(idx), "text": f"{run.title}: on {kept} of {len(idx)} points an iterate fooled every draw "
            "of the attacker but the last iterate did not; best-iterate tracking kept them"}]
    loss, correct = trace["loss"], trace["correct"]
    steps = loss.shape[1] - 1
    if steps < 10 or len(idx) == 0:
        return out
    w = max(1, round(LATE_WINDOW * steps))
    unbroken = correct[:, :steps + 1 - w].amin(dim=1) > 0
    late = int((unbroken & (correct[:, steps + 1 - w:].amin(dim=1) == 0)).sum())
    if unbroken.any():
        last = loss[unbroken, steps + 1 - w:].mean().item()
        rise_last = last - loss[unbroken, steps + 1 - 2 * w:steps + 1 - w].mean().item()
        rise_total = last - loss[unbroken, 0].mean().item()
    else:
        rise_last = rise_total = 0.0
    still = rise_last > LATE_RISE * abs(rise_total) and rise_last > 0
    fired = still or late > max(1, 0.01 * len(idx))
    out.append({"indicator": "incomplete_optimisation", "attack": run.name, "severity": "failure", "fired": fired,
                "late_breaks": late, "unbroken": int(unbroken.sum()), "rise_last": rise_last, "rise_total": rise_total,
                "text": f"{run.title}: over its last {w} steps the loss of the {int(unbroken.sum())} points still "
                f"unbroken rose by {rise_last:+.3g} (from the start: {rise_total:+.3g}) and {late} point(s) broke "
                "there" + (": more steps might lower this figure" if fired else "")})
    return out


def naive_figure(names: tuple[str, ...], standalone: dict[str, Verdict], cascade: "Cascade", results: dict[str, Any],
                 conf: float, section: str) -> dict[str, Any]:
    """What a naive evaluation of this defence would report: the worst case over the attacks `names` alone, on the
    standalone subset (the headline: an attack judged by one draw is right on average)."""
    missing = [n for n in names if n not in standalone]
    if missing:
        raise UserError(f"{section} lacks the attack(s) {', '.join(missing)} whose figure is this control's naive "
                        f"one (attacks run: {', '.join(standalone)}); add them to its pgd list.")
    verdict = worst_of([standalone[name] for name in names])
    titles = [results["attacks"][n]["title"] if n in results["attacks"] else n for n in names]
    return verdict.entry(conf, attacks=list(names), titles=titles)


def _autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, cfg: dict[str, Any],
                device: torch.device, bs: int, seed: int, cache: AttackCache, judge: Judge,
                pass_images: int | None = None) -> tuple[Verdict, torch.Tensor]:
    """AutoAttack's final points (it picks them with its own checks: APGD's best iterate, one pass per check), judged
    by `judge`. For a randomised defence its own verdict is a noisy check that chose the point, so it is not reused:
    the judge's fresh draws decide. For a deterministic one it is the same classification, kept so that a point it
    broke stays broken whatever the rounding of another batch.

    One AutoAttack run per batch of `bs` points (seed `seed + i` for batch i), each kept by `cache` once
    done, so an evaluation killed by a cluster's time limit loses at most one batch: AutoAttack's own state
    (inside a batch) would restart an interrupted attack on every still-robust point of the whole set."""
    settings = {"eps": eps, "norm": norm, "version": cfg["version"], "order": AUTOATTACK_ORDER.get(cfg["version"]),
                "labels": sha256_tensor(y), "x": sha256_tensor(x)}

    def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
        folder.mkdir(parents=True, exist_ok=True)
        flags, x_adv = run_autoattack(model, x[sl], y[sl], eps, cfg["version"], device, bs, seed + i,
                                      folder / f"batch_{i:05d}_autoattack_state.json", norm, pass_images)
        return {"robust": flags, "x_adv": x_adv}

    found = cache.batches("autoattack", settings, len(y), bs, f"AutoAttack {cfg['version']} ({norm} eps {eps:.4g})",
                          one_batch)
    flags, x_aa = found["robust"].bool(), found["x_adv"]
    verdict = judge(x_aa, y)
    return (verdict if judge.randomised else verdict & Verdict.certain(flags)), x_aa


def _square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, cfg: dict[str, Any],
            device: torch.device, bs: int, seed: int, cache: AttackCache, judge: Judge) -> tuple[Verdict, torch.Tensor]:
    """Square, batch by batch (seed `seed + i` for batch i, resumable through `cache`), judged by `judge`."""
    settings = {"eps": eps, "norm": norm, "n_queries": cfg["n_queries"], "p_init": cfg["p_init"],
                "labels": sha256_tensor(y), "x": sha256_tensor(x)}

    def one_batch(i: int, sl: slice, folder: Path) -> dict[str, torch.Tensor]:
        return {"x_adv": square_attack(model, x[sl], y[sl], eps, norm, cfg["n_queries"], cfg["p_init"], seed + i,
                                       device)}

    x_adv = cache.batches("square", settings, len(y), bs, f"Square ({cfg['n_queries']} queries, {norm} eps {eps:.4g})",
                          one_batch)["x_adv"]
    return judge(x_adv, y), x_adv


class Cascade:
    """The attacked points of one defence and what the attacks so far left of them.

    The first `m` points (the standalone subset, `sanity.n_points`) get every attack, so each attack's own
    figure and the gradient-masking checks that compare attacks stand on the same points. The other points get
    an attack only while the judge's selection draws still found the defence correct at least once on the point
    picked so far (AutoAttack's own practice, for a deterministic defence: while every earlier attack left it
    correct). That threshold, a selection share of exactly 0, loses nothing: the pick keeps the earlier attack on a
    tie and no share is below 0, so no later attack could be picked there, and both figures, the headline and the
    strict rule (already broken), are those of running every attack on every point. A point whose selection draws
    never find the defence correct clean is attacked by nothing and keeps its clean figures.

    `picked` records, per point, which attack the selection draws picked as the strongest so far (0: none beat the
    clean point)."""

    def __init__(self, clean: Verdict, m: int, confidence: float) -> None:
        self.clean, self.worst, self.confidence, self.m = clean, clean, confidence, m
        self.subset = torch.arange(len(clean.ok)) < m
        self.steps: list[dict[str, Any]] = []
        self.names = ["clean"]
        self.picked = torch.zeros(len(clean.ok), dtype=torch.long)

    def targets(self, subset_only: bool = False) -> torch.Tensor:
        """Indices of the points the next attack runs on: some selection draw correct clean, and in the subset or
        some selection draw still correct on the point picked so far."""
        wanted = self.subset if subset_only else self.subset | (self.worst.select > 0)
        return ((self.clean.select > 0) & wanted).nonzero().squeeze(1)

    def record(self, name: str, verdict: Verdict, attacked: int, seconds: float) -> None:
        """Fold an attack's verdict (neutral on the points it did not run on) into the worst case."""
        self.picked[self.worst.picks(verdict)] = len(self.names)
        self.names.append(name)
        self.worst = self.worst & verdict
        self.steps.append({"attack": name, "attacked_points": attacked, "seconds": round(seconds, 1),
                           **self.worst.entry(self.confidence)})
        log.info("cascade: after %s (%d points attacked, %.0f s) expected accuracy %.4f (strict %.4f) on %d points",
                 name, attacked, seconds, self.worst.estimate.mean().item(), self.worst.ok.float().mean().item(),
                 len(self.worst.ok))

    def strongest(self) -> dict[str, int]:
        """How many points each attack was finally picked on as the strongest (clean: none beat the clean point)."""
        return {name: int((self.picked == i).sum()) for i, name in enumerate(self.names)}

    def summary(self) -> list[dict[str, Any]]:
        """Each step as it ran (the worst case after it), with the points where that attack was finally picked."""
        picked = self.strongest()
        return [{**step, "picked_points": picked[step["attack"]]} for step in self.steps]

    def standalone(self, verdict: Verdict) -> Verdict:
        """An attack's own verdict on the subset (the clean point and this attack's, the stronger per point)."""
        return (self.clean & verdict).head(self.m)


Runner = Callable[[torch.Tensor], tuple[Verdict, torch.Tensor]]  # indices -> (their verdict, their attacked points)


def _place(x: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[idx] = part
    return out


def _strongest(runs: list[PgdRun], cascade: "Cascade", verdicts: dict[str, Verdict]) -> PgdRun:
    """The PGD run (not through a surrogate) that left the least accuracy on the subset, by the selection draws (the
    estimate draws only ever give figures); the first listed on a tie."""
    own = [r for r in runs if r.surrogate is None] or runs
    return min(own, key=lambda r: cascade.standalone(verdicts[r.name]).select.sum().item())


def evaluate_defence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_transfer: torch.Tensor,
                     common: dict[str, Any], cfg: dict[str, Any], device: torch.device, seed: int,
                     work_dir: Path, surrogates: dict[str, nn.Module] | None = None,
                     section: str = "the defence's evaluation section", naive: tuple[str, ...] = ()
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Verdict]:
    """Every attack of the protocol on the first `n_points` test points of one defence, in fp32, as a cascade
    (`Cascade`): transfer, AutoAttack, Square, each PGD(-EoT) run in the order listed, then the gradient-masking
    checks and the attack-failure indicators (`indicators`).

    `x_transfer` holds stored adversarial versions of the first test points, crafted on the classifier alone.
    `surrogates` maps a PGD run's name to the model its gradients come from (`PgdRun.surrogate`). Every attack's
    final points are judged with fresh draws (carso.verdicts): the headline is the per-point worst case over all
    attacks, the expected accuracy under the attack the selection draws picked for each point, and beside it the
    strict rule (every attack and every repeat correct). Returns the metrics, the adversarial points of each attack
    (for the report's examples) and the per-point worst-case verdict (so defences can be compared on the same
    points). A randomised defence whose `cfg` (named `section` in the error) would attack it as a deterministic one
    is refused before any attack runs. `naive` names the attacks whose worst case a naive evaluation of this defence
    would report (a positive control's, carso.methods.controls): their figure is given as `naive`.
    """
    conf, bs, eps, norm = common["confidence"], cfg["batch_size"], common["eps"], common.get("norm", "Linf")
    engine = engine_settings(cfg, device, model)
    model = prepare(model, device, engine["compile"], engine["layout"])  # folded, laid out, compiled: still fp32
    surrogates = {k: prepare(m, device, engine["compile"], engine["layout"]) for k, m in (surrogates or {}).items()}
    results: dict[str, Any] = {"eps": eps, "norm": norm, "precision": "fp32", **describe(device), "engine": engine}
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
    cache = AttackCache(work_dir / "work", model_digest(model), seed)
    runs = pgd_runs(eps, norm, cfg["pgd"], engine["pass_images"])
    cascade = Cascade(judge(xs, ys), min(cfg["sanity"]["n_points"], n), conf)
    results["clean_subset"] = cascade.clean.entry(conf)
    verdicts: dict[str, Verdict] = {}
    adversarial = {"clean": xs}
    attacks: dict[str, dict[str, Any]] = {}  # name -> kind, title and settings, in the order they ran
    traces: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # name -> (its points, its trajectory)

    def step(name: str, idx: torch.Tensor, run: Runner) -> None:
        start = time.perf_counter()
        part, x_adv = run(idx) if len(idx) else (neutral(0), xs[idx])  # nothing left to attack
        verdicts[name], adversarial[name] = scatter(part, idx, n), _place(xs, idx, x_adv)
        cascade.record(name, verdicts[name], len(idx), time.perf_counter() - start)

    def crafted(name: str, attack_spec: AttackSpec, x_start: torch.Tensor | None = None, source: nn.Module = model,
                tag: dict[str, Any] | None = None) -> Runner:
        """An attack crafted batch by batch (resumable, `cache`) on `source` (a surrogate's model, named by `tag`, or
        the defence) at the points `idx`, judged by `judge` on the defence."""
        def run(idx: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
            x_adv, trace = cache.run(name, source, xs[idx], ys[idx], attack_spec, device, bs,
                                     x_start=None if x_start is None else x_start[idx], tag=tag)
            traces[name] = (idx, trace)
            return judge(x_adv, ys[idx]), x_adv
        return run

    transfer = common.get("transfer_attack", "transfer")
    attacks["transfer"] = {"kind": "transfer", "title": f"transfer ({transfer}, crafted on the classifier alone)",
                           "attack": transfer}
    step("transfer", cascade.targets(), lambda idx: (judge(x_transfer[:n][idx], ys[idx]), x_transfer[:n][idx]))
    if cfg["autoattack"]["enabled"]:
        version = cfg["autoattack"]["version"]
        attacks["autoattack"] = {"kind": "autoattack", "title": f"AutoAttack ({version})", "version": version,
                                 "order": AUTOATTACK_ORDER.get(version)}
        step("autoattack", cascade.targets(), lambda idx: _autoattack(model, xs[idx], ys[idx], eps, norm,
                                                                      cfg["autoattack"], device, bs, seed, cache, judge,
                                                                      engine["pass_images"]))
    if cfg["square"]["enabled"]:
        attacks["square"] = {"kind": "square", "title": f"Square ({cfg['square']['n_queries']} queries)",
                             "n_queries": cfg["square"]["n_queries"], "p_init": cfg["square"]["p_init"]}
        step("square", cascade.targets(), lambda idx: _square(model, xs[idx], ys[idx], eps, norm, cfg["square"],
                                                              device, bs, seed, cache, judge))
    for run in runs:
        attacks[run.name] = {"kind": "pgd", "title": run.title, "loss": run.spec.loss, "steps": run.spec.steps,
                             "eot": run.spec.eot, "step_size": run.spec.alpha, "restarts": run.spec.restarts,
                             "zero_grad_patience": run.spec.zero_grad_patience, "surrogate": run.surrogate}
        step(run.name, cascade.targets(), crafted(run.name, run.spec, tag=run.surrogate,
                                                  source=surrogates[run.name] if run.surrogate else model))
    results["attacks"] = {}
    for name, info in attacks.items():
        results["attacks"][name] = cascade.standalone(verdicts[name]).entry(conf, scope="standalone", **info)
        log.info("%s alone: accuracy %.4f on the first %d points", info["title"], results["attacks"][name]["accuracy"],
                 results["attacks"][name]["n"])
    strongest = _strongest(runs, cascade, verdicts)
    results["strongest_pgd"] = strongest.name
    results["gradients"] = _gradients(model, xs, ys, adversarial[strongest.name], cascade.targets(subset_only=True),
                                      strongest.spec.eot, device, bs, engine["pass_images"])
    losses = list(dict.fromkeys(r.spec.loss for r in runs if r.surrogate is None)) or [strongest.spec.loss]
    results["sanity"] = _sanity(cascade, verdicts, step, crafted, strongest, adversarial[strongest.name], losses,
                                cfg["sanity"], conf, judge.randomised)
    results["cascade"] = cascade.summary()
    results["robust_worst_case"] = cascade.worst.entry(conf, scope="cumulative")
    results["strongest_per_point"] = cascade.strongest()
    standalone = {name: cascade.standalone(v) for name, v in verdicts.items()}
    results["gradient_masking"] = masking_checks(results, standalone, conf)
    for line in results["gradient_masking"]:
        log.warning("possible gradient masking: %s", line)
    results["indicators"] = indicators(results, standalone, traces, cascade, runs, conf)
    for found in results["indicators"]:
        failed = found["fired"] and found["severity"] == "failure"
        (log.warning if failed else log.info)("indicator %s (%s): %s", found["indicator"], found["attack"], found["text"])
    if naive:
        results["naive"] = naive_figure(naive, standalone, cascade, results, conf, section)
    results["seconds"] = time.perf_counter() - t0
    shutil.rmtree(work_dir / "work", ignore_errors=True)
    return results, adversarial, cascade.worst


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a person diffs (DVC's metrics file of an evaluation): clean accuracy on the whole test set (one
    draw per point); on the attacked points, clean and the per-point worst case, each attack alone (on the sanity
    subset, as the masking checks compare them), each as the headline (`acc`: the expected accuracy over the
    estimate draws) and the strict rule (`strict`: all repeats correct), with its number of points; and the numbers
    of draws and repeats behind them (1 and 1: a deterministic defence, whose two figures coincide). The intervals,
    settings, timings and diagnostics stay in metrics.json."""
    def entry(e: dict[str, Any]) -> dict[str, Any]:
        return {"acc": round(e["accuracy"], 4), "strict": round(e["strict"]["accuracy"], 4), "n": e["n"]}

    return {"clean": {"acc": round(metrics["clean"]["accuracy"], 4), "n": metrics["clean"]["n"]},
            "clean_attacked": entry(metrics["clean_subset"]), "worst_case": entry(metrics["robust_worst_case"]),
            "alone": {name: entry(e) for name, e in metrics["attacks"].items()},
            "verdict_draws": metrics["verdict_draws"], "verdict_repeats": metrics["verdict_repeats"]}


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_pgd: torch.Tensor, idx: torch.Tensor, eot: int,
               device: torch.device, bs: int, pass_images: int | None) -> dict[str, Any]:
    """Each attack loss's gradient diagnostics on the subset's clean-correct points, clean and after PGD."""
    out = {}
    for loss in LOSSES:
        seed_from(x[idx])
        out[loss] = {"clean": gradient_diagnostics(model, x[idx], y[idx], eot, device, bs, loss, pass_images),
                     "pgd_final": gradient_diagnostics(model, x_pgd[idx], y[idx], eot, device, bs, loss, pass_images)}
        zero = [100 * out[loss][k].get("zero_gradient_share", 0) for k in ("clean", "pgd_final")]
        log.info("%s gradient exactly zero on %.0f%% of %d clean points, %.0f%% after PGD", loss, zero[0], len(idx),
                 zero[1])
    return out


def _sanity(cascade: Cascade, verdicts: dict[str, Verdict], step: Callable[[str, torch.Tensor, Runner], None],
            crafted: Callable[..., Runner], strongest: PgdRun, x_pgd: torch.Tensor, losses: list[str],
            cfg: dict[str, Any], conf: float, randomised: bool) -> dict[str, Any]:
    """Gradient-masking checks on the standalone subset: the strongest PGD run continued to `more_steps_factor` x
    its steps (from where it stopped, on the points it left correct: the others keep its verdict; it joins the
    worst case); one FGSM step from the clean point with its loss and draws (iterative must beat single-step; it
    joins the worst case); for a randomised defence the same run with one draw per step instead of its EoT (the EoT
    gain; it joins the worst case); and PGD at a very large eps from the clean point with each attack loss of the
    suite (on every point of the subset; another threat model, never in the worst case: a gradient that is exactly
    zero leaves the points where they were, clean, so the check sees it). `verdicts` gains `base_steps`,
    `more_steps`, `fgsm`, `eot_single` (randomised) and `large_eps_<loss>`."""
    spec = strongest.spec
    base = verdicts[strongest.name]
    out: dict[str, Any] = {"base_steps": cascade.standalone(base).entry(conf, steps=spec.steps, run=strongest.name)}
    more = base
    if cfg["more_steps_factor"] > 1:
        extra = replace(spec, steps=(cfg["more_steps_factor"] - 1) * spec.steps, random_start=False, restarts=1)
        survivors = (cascade.subset & (cascade.clean.select > 0) & (base.select > 0)).nonzero().squeeze(1)
        step("more_steps", survivors, crafted("pgd_more_steps", extra, x_start=x_pgd))
        more = verdicts["more_steps"] & base
    verdicts.update(base_steps=base, more_steps=more)
    out["more_steps"] = cascade.standalone(more).entry(conf, steps=cfg["more_steps_factor"] * spec.steps,
                                                       run=strongest.name)
    fgsm = AttackSpec("fgsm", eps=spec.eps, steps=1, step_size=spec.eps, random_start=False, eot=spec.eot,
                      loss=spec.loss, norm=spec.norm, pass_images=spec.pass_images)
    step("fgsm", cascade.targets(subset_only=True), crafted("fgsm", fgsm))
    out["fgsm"] = cascade.standalone(verdicts["fgsm"]).entry(conf, loss=spec.loss, eot=spec.eot)
    if randomised and spec.eot > 1:
        step("eot_single", cascade.targets(subset_only=True), crafted("pgd_eot_single", replace(spec, eot=1)))
        out["eot_single"] = cascade.standalone(verdicts["eot_single"]).entry(conf, run=strongest.name, eot=1,
                                                                             steps=spec.steps)
    out["large_eps"] = {}
    subset = torch.arange(cascade.m)  # every point of the subset, misclassified clean or not: its figure must fall too
    for loss in losses:
        large = AttackSpec("pgd", eps=cfg["large_eps"], steps=cfg["large_eps_steps"], eot=spec.eot, loss=loss,
                           random_start=False, zero_grad_patience=spec.zero_grad_patience, norm=spec.norm,
                           pass_images=spec.pass_images)
        name = f"large_eps_{loss}"
        verdicts[name] = scatter(crafted(f"pgd_{name}", large)(subset)[0], subset, len(x_pgd))
        out["large_eps"][loss] = verdicts[name].head(cascade.m).entry(conf, eps=cfg["large_eps"],
                                                                      steps=cfg["large_eps_steps"])
    log.info("sanity on %d points: %s %d steps %.4f -> %d steps %.4f; eps %.3g: %s", out["base_steps"]["n"],
             strongest.name, spec.steps, out["base_steps"]["accuracy"], out["more_steps"]["steps"],
             out["more_steps"]["accuracy"], cfg["large_eps"],
             ", ".join(f"{k} {e['accuracy']:.4f}" for k, e in out["large_eps"].items()))
    return out


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
