"""DVC's pipeline files, generated from the registry (carso.stages, carso.codedeps, carso.study.Plan).

Every params file gets one: params.yaml the tracked `dvc.yaml` at the project root (`python -m carso dvc-yaml`
writes it; `--check` fails when it has drifted from the registry), any other params file (configs/<name>.yaml, a
study's variant folders) a `dvc.yaml` under its own output root, which the Snakefile writes at parse time. Each
stage of a generated file runs from the project root (`wdir`), with the same command, deps, params and outs as the
Snakemake job that makes the same files, so `dvc status`, `dvc repro`, `dvc exp` and the recording of a Snakemake
run (carso.record) work for every run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from carso.codedeps import stage_code
from carso.defences import defence
from carso.stages import Stage, producer
from carso.study import Plan, write_if_changed

ROOT_FILE = "dvc.yaml"
PERSIST = {"persist": True}
ITEM = "${item}"  # DVC's foreach variable: one stage per dataset

HEADER = """\
# Written by `python -m carso dvc-yaml` from the registry (carso/pipeline.py): do not edit; CI fails when it drifts.
# The same DAG as workflow/Snakefile, for `dvc repro`, `dvc exp run` and the recording of Snakemake runs
# (carso/record.py): fetch -> train_classifier -> generate_adversarial -> the methods' training stages -> one
# evaluate_<defence> per defence of params.yaml's evaluation.defences -> report. The code deps of each stage are
# the library files it runs (carso/codedeps.py). Every out is `persist: true` (rerunning a stage never deletes what
# it made before, so training can resume from its checkpoint) and cached by DVC, metrics and plots included. DVC's
# metrics are the evaluations' headline.json; the detail is in the metrics.json and train_metrics.json outs.
"""


def dvc_name(stage: str) -> str:
    """The DVC stage of a graph stage: evaluate:<defence> -> evaluate_<defence>, evaluate:<defence>@<threat> ->
    evaluate_<defence>_under_<threat> (DVC keeps `@` for its foreach items)."""
    return stage.replace(":", "_").replace("@", "_under_")


def command_of(stage: str) -> str:
    """The CLI subcommand that runs a graph stage."""
    return "evaluate" if stage.startswith("evaluate:") else stage.split("@")[0].replace("_", "-")


def _code(stage: Stage, params: dict[str, Any]) -> list[str]:
    if stage.name.startswith("evaluate:"):
        return stage_code("evaluate", [defence(stage.name.split(":", 1)[1].split("@")[0], params).base])
    if stage.name == "report":
        return stage_code("report", sorted({defence(n, params).base for n in params["evaluation"]["defences"]}))
    return stage_code(stage.name.split("@")[0])


def _stage(plan: Plan, prefix: str, stage: Stage, root_file: bool) -> dict[str, Any]:
    """One stage (a `foreach` over the datasets) of the pipeline file of the run writing under `prefix`."""
    params_file = plan.params_file_of(prefix)
    params = plan.params_of(prefix)

    def path(relative: str) -> str:  # a file under data/<dataset>/, under the root of the stage that writes it
        return f"{plan.upstream_prefix(prefix, producer(plan.graph, relative + '/'))}data/{ITEM}/{relative}"

    name = dvc_name(stage.name)
    tokens = ["python -m carso", command_of(stage.name), "--params", params_file, "--dataset", ITEM, *stage.extra]
    for flag, relative in stage.args:
        tokens += [flag, path(relative)]
    if stage.name == "report":
        tokens += ["--root", f"{prefix}data/{ITEM}"]
        moved = plan.results_at(prefix, ITEM).arguments()
        tokens += ["--folders", *moved] if moved else []
    tokens += ["--out", f"{prefix}data/{ITEM}/{stage.out}", "--log-file", f"{prefix}logs/{ITEM}/{name}.log"]
    body: dict[str, Any] = {"cmd": " ".join(tokens)}
    if not root_file:
        body["wdir"] = os.path.relpath(".", prefix or ".")
    body["deps"] = [*_code(stage, params), *(path(r) for r in stage.reads), *stage.files]
    keys = list(stage.keys)
    body["params"] = keys if root_file else [{params_file: keys}]
    body["outs"] = [{path(r): dict(PERSIST)} for r in stage.writes]
    if stage.metrics:
        body["metrics"] = [{path(r): dict(PERSIST)} for r in stage.metrics]
    if stage.curves:
        body["plots"] = [{path(r): {**PERSIST, "x": "epoch"}} for r in stage.curves]
    return body


def pipeline(plan: Plan, prefix: str, root_file: bool = False) -> dict[str, Any]:
    """The pipeline file (as a dict) of the stages writing under `prefix`, one `foreach` over the datasets each."""
    datasets: Any = "${datasets}" if root_file else list(plan.params_of(prefix)["datasets"])
    stages = {}
    for stage in plan.graph.values():
        if any(plan.prefix(stage.name, v) == prefix for v in range(len(plan.variants))):
            stages[dvc_name(stage.name)] = {"foreach": datasets, "do": _stage(plan, prefix, stage, root_file)}
    return {"stages": stages}


def render(document: dict[str, Any], header: str = HEADER) -> str:
    return header + yaml.safe_dump(document, sort_keys=False, width=120)


def file_of(prefix: str) -> Path:
    """Where the pipeline file of the run writing under `prefix` lives ("" -> the tracked dvc.yaml)."""
    return Path(prefix or ".") / ROOT_FILE


def is_root(plan: Plan, prefix: str) -> bool:
    """Whether `prefix` is params.yaml's own run: the tracked dvc.yaml describes it."""
    return prefix == "" and Path(plan.params_file_of(prefix)).resolve() == Path("params.yaml").resolve()


def generated_header(plan: Plan, prefix: str) -> str:
    return (f"# Written by the Snakefile (carso/pipeline.py) for {plan.params_file_of(prefix)}: do not edit, it is "
            "rewritten at each run.\n# Its stages run from the project root (wdir); `dvc status "
            f"{file_of(prefix)}` and `dvc repro {file_of(prefix)}` use it.\n")


def write_generated(plan: Plan) -> list[Path]:
    """The pipeline file of every root of `plan` but params.yaml's own (the tracked dvc.yaml, never edited by a
    run), each rewritten only when its content changes. Returns every pipeline file of the run, dvc.yaml included."""
    files = []
    for prefix in plan.roots:
        path = file_of(prefix)
        files.append(path)
        if is_root(plan, prefix):
            continue
        write_if_changed(path, render(pipeline(plan, prefix), generated_header(plan, prefix)))
    return files


def root_text(params: dict[str, Any]) -> str:
    """The tracked dvc.yaml for params.yaml (its output_root `.`)."""
    return render(pipeline(Plan("params.yaml", params), "", root_file=True))
