"""The report: results per defence with confidence intervals, gradient-masking checks, paired comparisons of
the defences on the same points, a figure of what each defence makes of a few inputs, the training curves,
each method's own part (from the registry) and the settings that produced them.

Writes `report.html` (self-contained: figures embedded), `report.md` and the figures as PNG files under
`figures/`. Every number comes from the files the pipeline wrote; the only arithmetic here is the paired
comparison of two defences' per-point verdicts on the points both were attacked on.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any, Callable

import yaml

from carso.datasets import DATASETS, dataset_spec
from carso.defences import THREAT_KEYS, defence, method_of, methods_of, overrides_text, resolve
from carso.methods import DefenceSpec
from carso.io import atomic_path, load_tensors, read_json, write_text
from carso.layout import Results
from carso.stats import paired_outcomes

# (title, kind, content): kind "list" (sentences), "table" (rows, the first is the header), "code" (text) or
# "figure" (content: (file stem, PNG bytes))
Section = tuple[str, str, Any]
SHARED_SECTIONS = ("runtime", "data", "classifier", "adversarial", "evaluation")


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "not run"
    return (f"{100 * entry['accuracy']:.2f}% [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}] "
            f"(n={entry['n']})")


def _strict(entry: dict[str, Any] | None) -> str:
    """The strict rule's figure of an entry (carso.verdicts.Verdict.entry), with its number of repeats."""
    if not entry or "strict" not in entry:
        return "not run"
    repeats = entry["strict"]["repeats"]
    rule = f"all {repeats} repeats correct" if repeats > 1 else "one verdict"
    return f"{_pct(entry['strict'])}, {rule}"


def rule_words(m: dict[str, Any]) -> str:
    """How a defence's headline was measured, in words."""
    if m.get("verdict_draws", 1) > 1:
        return (f"expected accuracy under the strongest attack found for each point: each attack's final point "
                f"judged with {m['verdict_draws']} fresh draws that picked the strongest attack per point and "
                f"{m['verdict_draws']} more that estimated its probability of a correct answer")
    return "one verdict per point (deterministic: the expected accuracy and the strict rule coincide)"


def point_outcomes(path: Path, tensors: dict[str, Any] | None = None) -> tuple[list[float], list[bool]]:
    """An evaluation's per-point outcomes on its attacked points (examples.safetensors at `path`, or its `tensors`
    already read from there): the headline's probability of a correct answer under the strongest attack found, and
    the strict rule's verdict."""
    from carso.errors import UserError

    tensors = load_tensors(path)[0] if tensors is None else tensors
    if "robust_expected" not in tensors:
        raise UserError(f"{path} predates the expected-accuracy headline (it holds only the strict verdicts); rerun "
                        "that evaluation (its `evaluate` job) to compare it.")
    return tensors["robust_expected"].double().tolist(), tensors["robust_worst_case"].bool().tolist()


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()


def curves_png(curve: list[dict[str, float]]) -> bytes:
    """Loss and accuracies per epoch, as a PNG (a note instead when the classifier was imported: no epochs)."""
    plt = pyplot()
    if not curve:
        fig = plt.figure(figsize=(10, 1.2))
        fig.text(0.5, 0.5, "No training curve: the classifier was imported (classifier.pretrained), not trained.",
                 ha="center", va="center")
        return png(fig)
    epochs = [r["epoch"] for r in curve]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in curve], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="adversarial training loss", title="Training loss")
    for key, label in (("train_adv_acc", "train (adversarial batches)"), ("test_clean_acc", "test clean"),
                       ("test_adv_acc", "test PGD-10")):
        ax_acc.plot(epochs, [100 * r[key] for r in curve], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy per epoch")
    ax_acc.legend()
    fig.tight_layout()
    return png(fig)


def example_columns(ex: dict[str, Any], per_stage: int = 3) -> list[tuple[str, str | None, int | None]]:
    """The figure's columns: (tensor key, stage, sample): the clean input and up to `per_stage` images of each
    stage of the defence, then the same for the adversarial input."""
    stages = sorted({k[:-len("_clean")] for k in ex if k.endswith("_clean") and k != "pred_clean"})
    cols: list[tuple[str, str | None, int | None]] = []
    for which in ("clean", "adversarial"):
        cols.append((which, None, None))
        for stage in stages:
            cols += [(f"{stage}_{which}", stage, i) for i in range(min(per_stage, ex[f"{stage}_{which}"].shape[1]))]
    return cols


def examples_png(ex: dict[str, Any], label: str, classes: Callable[[int], str] = str) -> bytes:
    """Per example (a row): the clean image and what the defence made of it (each stage's images), then the
    evaluation's PGD adversarial image and what the defence made of that; titled with the true class, the
    defence's prediction and, under each stage image, the classifier's prediction on it (`classes`: a label's name)."""
    name = lambda t: classes(int(t))[:12]  # noqa: E731
    plt = pyplot()
    cols = example_columns(ex)
    k = ex["clean"].shape[0]
    fig, axes = plt.subplots(k, len(cols), figsize=(1.3 * len(cols), 1.6 * k), squeeze=False)
    for row in range(k):
        for col, (key, stage, i) in enumerate(cols):
            img = ex[key][row] if i is None else ex[key][row, i]
            ax = axes[row, col]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).float().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if stage is None:
                title = f"{key[:5]}: {name(ex['labels'][row])}\n-> {name(ex['pred_' + key][row])}"
            else:
                title = f"{stage}\n-> {name(ex[key + '_pred'][row, i])}"
            ax.set_title(title, fontsize=7)
    stages = ", ".join(sorted({s for _, s, _ in cols if s})) or "none"
    fig.suptitle(f"{label}\nclean (true class, then -> the defence's prediction), then its stages ({stages}, -> the "
                 f"classifier's prediction);\nthe evaluation's PGD adversarial, then its stages", fontsize=8)
    fig.tight_layout()
    return png(fig)


def headline_png(evals: dict[str, dict[str, Any]]) -> bytes:
    """Clean and worst-case robust accuracy of every defence on the points it was attacked on (the headline: the
    expected accuracy), as bars with their intervals, and the strict rule's figures as marks on them."""
    plt = pyplot()
    names = list(evals)
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(names), 3.2))
    for offset, key, label, colour in ((-0.2, "clean_subset", "clean", "#8aa7c7"),
                                       (0.2, "robust_worst_case", "worst case over all attacks", "#c0504d")):
        entries = [evals[n][key] for n in names]
        acc = [100 * e["accuracy"] for e in entries]
        err = [[a - 100 * e["ci_low"] for a, e in zip(acc, entries)], [100 * e["ci_high"] - a for a, e in zip(acc, entries)]]
        ax.bar([i + offset for i in range(len(names))], acc, 0.4, yerr=err, capsize=3, color=colour, label=label)
        strict = [(i + offset, 100 * e["strict"]["accuracy"]) for i, e in enumerate(entries) if "strict" in e]
        if strict:
            ax.scatter(*zip(*strict), marker="_", s=260, color="black", zorder=3,
                       label="strict rule (all repeats correct)" if key == "clean_subset" else None)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={evals[n]['robust_worst_case']['n']})" for n in names], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    level = _level(next(iter(evals.values()))["robust_worst_case"]["confidence"])
    ax.set_title(f"On the attacked points (expected accuracy), with {level} intervals", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return png(fig)


def _strongest_alone(m: dict[str, Any]) -> str:
    """The attack (not through a surrogate) that alone left the fewest points correct, with its figure."""
    own = {n: a for n, a in m["attacks"].items() if not a.get("surrogate")}
    name = min(own, key=lambda n: own[n]["accuracy"])
    return f"{_pct(own[name])}, {own[name]['title']}"


def results_rows(evals: dict[str, dict[str, Any]], specs: dict[str, DefenceSpec]) -> list[list[str]]:
    header = ["defence", "threat model", "clean (full test set, one draw per point)", "clean (attacked points)",
              "strongest attack, alone", "robust (worst case over all attacks, cumulative)",
              "robust, strict bound (every repeat of every attack correct)"]
    rows = [header]
    for name, m in evals.items():
        rows.append([f"`{name}` ({specs[name].title})", _threat(m), _pct(m["clean"]), _pct(m["clean_subset"]),
                     _strongest_alone(m), _pct(m["robust_worst_case"]), _strict(m["robust_worst_case"])])
    return rows


RULES_NOTE = [
    "The attacker picks, the judge re-draws: every attack returns one point per test point, chosen with its own "
    "queries of the defence; the evaluation then classifies that point with fresh draws of the defence that no attack "
    "saw, in two sets (the defence's verdict_draws each). The first set picks, per point, the strongest attack (the "
    "lowest share of correct draws); the second, independent of that choice, estimates the probability that the "
    "defence classifies the picked point correctly. No draw that chose a point judges it, so the minimum over attacks "
    "is not a selection on the defence's noise.",
    "The headline (the robust and clean figures without a qualifier) is the mean of that probability over the "
    "attacked points: the expected accuracy under the strongest attack found for each point. Its interval is Wilson's "
    "at that mean over the n points, which covers both the sample of points and each point's draws (a value in "
    "[0, 1] varies at most as a verdict does); for a deterministic defence it is Wilson's interval on n verdicts.",
    "The strict bound counts a point only if every repeat (the first verdict_repeats of the picking draws) of every "
    "attack classified it correctly. It is conservative, and it charges a randomised defence for its noise: it falls "
    "towards 0 as the repeats or the attacks multiply, even for a defence no attack moves. For a deterministic "
    "defence the two coincide.",
    "Defences are compared on the headline, point by point on the same first test points: the difference with its "
    "paired interval (Newcombe's, built from each side's interval and the correlation of their per-point figures) "
    "and the sign-flip test, which decides (on figures of 0 or 1 they are Newcombe's interval and McNemar's exact "
    "test). Where the strict rule disagrees about the sign or the significance of a difference, the sentence says so.",
]


def rules_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Each defence's clean and worst-case figures on its attacked points under both rules, and the draws behind
    them: the headline (expected accuracy) and the strict bound (all repeats correct)."""
    rows = [["defence", "randomised", "draws (picking + estimate) / strict repeats", "clean (attacked points): headline",
             "clean: strict", "worst case: headline", "worst case: strict", "strict minus headline, worst case"]]
    for name, m in evals.items():
        clean, worst = m["clean_subset"], m["robust_worst_case"]
        draws = m.get("verdict_draws", 1)
        rows.append([f"`{name}`", "yes" if m.get("randomised") else "no", f"{draws} + {draws} / {m['verdict_repeats']}",
                     _pct(clean), _pct(clean["strict"]), _pct(worst), _pct(worst["strict"]),
                     f"{100 * (worst['strict']['accuracy'] - worst['accuracy']):+.1f} points"])
    return rows


def attack_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Every attack of every defence, alone on the same first points."""
    rows = [["defence", "attack", "kind", "accuracy alone (on the first points)", "strict bound alone", "settings"]]
    for name, m in evals.items():
        for attack, a in m["attacks"].items():
            rows.append([f"`{name}`", a["title"], a["kind"], _pct(a), _strict(a), _settings(a)])
    return rows


def _settings(a: dict[str, Any]) -> str:
    if a["kind"] == "pgd":
        return (f"{a['steps']} steps x {a['eot']} EoT x {a['restarts']} restarts, step {a['step_size']:.4g}, "
                f"{LOSS_NAMES.get(a['loss'], a['loss'])} loss" + (f", gradients from {overrides_text(a['surrogate'])}, "
                                                                    "verdicts on the defence" if a.get("surrogate") else ""))
    if a["kind"] == "autoattack":
        order = f", in the order {' then '.join(a['order'])}" if a.get("order") else ""
        return f"version {a['version']}{order}"
    draws = f", each query the mean of {a['query_draws']} draws" if a.get("query_draws", 1) > 1 else ""
    if a["kind"] == "square":
        return f"at most {a['n_queries']} queries per point, p_init {a['p_init']}{draws}"
    if a["kind"] == "spsa":
        return (f"{a['iterations']} Adam steps (lr {a['lr']:.3g}) x {2 * a['samples']} queries (delta {a['delta']:.3g}), "
                f"margin loss, on the first {a['points']} points{draws}")
    if a["kind"] == "hopskipjump":
        return (f"{a['max_iter']} iterations, {a['init_eval']} to {a['max_eval']} queries per gradient estimate, "
                f"labels only (ART), a point counts only inside the ball, on the first {a['points']} points{draws}")
    return f"stored {a.get('attack', '')}, crafted on the classifier alone"


def _threat(m: dict[str, Any]) -> str:
    return f"{NORM_NAMES.get(m.get('norm', 'Linf'), m.get('norm'))} eps {m['eps']:.4g}"


NORM_NAMES = {"Linf": "L-inf", "L2": "L2", "L1": "L1"}


CASCADE_NOTE = [
    "Figures marked alone are one attack's own result on the first points of each defence (its sanity.n_points), "
    "where every attack runs on every point the defence classifies correctly clean: the gradient-masking checks "
    "compare these.",
    "The worst case is cumulative over all attacked points: the attacks run in the order of the cascade table, and "
    "past the first points an attack runs only on the points where some picking draw still found the defence correct "
    "(for a deterministic defence: every earlier attack left it correct, AutoAttack's own practice). Where none did, "
    "no later attack can be picked (a tie keeps the earlier one), so both figures are those of running every attack "
    "on every point, for less work. A point no picking draw classified correctly clean is attacked by nothing. "
    "The headline so far can rise a little after an attack: where that attack is picked, its figure comes from "
    "estimate draws of its own, an unbiased estimate that no picking saw, not from the draws that picked it.",
    "The strongest PGD run continued to more steps runs only on the points its base run left correct; the others "
    "keep its verdict. PGD at a very large eps, once with each attack loss of the suite, runs on every point of the "
    "subset from the clean point and never enters the worst case; at least one loss must bring accuracy near 0 (at "
    "most 10%): a gradient that is exactly zero leaves the points clean, and the check sees it.",
    "Every PGD run returns each point's best iterate by its own draws (the lowest share correct, then the highest "
    "loss), not only its last one; a randomised defence's pick is judged again with fresh draws. One FGSM step with "
    "the strongest run's loss and draws, and (randomised defences) that run with one draw per step instead of its "
    "EoT, run on the first points and join the worst case: the indicators of attack failure compare them.",
    "Attacks that need no gradient of the defence (transfer from the classifier alone, the black-box Square) must not "
    "beat the white-box ones (AutoAttack, PGD): where one clearly does, the white-box attack's gradients are masked.",
    "A PGD run through a surrogate computes its gradients on the defence built with other settings (e.g. an "
    "aggregation that never saturates), while every verdict is the real defence's. AutoAttack rand runs APGD-DLR "
    "first and APGD-CE on its survivors: the same attacks, and a saturated cross-entropy costs only those points.",
    "Each attack loss's input gradient (averaged over the EoT samples) is checked on the subset's points correct "
    "clean, before and after PGD: a loss that saturates (the cross-entropy of a steeply scaled output is exactly 0) "
    "has no gradient and blinds every attack on it; the margin losses (DLR, CW) ignore the scale.",
]


def cascade_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Each defence's attacks in the order they ran, with the points each attacked, the points where it was picked
    as the strongest, and the worst case after it under both rules."""
    rows = [["defence", "attack", "points attacked", "the strongest on (points, after every attack)", "seconds",
             "worst case so far (cumulative)", "strict bound so far"]]
    for name, m in evals.items():
        for step in m.get("cascade", []):
            rows.append([f"`{name}`", step["attack"], str(step["attacked_points"]), str(step["picked_points"]),
                         f"{step['seconds']:.0f}", _pct(step), _pct(step["strict"])])
    return rows


def gradient_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Each attack loss's input gradient per defence, on clean points and on PGD's final points."""
    rows = [["defence", "loss", "points", "gradient exactly 0: clean / after PGD", "loss exactly 0: clean / after PGD",
             "median gradient L1: clean / after PGD", "non-finite: clean / after PGD"]]
    for name, m in evals.items():
        for loss, g in m.get("gradients", {}).items():
            c, a = g["clean"], g["pgd_final"]
            if not c.get("points"):
                continue
            pair = lambda key: f"{100 * c[key]:.0f}% / {100 * a[key]:.0f}%"  # noqa: E731
            rows.append([f"`{name}`", loss, str(c["points"]), pair("zero_gradient_share"), pair("zero_loss_share"),
                         f"{c['median_gradient_l1']:.3g} / {a['median_gradient_l1']:.3g}", pair("nonfinite_share")])
    return rows


def sanity_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = [["defence", "strongest PGD run, base steps", "the same, more steps (continued)",
             "PGD at a very large eps, each loss (one must reach near 0)", "signs of gradient masking"]]
    for name, m in evals.items():
        san = m.get("sanity")
        if not san:
            rows.append([f"`{name}`", "not run", "not run", "not run", "; ".join(m.get("gradient_masking", [])) or "none"])
            continue
        large = "; ".join(f"{loss}: {_pct(e)}" for loss, e in san["large_eps"].items())
        eps = next(iter(san["large_eps"].values()))["eps"]
        rows.append([f"`{name}`", f"{_pct(san['base_steps'])}, {san['base_steps']['run']}, {san['base_steps']['steps']} steps",
                     f"{_pct(san['more_steps'])}, {san['more_steps']['steps']} steps",
                     f"eps {eps:.3g}: {large}", "; ".join(m.get("gradient_masking", [])) or "none seen"])
    return rows


def adversarial_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["split", "attack", "eps", "steps", "accuracy", "success rate"]]
    for split in ("train", "test"):
        for name, s in summary[split].items():
            if isinstance(s, dict):
                rows.append([split, name, f"{s['eps']:.4g}", str(s.get("steps", 1)),
                             f"{100 * s['accuracy']:.2f}%", f"{100 * s['success_rate']:.2f}%"])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c.replace('`', ''))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('`', ''))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_sentences(evals: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, m in evals.items():
        rc = m["robust_worst_case"]
        strict = rc["strict"]
        bound = (f" Strict bound (a point counts only if all {strict['repeats']} repeats of every attack were correct): "
                 f"{100 * strict['accuracy']:.2f}% [{100 * strict['ci_low']:.1f}, {100 * strict['ci_high']:.1f}]."
                 if m.get("verdict_draws", 1) > 1 else "")
        out.append(f"`{name}`: clean accuracy {100 * m['clean']['accuracy']:.2f}% on {m['clean']['n']} test "
                   f"images; robust accuracy {100 * rc['accuracy']:.2f}% on {rc['n']} points, "
                   f"{_level(rc['confidence'])} CI [{100 * rc['ci_low']:.1f}, {100 * rc['ci_high']:.1f}] "
                   f"({rule_words(m)}), {_threat(m)}, fp32, worst case over "
                   f"{len(m['attacks'])} attacks ({', '.join(a['title'] for a in m['attacks'].values())}); "
                   f"AutoAttack's randomness check found the model "
                   f"{'randomised' if m.get('randomised') else 'deterministic'}.{bound}")
        if m.get("gradient_masking"):
            out.append(f"`{name}` shows signs of gradient masking, so its white-box figures may overstate its "
                       f"robustness: {'; '.join(m['gradient_masking'])}.")
    return out


SATURATION_MARGIN = 0.25  # a zero-gradient share this far above the reference's names the defence
LOSS_NAMES = {"ce": "cross-entropy", "dlr": "DLR", "cw": "CW margin"}


def saturation_sentences(evals: dict[str, dict[str, Any]], reference: str = "at") -> list[str]:
    """Defences whose gradient for an attack loss is exactly zero on clearly more clean points than the classifier
    alone's (`reference`; 0 when it was not evaluated): attacks on that loss are blind there."""
    def share(m: dict[str, Any], loss: str) -> float | None:
        return m.get("gradients", {}).get(loss, {}).get("clean", {}).get("zero_gradient_share")

    out = []
    for name, m in evals.items():
        if name == reference:
            continue
        for loss in m.get("gradients", {}):
            zero, base = share(m, loss), share(evals[reference], loss) if reference in evals else None
            if zero is None or zero <= (base or 0.0) + SATURATION_MARGIN:
                continue
            than = f" (`{reference}`: {100 * base:.0f}%)" if base is not None else ""
            attacks = " (PGD with it, APGD-CE)" if loss == "ce" else ""
            out.append(f"`{name}`: the {LOSS_NAMES.get(loss, loss)} loss saturates: its input gradient is exactly zero "
                       f"on {100 * zero:.0f}% of the clean points it classifies correctly{than}, so attacks on that "
                       f"loss{attacks} are blind there and its worst case rests on the other attacks.")
    return out


def _level(confidence: float) -> str:
    return f"{100 * confidence:g}%"


Outcomes = dict[str, tuple[list[float], list[bool]]]  # defence -> per-point (headline probability, strict verdict)


def paired(first: str, second: str, evals: dict[str, dict[str, Any]], outcomes: Outcomes) -> dict[str, Any] | None:
    """`first` minus `second` on the first points both were attacked on (None if either is missing): the headline's
    paired test and, under `strict`, the strict rule's (carso.stats.paired_outcomes)."""
    if not {first, second} <= set(evals) or not {first, second} <= set(outcomes):
        return None
    return paired_outcomes(outcomes[first], outcomes[second], evals[first]["robust_worst_case"]["confidence"])


def _direction(d: dict[str, Any]) -> str:
    """"beat", "did worse than" or "did not measurably beat", as the paired test `d` decides."""
    if d["verdict"] != "real" or d["difference"] == 0:
        return "did not measurably beat"
    return "beat" if d["difference"] > 0 else "did worse than"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def rules_disagree(d: dict[str, Any]) -> str | None:
    """What the strict rule says of a pair where it reaches another verdict than the headline (a significant
    difference of the other sign, or significant where the headline is not, or the reverse); None where it agrees."""
    strict, level = d["strict"], _level(d["confidence"])
    says, headline = _direction(strict), _direction(d)
    if says == headline:
        return None
    what = "the sign" if "did not measurably beat" not in (says, headline) else "the significance"
    return (f"The strict rule disagrees on {what}: with all repeats correct the difference is "
            f"{100 * strict['difference']:+.1f} points ({level} CI [{100 * strict['ci_low']:+.1f}, "
            f"{100 * strict['ci_high']:+.1f}], McNemar {_p(strict['p_value'])}), which would say \"{says}\".")


def comparison_sentence(first: str, second: str, evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                        specs: dict[str, DefenceSpec]) -> str | None:
    """Did defence `first` beat `second`? On the headline, paired on the first points both were attacked on (None if
    either is missing), with what the strict rule says where it disagrees."""
    d = paired(first, second, evals, outcomes)
    if d is None:
        return None
    a, b, n = specs[first].label, specs[second].label, d["n"]
    ci = (f"{_level(d['confidence'])} paired interval [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] "
          f"points, sign-flip test {_p(d['p_value'])}")
    verdict = _direction(d)
    if verdict == "did not measurably beat":
        head = f"{a} did not measurably beat {b} on this run: difference {100 * d['difference']:+.1f} points ({ci})"
    else:
        head = f"{a} {verdict} {b} on this run, by {100 * d['difference']:+.1f} points ({ci})"
    text = (f"{head}. Expected robust accuracy under the strongest attack found for each point, on the same first {n} "
            f"test points: {a} {100 * d['acc_first']:.2f}%, {b} {100 * d['acc_second']:.2f}% ({a} more likely correct "
            f"on {d['more_first']} points, {b} on {d['more_second']}).")
    disagree = rules_disagree(d)
    return f"{text} {disagree}" if disagree else text


def counterpart(name: str, other: str, evals: dict[str, dict[str, Any]], specs: dict[str, DefenceSpec]) -> str | None:
    """The evaluated defence that stands for registered defence `other` next to `name`: `other` itself, or a variant
    of it that changes only the threat model, evaluated under the same threat model as `name` (None if none was)."""
    threat = lambda m: (m.get("norm", "Linf"), m.get("eps"))  # noqa: E731
    return next((c for c in evals if c != name and specs[c].base == other and threat(evals[c]) == threat(evals[name])
                 and all(k in THREAT_KEYS for k, _ in specs[c].overrides)), None)


def comparisons(evals: dict[str, dict[str, Any]], outcomes: Outcomes, specs: dict[str, DefenceSpec]) -> list[str]:
    """Each negative control against the defence it stands for, each defence against the ones its registry entry
    names (`compare_with`; under the same threat model), then what its paper reports, then the verdict on each
    defence evaluated with variants."""
    out = [s for name in evals if (s := control_sentence(name, evals, outcomes, specs))]
    for name in evals:
        partners = [p for other in specs[name].compare_with if (p := counterpart(name, other, evals, specs))]
        found = [s for p in partners if (s := comparison_sentence(name, p, evals, outcomes, specs))]
        out += found
        if found and specs[name].published:
            out.append(published_sentence(specs[name], evals[name]))
    return out + variant_findings(evals, outcomes, specs)


def control_sentence(name: str, evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                     specs: dict[str, DefenceSpec]) -> str | None:
    """A negative control (`DefenceSpec.negative_control_of`) against the defence whose expected predictions it has:
    its headline must not differ measurably, while the strict rule may charge it for its noise (None where either
    was not evaluated)."""
    spec = specs[name]
    reference = counterpart(name, spec.negative_control_of, evals, specs) if spec.negative_control_of else None
    d = paired(name, reference, evals, outcomes) if reference else None
    if d is None:
        return None
    level, strict = _level(d["confidence"]), d["strict"]
    clean = (f"clean accuracy on the whole test set {100 * evals[name]['clean']['accuracy']:.2f}% against "
             f"{100 * evals[reference]['clean']['accuracy']:.2f}%")
    figures = (f"`{name}` {100 * d['acc_first']:.2f}%, `{reference}` {100 * d['acc_second']:.2f}% on the same first "
               f"{d['n']} points, difference {100 * d['difference']:+.1f} points ({level} paired interval "
               f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], sign-flip test {_p(d['p_value'])}; {clean})")
    penalty = (f"The strict rule (all {evals[name]['verdict_repeats']} repeats correct) gives it "
               f"{100 * (strict['difference']):+.1f} points against `{reference}` ({level} CI "
               f"[{100 * strict['ci_low']:+.1f}, {100 * strict['ci_high']:+.1f}], McNemar {_p(strict['p_value'])}): "
               f"what that rule charges for noise alone.")
    if d["verdict"] == "real":
        return (f"Negative control FAILED: {spec.label} is {specs[reference].label} behind noise that leaves its "
                f"expected predictions unchanged, yet the headline separates them: {figures}. The headline charges "
                f"(or credits) noise here; do not trust the randomised defences' figures of this run. {penalty}")
    return (f"Negative control passed: {spec.label} ({specs[reference].label} behind noise that leaves its expected "
            f"predictions unchanged) has the headline of `{reference}` within the interval: {figures}. {penalty}")


CONTROL_MARGIN = 0.05  # a positive control counts as broken when the protocol leaves it at most this far above its base


def positive_controls(evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                      specs: dict[str, DefenceSpec]) -> dict[str, dict[str, Any]]:
    """Each evaluated positive control (`DefenceSpec.positive_control_of`) whose base was evaluated too: its naive
    figure, the protocol's worst case, the paired difference against its base on the same points, and whether the
    protocol broke it (at most CONTROL_MARGIN above the base)."""
    out = {}
    for name, m in evals.items():
        base = specs[name].positive_control_of
        d = paired(name, base, evals, outcomes) if base else None
        if d is None:
            continue
        out[name] = {"base": base, "paired": d, "naive": m.get("naive"), "worst": m["robust_worst_case"],
                     "broken": d["difference"] <= CONTROL_MARGIN, "fired": fired_checks(m)}
    return out


def controls_sentence(controls: dict[str, dict[str, Any]], specs: dict[str, DefenceSpec]) -> list[str]:
    """The report's first line about the protocol itself: did it break every positive control? A control it did
    not break is a failed evaluation, said first."""
    if not controls:
        return []
    level = _level(next(iter(controls.values()))["paired"]["confidence"])
    failed = [n for n, c in controls.items() if not c["broken"]]
    each = "; ".join(f"`{n}` {100 * c['worst']['accuracy']:.1f}% against `{c['base']}` "
                     f"{100 * c['paired']['acc_second']:.1f}% ({100 * c['paired']['difference']:+.1f} points, {level} "
                     f"paired interval [{100 * c['paired']['ci_low']:+.1f}, {100 * c['paired']['ci_high']:+.1f}])"
                     + (f", naive figure {100 * c['naive']['accuracy']:.1f}%" if c["naive"] else "")
                     for n, c in controls.items())
    flagged = [n for n, c in controls.items() if c["fired"]]
    flags = (f" The indicators flagged the naive figure of {len(flagged)} of {len(controls)}"
             + (f" (not: {', '.join(f'`{n}`' for n in controls if n not in flagged)})" if len(flagged) < len(controls)
                else "") + ".")
    if failed:
        return [f"EVALUATION FAILED: the protocol did not break the positive control(s) "
                f"{', '.join(f'`{n}`' for n in failed)}, defences known to be broken, so its attacks are too weak here "
                f"and every robust figure of this run may overstate its defence: {each}.{flags}"]
    return [f"The protocol broke every positive control (defences known to be broken, each within "
            f"{100 * CONTROL_MARGIN:.0f} points of the undefended model it wraps): {each}.{flags}"]


def control_rows(controls: dict[str, dict[str, Any]], evals: dict[str, dict[str, Any]],
                 specs: dict[str, DefenceSpec]) -> list[list[str]]:
    rows = [["control", "naive evaluation", "naive figure", "protocol (worst case)", "undefended base",
             "protocol minus base (paired)", "naive minus protocol", "indicators that fired", "verdict"]]
    for name, c in controls.items():
        d, naive = c["paired"], c["naive"]
        level = _level(d["confidence"])
        rows.append([f"`{name}` ({specs[name].title})",
                     ", ".join(naive["titles"]) if naive else "not given", _pct(naive) if naive else "n/a",
                     _pct(c["worst"]), f"`{c['base']}` {100 * d['acc_second']:.2f}% (same {d['n']} points)",
                     f"{100 * d['difference']:+.1f} points, {level} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]",
                     f"{100 * (naive['accuracy'] - c['worst']['accuracy']):+.1f} points" if naive else "n/a",
                     "; ".join(c["fired"]) or "none", "broken" if c["broken"] else "NOT BROKEN: failed evaluation"])
    return rows


def indicator_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Every attack-failure indicator of every defence: what it measured, and whether it fired."""
    rows = [["defence", "indicator", "concerns", "fired", "what it measured"]]
    for name, m in evals.items():
        for i in m.get("indicators", []):
            fired = ("yes" if i["severity"] == "failure" else "yes (a note)") if i["fired"] else "no"
            rows.append([f"`{name}`", i["indicator"].replace("_", " "), i["attack"], fired, i["text"]])
    return rows


def indicator_sentences(evals: dict[str, dict[str, Any]], specs: dict[str, DefenceSpec]) -> list[str]:
    """One sentence per defence (controls aside: their own section says it) on which an indicator of a failed or naive
    attack fired; a zero gradient is left to `saturation_sentences`, which says it against `at`."""
    out = []
    for name, m in evals.items():
        if specs[name].positive_control_of:
            continue
        fired = [i["text"] for i in m.get("indicators", [])
                 if i["fired"] and i["severity"] == "failure" and i["indicator"] != "zero_gradient"]
        if fired:
            out.append(f"`{name}`: attack-failure indicators fired, so a figure from the attacks they concern alone "
                       f"would overstate it: {'; '.join(fired)}.")
    return out


def published_sentence(spec: DefenceSpec, m: dict[str, Any]) -> str:
    """What the defence's paper reports, and whether it reports this run's dataset and threat model (when the
    metrics name them)."""
    if "eps" not in m:
        return spec.published
    dataset = dataset_spec(m["dataset"]) if m.get("dataset") in DATASETS else None
    title = dataset.title if dataset else m.get("dataset", "this dataset")
    same = any(d == m.get("dataset") and norm == m.get("norm", "Linf") and abs(eps - m["eps"]) < 1e-9
               for d, norm, eps in spec.published_settings)
    tail = (f"This run's setting ({title}, {_threat(m)}) is one of them." if same else
            f"It gives no figure for {title} at {_threat(m)}, this run's setting.")
    return f"{spec.published} {tail}"


def variant_findings(evals: dict[str, dict[str, Any]], outcomes: Outcomes,
                     specs: dict[str, DefenceSpec], reference: str = "at") -> list[str]:
    """For each defence evaluated together with variants: did any configuration beat `reference` (under the same
    threat model) on the worst case (the headline's paired test)?"""
    out = []
    for base in dict.fromkeys(s.variant_of for s in specs.values() if s.variant_of and s.variant_of != reference):
        diffs = {n: d for n in evals if specs[n].base == base and (ref := counterpart(n, reference, evals, specs))
                 and (d := paired(n, ref, evals, outcomes)) is not None}
        if not diffs:
            continue
        level = _level(evals[next(iter(diffs))]["robust_worst_case"]["confidence"])
        text = lambda n: (f"`{n}` {100 * diffs[n]['difference']:+.1f} points ({level} interval "  # noqa: E731
                          f"[{100 * diffs[n]['ci_low']:+.1f}, {100 * diffs[n]['ci_high']:+.1f}], {diffs[n]['n']} points)")
        winners = [n for n in diffs if _direction(diffs[n]) == "beat"]
        best = max(diffs, key=lambda n: diffs[n]["difference"])
        head = (f"Finding: {', '.join(text(n) for n in winners)} beat `{reference}` on the worst case"
                if winners else f"Finding: no configuration of {specs[base].label} beat `{reference}` on the worst "
                f"case; the closest was {text(best)}")
        out.append(f"{head}. Configurations evaluated, each against `{reference}` under its own threat model on the "
                   "same points: " + "; ".join(f"`{n}` ({overrides_text(dict(specs[n].overrides)) or 'as configured'})"
                                              for n in diffs) + ".")
    return out


def plugin_rows(evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The defences that installed plugins provide: which distribution, version and code each evaluation ran."""
    rows = [[n, m["plugin"]["plugin"], m["plugin"]["distribution"], m["plugin"]["version"],
             m["plugin"]["digest"][:16]] for n, m in evals.items() if m.get("plugin")]
    return [["defence", "plugin", "distribution", "version", "code sha256 (first 16)"], *rows] if rows else []


def gather(results: Results, defences: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """Read the shared results of one dataset and every evaluated defence's metrics and examples."""
    evals, outcomes, examples = {}, {}, {}
    for name in defences:
        evals[name] = read_json(results.path(f"eval/{name}/metrics.json"))
        path = results.path(f"eval/{name}/examples.safetensors")
        tensors, _ = load_tensors(path)
        outcomes[name] = point_outcomes(path, tensors)
        examples[name] = {k: v for k, v in tensors.items() if not k.startswith("robust_")}
    return {"manifest": read_json(results.path("dataset/manifest.json")),
            "train": read_json(results.path("classifier/train_metrics.json")),
            "curve": read_curve(results.path("classifier/curve.csv")),
            "adversarial": read_json(results.path("adversarial/summary.json")), "evals": evals,
            "outcomes": outcomes, "examples": examples, "specs": {name: defence(name, params) for name in defences}}


def write_report(dataset: str, results: Results, params: dict[str, Any], out_dir: Path,
                 params_file: str = "params.yaml") -> None:
    """Write report.html, report.md and figures/*.png for the defences of evaluation.defences; `params_file`: the
    file the run read, named with the command that reproduces it."""
    from carso.generalisation import (  # (it builds on this module's helpers)
        gather_sources, gather_threats, generalisation_sections)

    defences = list(params["evaluation"]["defences"])
    facts = gather(results, defences, params)
    sections = _sections(dataset, facts, params, params_file)
    sections[4:4] = generalisation_sections(  # after the first screen, the details and the full results table
        facts["evals"], facts["outcomes"], gather_threats(results, params), gather_sources(results, params))
    for method in methods_of(defences, params):
        sections[-2:-2] = resolve(method.report)(results, params) if method.report else []
    render(f"{params['report']['title']} ({dataset})", dataset, sections, out_dir)


def render(title: str, dataset: str, sections: list[Section], out_dir: Path, stem: str = "report") -> None:
    """Write `sections` as <stem>.html (self-contained), <stem>.md and figures/*.png under `out_dir`."""
    md, body = [f"# {title}"], [f"<h1>{html.escape(title)}</h1>"]
    figures: dict[str, bytes] = {}
    for heading, kind, content in sections:
        md.append(f"\n## {heading}\n")
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if kind == "table":
            md.append(_md_table(content))
            body.append(_html_table(content))
        elif kind == "figure":
            name, data = content
            figures[name] = data
            md.append(f"![{name}](figures/{name}.png)")
            encoded = base64.b64encode(data).decode()
            body.append(f'<img alt="{name}" style="max-width:100%" src="data:image/png;base64,{encoded}">')
        elif kind == "code":
            md.append(f"```yaml\n{content}```")
            body.append(f"<pre>{html.escape(content)}</pre>")
        else:
            md.append("\n".join(f"- {s}" for s in content))
            body.append("<ul>" + "".join(f"<li>{html.escape(s.replace('`', ''))}</li>" for s in content) + "</ul>")
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        (out_dir / "figures").mkdir(exist_ok=True)
    for name, data in figures.items():
        with atomic_path(out_dir / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(data)
    write_text(out_dir / f"{stem}.md", "\n".join(md) + "\n")
    style = ("body{font-family:system-ui,sans-serif;max-width:80em;margin:2em auto;padding:0 1em;color:#222;"
             "line-height:1.45}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:.9em;margin:.5em 0}th{background:#eef2f7;text-align:left}"
             "td,th{border:1px solid #c8ccd2;padding:.3em .6em;vertical-align:top}tbody tr:nth-child(even){"
             "background:#f8f9fb}li{margin:.25em 0}pre{background:#f4f4f4;padding:1em;overflow-x:auto}")
    write_text(out_dir / f"{stem}.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
               f"{html.escape(dataset)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def fired_checks(m: dict[str, Any]) -> list[str]:
    """The failure indicators and masking checks that fired on one evaluation, each in a few words."""
    return [f"{i['indicator']} ({i['attack']})" for i in m.get("indicators", []) if i["fired"] and
            i["severity"] == "failure"] + [f"masking: {line.split(':')[0]}" for line in m.get("gradient_masking", [])]


def _flags(name: str, m: dict[str, Any], controls: dict[str, dict[str, Any]]) -> list[str]:
    """What the diagnostics raised on one defence: fired failure indicators, masking checks, a control's outcome."""
    fired = fired_checks(m)
    if name in controls:
        fired.append("positive control: broken" if controls[name]["broken"] else "positive control LEFT STANDING")
    return fired


def first_rows(facts: dict[str, Any], controls: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The report's first table: per defence its clean and headline robust accuracy on the attacked points (interval,
    n), the paired difference against `at` on the same points, and its flags."""
    evals, outcomes = facts["evals"], facts["outcomes"]
    rows = [["defence", "clean (attacked points)", "robust: headline worst case", "vs `at` (paired, same points)",
             "flags"]]
    for name, m in evals.items():
        d = paired(name, "at", evals, outcomes) if name != "at" else None
        versus = (f"{100 * d['difference']:+.1f} points [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] "
                  f"(n={d['n']}, {_p(d['p_value'])})" if d else "")
        rows.append([f"`{name}`", _pct(m["clean_subset"]), _pct(m["robust_worst_case"]), versus,
                     "; ".join(_flags(name, m, controls)) or "none"])
    return rows


def in_short(facts: dict[str, Any], controls: dict[str, dict[str, Any]], params_file: str) -> list[str]:
    """At most five plain sentences: the positive controls, the negative control, which defence wins, what was flagged,
    and how to reproduce the run."""
    evals, specs = facts["evals"], facts["specs"]
    real = [n for n in evals if getattr(method_of(specs[n].base), "name", None) != "controls"]  # not a control
    sentences = [_controls_short(controls), _negative_short(facts), _winner_short(real, facts),
                 _flagged_short(real, evals), reproduce_line(params_file)]
    return [s for s in sentences if s]


def _controls_short(controls: dict[str, dict[str, Any]]) -> str | None:
    if not controls:
        return None
    standing = [f"`{n}`" for n, c in controls.items() if not c["broken"]]
    if standing:
        return (f"EVALUATION FAILED: the protocol left the positive control(s) {', '.join(standing)} standing, so every "
                "robust figure of this run may overstate its defence.")
    unflagged = [f"`{n}`" for n, c in controls.items() if not c["fired"]]
    flagged = "each naive figure" if not unflagged else f"every naive figure but {', '.join(unflagged)}'s"
    return (f"The protocol broke all {len(controls)} positive controls (each within {100 * CONTROL_MARGIN:.0f} points "
            f"of the undefended model it wraps), and the indicators flagged {flagged}.")


def _negative_short(facts: dict[str, Any]) -> str | None:
    evals, outcomes, specs = facts["evals"], facts["outcomes"], facts["specs"]
    found = []
    for name in (n for n in evals if specs[n].negative_control_of):
        reference = counterpart(name, specs[name].negative_control_of, evals, specs)
        d = paired(name, reference, evals, outcomes) if reference else None
        if d is not None:
            found.append(f"`{name}` {'FAILED' if d['verdict'] == 'real' else 'passed'} "
                         f"({100 * d['difference']:+.1f} points against `{reference}`)")
    if not found:
        return None
    return ("The negative control, noise that leaves the expected predictions unchanged, must keep its reference's "
            f"headline within the interval: {'; '.join(found)}.")


def _winner_short(real: list[str], facts: dict[str, Any]) -> str | None:
    evals, outcomes = facts["evals"], facts["outcomes"]
    if not real:
        return None
    best = max(real, key=lambda n: evals[n]["robust_worst_case"]["accuracy"])
    text = f"Highest headline robust accuracy: `{best}`, {_pct(evals[best]['robust_worst_case'])}"
    if "at" not in evals:
        return text + "."
    beat = [f"`{n}`" for n in real if n != "at" and (d := paired(n, "at", evals, outcomes)) and _direction(d) == "beat"]
    return text + (f"; {', '.join(beat)} measurably beat `at`" if beat else "; no defence measurably beat `at`") + \
        " (paired, on the same points)."


def _flagged_short(real: list[str], evals: dict[str, dict[str, Any]]) -> str:
    flagged = {n: f for n in real if (f := _flags(n, evals[n], {}))}
    if not flagged:
        return "No failure indicator or masking check fired on the defences."
    return "Flagged: " + "; ".join(f"`{n}` ({', '.join(f)})" for n, f in flagged.items()) + "."


def _imported_lines(train: dict[str, Any]) -> list[str]:
    """The classifier section when train_classifier imported the classifier (classifier.pretrained)."""
    origin = f"{train['source']}" + (f", file {train['file']}" if train.get("file") else "")
    return [f"Not trained here: {train['name']} imported from {origin}; clean {100 * train['test_clean_acc']:.2f}% "
            f"and PGD-10 (eps {train['pgd10_eps']:.4g}) {100 * train['test_pgd10_acc']:.2f}% on the first "
            f"{train['monitor_points']} test images, in fp32 on {train['device']}."]


TRAINING_ATTACK_NAMES = {"pgd": "PGD", "fgsm_rs": "FGSM from a random start"}  # classifier.attack.method


def training_threat_line(params: dict[str, Any]) -> str:
    """The classifier's training attack and its monitor, in the threat model's norm (the classifier.attack keys)."""
    attack, norm = params["classifier"]["attack"], params["evaluation"]["norm"]
    radii = attack["eps"] if isinstance(attack["eps"], list) else [attack["eps"]]
    steps = "" if attack["method"] == "fgsm_rs" else f"-{attack['steps']}"
    return (f"Adversarial training: {TRAINING_ATTACK_NAMES[attack['method']]}{steps} at "
            f"{NORM_NAMES.get(norm, norm)} eps {', '.join(f'{e:.4g}' for e in radii)} (classifier.attack, "
            f"evaluation.norm); the PGD-10 monitor at eps {max(radii):.4g}.")


def reproduce_line(params_file: str) -> str:
    """The one command that reruns this report's pipeline from a fresh clone."""
    extra = "" if params_file == "params.yaml" else f" --config params_file={params_file}"
    return f"Reproduce: `bash run.sh pipeline{extra}` (settings: {params_file}, below)."


def _sections(dataset: str, facts: dict[str, Any], params: dict[str, Any],
              params_file: str = "params.yaml") -> list[Section]:
    """The shared sections; write_report puts each method's part before the last two."""
    train, man = facts["train"], facts["manifest"]["splits"]
    data_lines = [f"{split}: {info['count']} images of shape {info['shape']}, sha256 {info['sha256_images'][:16]}..."
                  for split, info in man.items()]
    train_lines = [f"{train['epochs']} epochs in {train['train_seconds']:.0f} s on {train['device']} "
                   f"({train['threads']} threads), precision {train['precision']}, channels_last "
                   f"{train['channels_last']}, last epoch {train['final_images_per_second']:.0f} images/s; last epoch: "
                   f"clean {100 * train['final_test_clean_acc']:.2f}% and "
                   f"PGD-10 {100 * train['final_test_adv_acc']:.2f}% on the first {train['monitor_points']} test images.",
                   training_threat_line(params)] if "source" not in train else _imported_lines(train)
    specs = facts["specs"]
    controls = positive_controls(facts["evals"], facts["outcomes"], specs)
    summary = controls_sentence(controls, specs) + comparisons(facts["evals"], facts["outcomes"], specs) + \
        summary_sentences(facts["evals"]) + indicator_sentences(facts["evals"], specs) + \
        saturation_sentences(facts["evals"])
    plugins = plugin_rows(facts["evals"])
    plugin_section = [("Defences from installed plugins", "table", plugins)] if plugins else []
    control_section = ([("Controls: defences known to be broken, which the protocol must break", "table",
                         control_rows(controls, facts["evals"], specs))] if controls else [])
    keys = SHARED_SECTIONS + tuple(s for m in methods_of(list(facts["evals"]), params) for s in m.sections)
    settings = {k: params[k] for k in keys if k in params}
    level = _level(params["evaluation"]["confidence"])
    examples = [(f"What `{name}` makes of a few test points", "figure",
                 (f"examples_{name}", examples_png(ex, f"{name} ({specs[name].title})",
                                                   dataset_spec(dataset).class_name)))
                for name, ex in facts["examples"].items()]
    return [("Results", "table", first_rows(facts, controls)),
            ("In short", "list", in_short(facts, controls, params_file)),
            ("Details", "list", summary),
            (f"Robust accuracy ({level} Wilson intervals, fp32 attacks)", "table", results_rows(facts["evals"], specs)),
            ("The headline and the strict bound", "table", rules_rows(facts["evals"])),
            ("How the defences are judged", "list", RULES_NOTE),
            *plugin_section,
            *control_section,
            ("Clean and worst-case robust accuracy on the same attacked points", "figure",
             ("headline", headline_png(facts["evals"]))),
            ("Each attack alone (on the same first points)", "table", attack_rows(facts["evals"])),
            ("How the attacks ran", "list", CASCADE_NOTE),
            ("Attack cascade (cumulative)", "table", cascade_rows(facts["evals"])),
            ("Gradient-masking checks (alone, on the same first points)", "table", sanity_rows(facts["evals"])),
            ("Indicators of attack failure (Pintor et al. 2022)", "table", indicator_rows(facts["evals"])),
            ("Input gradient of each attack loss (EoT-averaged, on the first points correct clean)", "table",
             gradient_rows(facts["evals"])),
            *examples,
            ("Data", "list", data_lines),
            ("Adversarial training of the classifier", "list", train_lines),
            ("Classifier training curves", "figure", ("training_curves", curves_png(facts["curve"]))),
            ("Adversarial examples against the classifier (success rate over the clean-correct points)", "table",
             adversarial_rows(facts["adversarial"])),
            (f"Settings ({params_file})", "code", yaml.safe_dump(settings, sort_keys=False))]
