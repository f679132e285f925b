# Validation of params.yaml and the small helpers shared by all stages. The defences, the methods behind them
# and the code each stage runs come from the library's registry (carso.defences) and carso.codedeps.
import os
import sys
from pathlib import Path

from carso.codedeps import stage_code
from carso.defences import check_models, defence as defence_spec, methods_of
from carso.errors import UserError
from carso.params import validate as validate_params
from carso.pipeline import is_root, root_text, write_generated
from carso.record import record_run
from carso.stages import TRAINING_BALL, craft_stage, crafted_folder, evaluate_stage, producer, threat_folder, unseen
from carso.study import Plan, load_study, lookup

CONFIG = {k: v for k, v in config.items() if k not in ("params_file", "study")}  # the params file's own keys
try:  # the shared schema, every method's schema fragment and the cross-key rules, in one sentence on failure
    validate_params(CONFIG, PARAMS_FILE)
    check_models(methods_of(list(CONFIG["evaluation"]["defences"]), CONFIG), CONFIG, PARAMS_FILE)  # (builds models)
    STUDY = load_study(config["study"]) if "study" in config else None  # every variant validated too
except UserError as err:
    sys.exit(f"error: {err}")

ROOT = os.path.normpath(config["output_root"])  # every output of this params file, logs and benchmarks included
if Path(PARAMS_FILE).resolve() == Path("params.yaml").resolve() and ROOT != ".":
    sys.exit("error: params.yaml: output_root must stay `.`: dvc.yaml reads and writes data/ and logs/ "
             "at the project root; give another run a root of its own in a params file of its own "
             "(snakemake --config params_file=PATH)")

# Where each stage of each variant writes (carso.study.Plan): the `root` wildcard of every path, "" for params.yaml's
# `.`. Without a study every stage writes under output_root; in a study a stage that no axis reaches is shared with
# the base run and one that some axis reaches writes under runs/studies/<study>/<those axes' values>/.
PLAN = Plan(PARAMS_FILE, CONFIG, STUDY)
PLAN.write_params_files()
PIPELINE_FILES = write_generated(PLAN)  # DVC's pipeline file of each root (carso.pipeline); dvc.yaml is tracked
if any(is_root(PLAN, prefix) for prefix in PLAN.roots) and Path("dvc.yaml").exists() \
        and Path("dvc.yaml").read_text() != root_text(CONFIG):
    print("warning: dvc.yaml does not describe params.yaml's DAG (a changed evaluation.defences or datasets?): "
          "`python -m carso dvc-yaml` rewrites it; until then the stages it lacks are not recorded in DVC",
          file=sys.stderr)


def record_in_dvc():
    """When the workflow ends, in the process that drives it (never in cluster jobs): commit to DVC every stage
    whose job finished from the deps it has now (carso.record)."""
    record_run(PIPELINE_FILES, DATASETS)


def out(path):
    """`path` (data/..., logs/..., benchmarks/...) under the job's root: params.yaml's `.` keeps the layout dvc.yaml
    uses; any other file writes under its own root (configs/*.yaml: runs/<name>), so runs of different params files
    never overwrite each other."""
    return f"{{root}}{path}"


def made(wildcards, path):
    """The file `path` (data/{dataset}/<stage folder>/...) that the stage owning that folder wrote for this job's
    variants: under the same root, or under the shared one when the axes reaching this job do not reach it."""
    relative = path.format(**dict(wildcards.items())).split("/", 2)[2]
    stage = producer(PLAN.graph, relative)
    return f"{PLAN.upstream_prefix(wildcards.root, stage)}{path.format(**dict(wildcards.items()))}"


def src(path):
    """An input written by an upstream stage (see `made`), for a rule's input section."""
    return lambda wildcards: made(wildcards, path)


def params_file(wildcards):
    """The params file the job's stage runs with: the base file, or the study folder's own (PLAN)."""
    return PLAN.params_file_of(wildcards.root)


DATASETS = config["datasets"]
DEFENCES = list(config["evaluation"]["defences"])  # the defences to evaluate: evaluation.defences, in its order
SPECS = {name: defence_spec(name, config) for name in DEFENCES}  # a variant: its base's loader, files and code
UNSEEN = unseen(config)  # (defence, threat) of evaluation.threats: one evaluate_threat job each
METHODS = methods_of(DEFENCES, config)  # the methods behind them: only their training stages are built
SOURCES = list((config.get("sources") or {}).get("models", {}))  # unseen source models (carso.sources), or none
BALLS = [TRAINING_BALL, *(config["evaluation"].get("threats") or {})] if SOURCES else []  # where points are crafted


def code(stage, defences=()):
    """The library files `stage` runs (carso.codedeps): inputs, so editing one reruns exactly the stages it affects
    (the same lists are `deps` in dvc.yaml)."""
    return stage_code(stage, defences)


def all_targets():
    """Each variant's report (without a study: the params file's), and a study's comparison page."""
    reports = {f"{PLAN.prefix('report', i)}data/{d}/report/report.html" for i in range(len(PLAN.variants))
               for d in DATASETS}
    pages = [f"{STUDY.root}/compare/{d}/compare.html" for d in DATASETS] if STUDY else []
    return sorted(reports) + pages


def settings(stage):
    """The values of the params.yaml keys (dotted for nested ones) `stage` reads (carso.stages), in the params of
    the job's root; a change there reruns it. `stage` may be a function of the wildcards (evaluate)."""
    def values(wildcards):
        name = stage(wildcards) if callable(stage) else stage
        return {key: lookup(PLAN.params_of(wildcards.root), key) for key in PLAN.graph[name].keys}
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
    spec = SPECS[wildcards.defence]
    d = "data/{dataset}"
    inputs = {"code": code("evaluate", [spec.base]), "model": made(wildcards, f"{d}/classifier/model.safetensors"),
              "test": made(wildcards, f"{d}/dataset/test.safetensors"),
              "adversarial": made(wildcards, f"{d}/adversarial/test.safetensors")}
    artifacts = [made(wildcards, f"{d}/{a}") for a in spec.artifacts]
    files = PLAN.graph[evaluate_stage(spec.name, getattr(wildcards, "threat", None))].files
    if files:  # a loader-only defence's own files (DefenceSpec.files: params keys naming them)
        inputs["files"] = list(files)
    if SOURCES:  # the points crafted on the unseen source models in this evaluation's threat
        threat = getattr(wildcards, "threat", None)
        inputs["sources"] = made(wildcards, f"{d}/{crafted_folder(threat)}/points.safetensors")
    return {**inputs, "artifacts": artifacts} if artifacts else inputs


def threat_inputs(wildcards):
    """A defence under an unseen threat reads what its evaluation under the training threat does, except the stored
    transfer examples (crafted in the training threat's ball)."""
    return {k: v for k, v in evaluate_inputs(wildcards).items() if k != "adversarial"}


def sources_option(wildcards, input):
    """evaluate's --sources (craft_sources' folder for the job's threat) when params declares `sources`."""
    return f" --sources {Path(input.sources).parent}" if "sources" in input.keys() else ""


def report_inputs(wildcards):
    """The shared results, every evaluated defence's metrics and examples, and each method's report files."""
    d = "data/{dataset}"
    inputs = {"code": code("report", sorted({s.base for s in SPECS.values()})),
              "manifest": made(wildcards, f"{d}/dataset/manifest.json"),
              "curve": made(wildcards, f"{d}/classifier/curve.csv"),
              "train": made(wildcards, f"{d}/classifier/train_metrics.json"),
              "adversarial": made(wildcards, f"{d}/adversarial/summary.json"),
              "evals": [made(wildcards, f"{d}/eval/{name}/{f}") for name in DEFENCES
                        for f in ("metrics.json", "examples.safetensors")],
              "threats": [made(wildcards, f"{d}/{threat_folder(name, threat)}/{f}") for name, threat in UNSEEN
                          for f in ("metrics.json", "examples.safetensors")],
              "crafted": [made(wildcards, f"{d}/sources/crafted/{ball}/summary.json") for ball in BALLS]}
    return {**inputs, "methods": [made(wildcards, f"{d}/{f}") for m in METHODS for f in m.report_files]}


def report_folders(wildcards):
    """The report's --folders: the stage folders of its variant that live under another root (none in a plain run)."""
    moved = PLAN.results_at(wildcards.root, wildcards.dataset).arguments()
    return f" --folders {' '.join(moved)}" if moved else ""


# The methods' training rules (rules/methods.smk), generated from their `StageSpec`s.
def stage_inputs(stage):
    """The library files `stage` runs and the files it reads, each where the stage that wrote it put it."""
    return lambda wildcards: {"code": code(stage.name),
                              **{f"read{i}": made(wildcards, f"data/{{dataset}}/{r}") for i, r in enumerate(stage.reads)}}


def stage_outputs(stage):
    """The files `stage` writes under the job's root; its training curves are shown in `snakemake --report`."""
    files = [out(f"data/{{dataset}}/{w}") for w in stage.writes]
    curves = [report(out(f"data/{{dataset}}/{c}"), caption="../report/curve.rst", category="Training")
              for c in stage.curves]
    return files + curves


def stage_command(stage):
    """`stage`'s CLI command up to --threads: its subcommand, the params file, the dataset, each of its `args` (a file or a
    stage folder under data/<dataset>/) and --out; torchrun for a data-parallel stage that asks for several processes."""
    def command(wildcards, resources):
        launch = launcher(wildcards, resources) if stage.data_parallel else "python -m carso"
        words = [launch, stage.command, "--params", params_file(wildcards), "--dataset", wildcards.dataset]
        for flag, relative in stage.args:
            words += [flag, made(wildcards, f"data/{{dataset}}/{relative}/").rstrip("/")]
        return " ".join([*words, "--out", f"{wildcards.root}data/{wildcards.dataset}/{stage.out}"])
    return command


def stage_resources(stage):
    return training_resources(stage.mem_mb) if stage.data_parallel else heavy_resources(stage.mem_mb)
