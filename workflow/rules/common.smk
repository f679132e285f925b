# Validation of params.yaml and the small helpers shared by all stages. The defences, the methods behind them
# and the code each stage runs come from the library's registry (carso.defences) and carso.codedeps.
import os
import sys
from pathlib import Path

from carso.codedeps import stage_code
from carso.defences import defence as defence_spec, evaluation_keys, methods_of, report_keys
from carso.errors import UserError
from carso.params import validate as validate_params

try:  # the shared schema, every method's schema fragment and the cross-key rules, in one sentence on failure
    validate_params({k: v for k, v in config.items() if k != "params_file"}, PARAMS_FILE)
except UserError as err:
    sys.exit(f"error: {err}")

ROOT = os.path.normpath(config["output_root"])  # every output of this params file, logs and benchmarks included
if Path(PARAMS_FILE).resolve() == Path("params.yaml").resolve() and ROOT != ".":
    sys.exit("error: params.yaml: output_root must stay `.`: dvc.yaml reads and writes data/ and logs/ "
             "at the project root; give another run a root of its own in a params file of its own "
             "(snakemake --config params_file=PATH)")


def out(path):
    """`path` (data/..., logs/..., benchmarks/...) under the params file's output_root: params.yaml's `.` keeps the
    layout dvc.yaml uses; any other file writes under its own root (configs/*.yaml: runs/<name>), so runs of
    different params files never overwrite each other."""
    return path if ROOT == "." else f"{ROOT}/{path}"


DATASETS = config["datasets"]
DEFENCES = list(config["evaluation"]["defences"])  # the defences to evaluate: evaluation.defences, in its order
SPECS = {name: defence_spec(name, config) for name in DEFENCES}  # a variant: its base's loader, files and code
METHODS = methods_of(DEFENCES, config)  # the methods behind them: only their training stages are built


def code(stage, defences=()):
    """The library files `stage` runs (carso.codedeps): inputs, so editing one reruns exactly the stages it affects
    (the same lists are `deps` in dvc.yaml)."""
    return stage_code(stage, defences)


def all_targets():
    return expand(out("data/{dataset}/report/report.html"), dataset=DATASETS)


def settings(*keys):
    """The params.yaml keys (dotted for nested ones) a stage depends on; a change there reruns it."""
    values = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def heavy_resources(mem_mb):
    """Resources of the rules that run a model: a GPU when one is there, all cores otherwise."""
    return {"mem_mb": mem_mb, "gpu": 1 if config["runtime"]["device"] != "cpu" else 0}


def training_resources(mem_mb):
    """The data-parallel training rules also take `processes`: more than one GPU or process makes them
    data-parallel (e.g. `--set-resources train_purifier:gpu=4`, or `train_classifier:processes=2` on CPUs)."""
    return {**heavy_resources(mem_mb), "processes": 1}


def launcher(wildcards, resources):
    """`python -m carso`, or torchrun with one process per GPU (or per `processes`) when there are several."""
    n = max(int(getattr(resources, "gpu", 0)), int(getattr(resources, "processes", 1)))
    if n <= 1:
        return "python -m carso"
    return f"python -m torch.distributed.run --standalone --nproc_per_node {n} -m carso"


def evaluate_inputs(wildcards):
    """Every defence needs the classifier, the test set and the stored transfer examples, plus the trained files
    its registry entry names (`DefenceSpec.artifacts`)."""
    d = out(f"data/{wildcards.dataset}")
    spec = SPECS[wildcards.defence]
    inputs = {"code": code("evaluate", [spec.base]), "model": f"{d}/classifier/model.safetensors",
              "test": f"{d}/dataset/test.safetensors", "adversarial": f"{d}/adversarial/test.safetensors"}
    artifacts = [f"{d}/{a}" for a in spec.artifacts]
    return {**inputs, "artifacts": artifacts} if artifacts else inputs


def evaluate_settings(wildcards):
    """The keys one defence's evaluation depends on (carso.defences.evaluation_keys, also dvc.yaml's params)."""
    return settings(*evaluation_keys(SPECS[wildcards.defence]))


def report_inputs(wildcards):
    """The shared results, every evaluated defence's metrics and examples, and each method's report files."""
    d = out(f"data/{wildcards.dataset}")
    inputs = {"code": code("report", sorted({s.base for s in SPECS.values()})), "manifest": f"{d}/dataset/manifest.json",
              "curve": f"{d}/classifier/curve.csv", "train": f"{d}/classifier/train_metrics.json",
              "adversarial": f"{d}/adversarial/summary.json",
              "evals": [f"{d}/eval/{name}/{f}" for name in DEFENCES for f in ("metrics.json", "examples.safetensors")]}
    return {**inputs, "methods": [f"{d}/{f}" for m in METHODS for f in m.report_files]}


def report_settings():
    return settings(*report_keys(METHODS))
