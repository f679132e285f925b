"""Compare runs: which differences between them are real.

A run is named by its params file: the file says what was run, and its `output_root` says where the results are.
For every defence evaluated in two runs on the same test set, the per-point outcomes of the first points both runs
attacked are paired on the headline (each point's expected accuracy under the strongest attack found, carso.verdicts):
a paired interval of the difference (Newcombe's, from each run's interval and the correlation of their per-point
figures) and a sign-flip test, which says whether the runs differ for real or within noise (at the level
1 - evaluation.confidence of the first run; for a deterministic defence they are Newcombe's interval and McNemar's
exact test). The strict rule's paired test stands beside it. The page shows the parameter differences, every
defence's figures side by side with their intervals, and the paired tests.
A git revision or DVC experiment (--rev) is a run too: its params.yaml from git, its results from DVC's cache.
A study (carso.study) is compared the same way, variant by variant, with a plot against its axis when it has one.

Writes compare.html (self-contained) and compare.md, through the report's renderer.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carso.errors import UserError
from carso.io import read_json
from carso.params import load_params, validate
from carso.layout import Results
from carso.report import Section, _level, _pct, _strict, point_outcomes, png, pyplot, render
from carso.stats import paired_outcomes
from carso.study import Plan, Study, load_study


@dataclass
class Run:
    """One run's settings and the results of its evaluated defences on one dataset."""
    name: str  # the params file, as given (a study's variant: its label)
    params: dict[str, Any]
    results: Results  # <output_root>/data/<dataset>, or where a study variant's stage folders are
    metrics: dict[str, dict[str, Any]]  # defence -> metrics.json
    outcomes: dict[str, tuple[list[float], list[bool]]]  # defence -> per point: headline probability, strict verdict
    test_set: str  # sha256 of the test split (manifest.json): pairs need the same points
    where: str = ""  # where the results come from, in words (default: the results folder)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def parameter_differences(runs: list[Run]) -> list[list[str]]:
    """key | value in each run, for every dotted params key whose value differs (output_root aside)."""
    flats = [_flat(r.params) for r in runs]
    keys = sorted({k for f in flats for k in f} - {"output_root"})
    missing = "(absent)"
    rows = [[f"`{k}`", *(str(f.get(k, missing)) for f in flats)] for k in keys
            if len({repr(f.get(k, missing)) for f in flats}) > 1]
    return [["key", *(f"`{r.name}`" for r in runs)], *rows]


def load_run(params_file: str, dataset: str) -> Run:
    """A run's params (validated) and the metrics and worst-case verdicts of every defence it evaluates; one sentence
    naming the missing file and the command that makes it when the run has not finished."""
    params = load_params(params_file)
    _check_dataset(params, params_file, dataset)
    results = Results(Path(params["output_root"]) / "data" / dataset)
    return read_run(params_file, params, results, f"snakemake --cores all --config params_file={params_file}")


def _check_dataset(params: dict[str, Any], source: str, dataset: str) -> None:
    if dataset not in params["datasets"]:
        raise UserError(f"{source} does not run dataset '{dataset}' (its `datasets`: {params['datasets']}).")


def read_run(name: str, params: dict[str, Any], results: Results, command: str) -> Run:
    metrics, outcomes = {}, {}
    for defence in params["evaluation"]["defences"]:
        files = [results.path(f"eval/{defence}/{f}") for f in ("metrics.json", "examples.safetensors")]
        if not all(f.exists() for f in files):
            raise UserError(f"{name}: no results for defence '{defence}' in {files[0].parent}; run `{command}` first.")
        metrics[defence] = read_json(files[0])
        outcomes[defence] = point_outcomes(files[1])
    test_set = read_json(results.path("dataset/manifest.json"))["splits"]["test"]
    return Run(name, params, results, metrics, outcomes, str(test_set))


def load_revision(rev: str, dataset: str, scratch: Path) -> Run:
    """A git revision or DVC experiment of the DVC project in the working directory: its params.yaml from git, its
    evaluations from DVC's cache (dvc.api), copied under `scratch`. One sentence when either is not there."""
    import dvc.api
    import yaml

    try:
        params = yaml.safe_load(dvc.api.read("params.yaml", rev=rev))
    except Exception as err:  # dvc raises many kinds (unknown revision, no DVC repo, no such file)
        raise UserError(f"--rev {rev}: cannot read params.yaml at that revision ({type(err).__name__}); give a git "
                        "revision or a DVC experiment of this project (`git log`, `dvc exp show`).") from None
    params = validate(params, f"params.yaml at {rev}")
    _check_dataset(params, f"params.yaml at {rev}", dataset)
    root = scratch / re.sub(r"[^\w.-]", "_", rev) / "data" / dataset
    wanted = ["dataset/manifest.json", *(f"eval/{d}/{f}" for d in params["evaluation"]["defences"]
                                        for f in ("metrics.json", "examples.safetensors"))]
    for relative in wanted:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with dvc.api.open(f"data/{dataset}/{relative}", rev=rev, mode="rb") as source:
                target.write_bytes(source.read())
        except Exception as err:
            raise UserError(f"--rev {rev}: data/{dataset}/{relative} is not in DVC's cache for that revision "
                            f"({type(err).__name__}); run `dvc repro` (or `dvc exp apply {rev}` and `dvc pull`) "
                            "first.") from None
    run = read_run(rev, params, Results(root), f"dvc repro at {rev}")
    run.where = f"params.yaml from git and results from DVC's cache at revision {rev}"
    return run


def study_runs(study: Study, dataset: str) -> list[Run]:
    """Every variant of a study, its results where the study's plan put them."""
    _check_dataset(study.base_params, study.base, dataset)
    plan = Plan(study.base, study.base_params, study)
    command = f"snakemake --cores all --config study={study.source}"
    return [read_run(v.label, v.params, plan.results(i, dataset), command) for i, v in enumerate(study.variants)]


def _defences(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(name for r in runs for name in r.metrics))


def results_rows(runs: list[Run]) -> list[list[str]]:
    """defence | run | clean | worst case | its strict bound (with intervals and n): one row per defence and run, so
    that the table keeps its width however many runs a study has."""
    rows = [["defence", "run", "clean (full test set)", "worst case (attacked points)", "worst case, strict bound"]]
    for name in _defences(runs):
        for r in runs:
            m = r.metrics.get(name)
            cells = ([_pct(m["clean"]), _pct(m["robust_worst_case"]), _strict(m["robust_worst_case"])] if m else
                     ["not evaluated"] * 3)
            rows.append([f"`{name}`", f"`{r.name}`", *cells])
    return rows


def paired_rows(runs: list[Run], confidence: float) -> list[list[str]]:
    """Every defence evaluated in two runs on the same test set: the paired test of the pair's headline (the expected
    accuracy under the strongest attack per point), and the strict rule's verdict beside it."""
    rows = [["defence", "first run", "second run", "same first points", "worst case (first, second)",
             f"difference ({_level(confidence)} paired interval), points", "more likely correct: first / second",
             "sign-flip p", "verdict", "strict rule: difference, McNemar p, verdict"]]
    for name in _defences(runs):
        having = [r for r in runs if name in r.outcomes]
        for i, a in enumerate(having):
            for b in having[i + 1:]:
                if a.results.path(f"eval/{name}") == b.results.path(f"eval/{name}"):
                    continue  # one evaluation shared by both (a study stage no changed key reaches)
                if a.test_set != b.test_set:
                    rows.append([f"`{name}`", f"`{a.name}`", f"`{b.name}`", "0 (different test sets)", "", "", "", "",
                                 "not comparable", ""])
                    continue
                t = paired_outcomes(a.outcomes[name], b.outcomes[name], confidence)
                strict = t["strict"]
                rows.append([f"`{name}`", f"`{a.name}`", f"`{b.name}`", str(t["n"]),
                             f"{100 * t['acc_first']:.2f}%, {100 * t['acc_second']:.2f}%",
                             f"{100 * t['difference']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}]",
                             f"{t['more_first']} / {t['more_second']}", f"{t['p_value']:.3g}", t["verdict"],
                             f"{100 * strict['difference']:+.1f}, p {strict['p_value']:.3g}, {strict['verdict']}"])
    return rows


def compare_sections(runs: list[Run], dataset: str) -> list[Section]:
    confidence = runs[0].params["evaluation"]["confidence"]
    about = [f"`{r.name}`: {r.where or f'results in {r.results.root}'}" for r in runs] + [
        f"A paired test pairs one defence's per-point outcomes in two runs on the first test points both attacked, on "
        f"the headline: each point's expected accuracy under the strongest attack found for it (a deterministic "
        f"defence's: 0 or 1). The difference's interval is Newcombe's paired interval, built from each run's "
        f"interval and the correlation of their per-point figures; it is real when the sign-flip test (McNemar's "
        f"exact test for a deterministic defence) gives p < {1 - confidence:.2g} "
        f"(evaluation.confidence {confidence:g} of `{runs[0].name}`), and within noise otherwise. The strict rule's "
        f"test (every repeat correct; McNemar) stands beside it. Two runs that share one evaluation (a study's stage "
        f"that no changed key reaches) are not paired: their outcomes are the same by construction."]
    return [("Runs", "list", about),
            ("Parameter differences", "table", parameter_differences(runs)),
            (f"Results side by side ({_level(confidence)} Wilson intervals, {dataset})", "table", results_rows(runs)),
            ("Paired tests of the worst case (same first points)", "table", paired_rows(runs, confidence))]


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def axis_png(runs: list[Run], key: str, values: list[Any], labels: list[str]) -> bytes:
    """Clean (attacked points) and worst-case robust accuracy of every defence against a study's one axis, with
    the Wilson intervals."""
    plt = pyplot()
    numeric = _numeric(values)
    doubling = numeric and min(values) > 0 and max(values) / min(values) >= 8  # e.g. N = 1, 2, 4, 8, 16
    x = values if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = _defences(runs)
    for index, name in enumerate(names):
        colour = f"C{index}"
        shift = (index - (len(names) - 1) / 2) * 0.03  # side by side, so that equal figures stay readable
        xs = [v * 2 ** shift for v in x] if doubling else [v + shift * (max(x) - min(x) or 1) for v in x]
        for metric, style, what in (("clean_subset", "--", "clean"), ("robust_worst_case", "-", "worst case")):
            entries = [r.metrics[name][metric] for r in runs]
            acc = [100 * e["accuracy"] for e in entries]
            err = [[a - 100 * e["ci_low"] for a, e in zip(acc, entries)],
                   [100 * e["ci_high"] - a for a, e in zip(acc, entries)]]
            ax.errorbar(xs, acc, yerr=err, fmt="o" + style, color=colour, capsize=3, markersize=4,
                        label=f"{name}, {what}")
    if doubling:
        ax.set_xscale("log", base=2)
    ax.set_xticks(x, labels)
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    level = _level(runs[0].params["evaluation"]["confidence"])
    ax.set_title(f"On each defence's attacked points, with {level} Wilson intervals", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return png(fig)


def study_sections(study: Study, runs: list[Run], dataset: str) -> list[Section]:
    """The comparison of a study's variants, with the plot against its axis when it has one."""
    axes = ", ".join(f"`{k}` in {v}" for k, v in study.axes.items())
    lines = [f"Study file: `{study.source}`; base params: `{study.base}`; axes ({study.mode}): {axes}; "
             f"{len(runs)} variants."]
    sections = [("Study", "list", lines), *compare_sections(runs, dataset)]
    if len(study.axes) == 1:
        key = next(iter(study.axes))
        figure = axis_png(runs, key, study.axes[key], study.labels[key])
        sections.insert(1, (f"Accuracy against {key}", "figure", ("study_axis", figure)))
    return sections


def write_comparison(params_files: list[str], dataset: str, out_dir: Path, study_file: str | None = None,
                     revisions: list[str] | None = None) -> None:
    """compare.html and compare.md of the runs named by their params files and of git revisions or DVC experiments
    (`revisions`), or of a study's variants."""
    revisions = revisions or []
    if study_file:
        if params_files or revisions:
            raise UserError("compare: give either runs (params files, --rev) or --study, not both.")
        study = load_study(study_file)
        runs = study_runs(study, dataset)
        render(f"Study {study.name}: {len(runs)} variants ({dataset})", dataset, study_sections(study, runs, dataset),
               out_dir, stem="compare")
        return
    if len(params_files) + len(revisions) < 2:
        raise UserError("compare needs two runs or more: give their params files (e.g. params.yaml "
                        "configs/carso_large.yaml), git revisions or DVC experiments (--rev HEAD~1 --rev HEAD), or a "
                        "study (--study studies/carso_samples.yaml).")
    with tempfile.TemporaryDirectory() as scratch:
        runs = [load_run(f, dataset) for f in params_files]
        runs += [load_revision(rev, dataset, Path(scratch)) for rev in revisions]
    render(f"Comparison of {len(runs)} runs ({dataset})", dataset, compare_sections(runs, dataset), out_dir,
           stem="compare")
