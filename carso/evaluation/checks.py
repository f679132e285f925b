"""What a defence's results say about the attacks themselves: signatures of gradient masking (`masking_checks`) and
the indicators of attack failure (`indicators`), and a positive control's naive figure (`naive_figure`)."""
from __future__ import annotations

from typing import Any

import torch

from carso.errors import UserError
from carso.evaluation.cascade import Cascade, worst_of
from carso.evaluation.families.pgd import PgdRun
from carso.stats import paired_expected
from carso.verdicts import Verdict

MASKING_LIMITS = {"large_eps_max_accuracy": 0.10}
WHITE_BOX = ("autoattack", "pgd")  # the kinds of attack that follow the defence's own gradients
PROBES = {"transfer": "the transfer attack (crafted on the classifier alone)",
          "square": "the black-box Square attack (no gradients)",
          "spsa": "the score-based SPSA attack (no gradients)",
          "hopskipjump": "the decision-based HopSkipJump attack (labels only)"}


def _clearly_more(first: Verdict, second: Verdict, confidence: float) -> bool:
    """Did `first` leave clearly more accuracy than `second` on the same points (the headline's paired test: the
    estimate draws' per-point probabilities, p < 1 - confidence)?"""
    m = min(len(first.estimate), len(second.estimate))  # a capped attack (a query attack) stands on fewer points
    d = paired_expected(first.estimate[:m].tolist(), second.estimate[:m].tolist(), confidence)
    return d["verdict"] == "real" and d["difference"] > 0


def masking_checks(results: dict[str, Any], verdicts: dict[str, Verdict], confidence: float) -> list[str]:
    """Signatures of gradient masking in one defence's results, in words (empty when none was seen).

    An attack that needs no gradient of the defence (transfer from the classifier alone or from an unseen source
    model, black-box Square, the query attacks) must not beat one that follows them (AutoAttack, PGD); at a very
    large eps at least one attack loss must bring accuracy near 0; more PGD steps must not leave more points correct.
    A difference between two attacks counts only when the paired test on the same points finds it
    (carso.stats.paired_expected), so noise is not reported as masking."""
    found = []
    attacks = results["attacks"]
    white = [n for n, a in attacks.items() if a["kind"] in WHITE_BOX and not a.get("surrogate")]
    probes = [(p, w) for p, w in PROBES.items() if p in verdicts]
    probes += [(n, f"the {a['title']}") for n, a in attacks.items() if a["kind"] == "source" and n in verdicts]
    for probe, words in probes:
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


def indicators(results: dict[str, Any], standalone: dict[str, Verdict], traces: dict[str, tuple[torch.Tensor, dict]],
               cascade: Cascade, runs: list[PgdRun], conf: float) -> list[dict[str, Any]]:
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


def naive_figure(names: tuple[str, ...], standalone: dict[str, Verdict], cascade: Cascade, results: dict[str, Any],
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
