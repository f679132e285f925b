"""The pipeline's stages as a graph: the params.yaml keys each stage reads, the stages whose outputs it reads and
the folder it writes under data/<dataset>/.

The Snakemake rules take their settings from here (dvc.yaml's params must match; tests/test_workflow.py checks
it), and a study (carso.study) uses the graph to tell which stages a changed key reaches: a stage is reached when
it, or any stage upstream of it, reads the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carso.defences import defence, evaluation_keys, methods_of, report_keys, threat_keys


@dataclass(frozen=True)
class Stage:
    name: str                   # the rule's name; the evaluate rule's jobs are evaluate:<defence>
    keys: tuple[str, ...]       # the params.yaml keys it reads (dotted for nested ones)
    after: tuple[str, ...]      # the stages whose outputs it reads
    out: str                    # its folder under data/<dataset>/
    args: tuple[tuple[str, str], ...] = ()  # CLI flags beyond --params/--dataset/--out/--log-file and the path under
                                            # data/<dataset>/ each carries (a file or another stage's folder)
    reads: tuple[str, ...] = ()  # the files under data/<dataset>/ it reads (DVC deps, Snakemake inputs)
    writes: tuple[str, ...] = ()  # the files (or folders) under data/<dataset>/ it writes (DVC outs)
    curves: tuple[str, ...] = ()  # training curves it writes (DVC plots, x: epoch)
    metrics: tuple[str, ...] = ()  # summary figures it writes (DVC metrics)
    extra: tuple[str, ...] = ()  # literal CLI tokens after --dataset (evaluate's --defence NAME)
    files: tuple[str, ...] = ()  # files outside data/<dataset>/ it reads, relative to the project root (a loader-only
                                 # defence's weights, named in params: DefenceSpec.files)


def lookup(params: dict[str, Any], key: str) -> Any:
    """The value of a dotted key (carso.n_samples) in a params dict."""
    node = params
    for part in key.split("."):
        node = node[part]
    return node


DATASET = ("dataset/train.safetensors", "dataset/test.safetensors", "dataset/manifest.json")
MODEL = "classifier/model.safetensors"

SHARED = (
    Stage("fetch", ("data",), (), "dataset", writes=DATASET),
    Stage("train_classifier", ("classifier", "data.download_root", "evaluation.norm", "runtime.seed"), ("fetch",),
          "classifier", args=(("--data", "dataset"),), reads=DATASET,
          writes=(MODEL, "classifier/train_metrics.json"), curves=("classifier/curve.csv",)),
    Stage("generate_adversarial", ("adversarial", "evaluation.norm", "runtime.seed"), ("fetch", "train_classifier"),
          "adversarial", args=(("--model", MODEL), ("--data", "dataset")), reads=(MODEL, *DATASET[:2]),
          writes=("adversarial/train.safetensors", "adversarial/test.safetensors", "adversarial/summary.json")),
)


TRAINING_BALL = "training"  # the training threat's folder among the crafted sets (carso.sources.TRAINING)
SOURCE_KEYS = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_fraction", "augment",
               "precision", "channels_last", "monitor_points")  # the classifier's settings the sources share


def craft_stage(threat: str | None = None) -> str:
    """The graph name of the crafting on the source models: craft_sources in the training threat,
    craft_sources@<threat> in an unseen one."""
    return "craft_sources" + (f"@{threat}" if threat else "")


def crafted_folder(threat: str | None = None) -> str:
    """Where craft_sources writes the points of one threat, under data/<dataset>/."""
    return f"sources/crafted/{threat or TRAINING_BALL}"


def source_stages(params: dict[str, Any]) -> list[Stage]:
    """train_sources and one craft_sources per threat (the training one and each of evaluation.threats), when the
    params file declares `sources` (carso.sources); none otherwise."""
    if not params.get("sources"):
        return []
    models = list(params["sources"]["models"])
    each = [f"sources/models/{m}" for m in models]
    train = Stage("train_sources", ("sources.models", *(f"classifier.{k}" for k in SOURCE_KEYS),
                                    "classifier.attack.eps", "evaluation.norm", "runtime.seed"), ("fetch",),
                  "sources/models", args=(("--data", "dataset"),), reads=DATASET,
                  writes=(*(f"{m}/model.safetensors" for m in each), *(f"{m}/train_metrics.json" for m in each)),
                  curves=tuple(f"{m}/curve.csv" for m in each))
    out = [train]
    for threat in [None, *(params["evaluation"].get("threats") or {})]:
        ball = ("evaluation.norm", "evaluation.eps") if threat is None else (
            f"evaluation.threats.{threat}.norm", f"evaluation.threats.{threat}.eps")
        folder = crafted_folder(threat)
        out.append(Stage(craft_stage(threat), ("sources", *ball,
                                               "runtime.seed"), ("fetch", "train_sources"), folder,
                         args=(("--models", "sources/models"), ("--data", "dataset")),
                         reads=(*(f"{m}/model.safetensors" for m in each), "dataset/test.safetensors"),
                         writes=(f"{folder}/points.safetensors", f"{folder}/summary.json"),
                         extra=("--threat", threat) if threat else ()))
    return out


def evaluate_stage(name: str, threat: str | None = None) -> str:
    """The graph name of defence `name`'s evaluation: evaluate:<defence> under the training threat,
    evaluate:<defence>@<threat> under an unseen one (evaluation.threats)."""
    return f"evaluate:{name}" + (f"@{threat}" if threat else "")


def threat_folder(name: str, threat: str) -> str:
    """Where defence `name`'s evaluation under unseen threat `threat` writes, under data/<dataset>/."""
    return f"threats/{threat}/{name}"


def unseen(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (defence, unseen threat) pair the params file evaluates, threat by threat."""
    threats = params["evaluation"].get("threats") or {}
    return [(name, threat) for threat, t in threats.items() for name in t["defences"]]


def producer(graph: dict[str, Stage], artifact: str) -> str:
    """The stage that writes `artifact` (a path under data/<dataset>/, e.g. purifier/model.safetensors)."""
    return next(s.name for s in graph.values() if artifact.startswith(s.out + "/"))


def graph(params: dict[str, Any]) -> dict[str, Stage]:
    """Every stage the params file runs, upstream stages first: the shared ones, the training stages of the
    methods behind evaluation.defences that an evaluated defence or the report reads, one evaluation per defence, one
    per (defence, unseen threat) of evaluation.threats, and the report."""
    names = list(params["evaluation"]["defences"])
    methods = methods_of(names, params)
    stages = {s.name: s for s in SHARED}
    sources = source_stages(params)
    stages.update((s.name, s) for s in sources)
    for method in methods:
        for st in method.stages:
            stages[st.name] = Stage(st.name, st.settings, st.after, st.out, st.args, st.reads, st.writes, st.curves)
    training = [s for s in stages if s not in {x.name for x in (*SHARED, *sources)}]
    for name in names:
        stages[evaluate_stage(name)] = _evaluation(stages, name, params)
    pairs = unseen(params)
    for name, threat in pairs:
        stages[evaluate_stage(name, threat)] = _evaluation(stages, name, params, threat)
    needed = {s for n in names for s in upstream(stages, evaluate_stage(n))} | {
        producer(stages, f) for m in methods for f in m.report_files}
    for name in [t for t in training if t not in needed]:  # a method's stages that no evaluated defence reads
        del stages[name]  # (at_noise needs none of the positive controls' trainings)
    training = [t for t in training if t in needed]
    evaluations = [f"{folder}/{f}" for folder in [f"eval/{n}" for n in names] + [threat_folder(*p) for p in pairs]
                   for f in ("metrics.json", "examples.safetensors")]
    crafts = [s for s in sources if s.name != "train_sources"]
    reads = ("dataset/manifest.json", "classifier/curve.csv", "classifier/train_metrics.json",
             "adversarial/summary.json", *evaluations, *(f"{s.out}/summary.json" for s in crafts),
             *(f for m in methods for f in m.report_files))
    evaluations_after = (*(evaluate_stage(n) for n in names), *(evaluate_stage(*p) for p in pairs))
    keys = (*report_keys(methods), *(("sources",) if sources else ()))
    stages["report"] = Stage("report", keys, (*training, *evaluations_after, *(s.name for s in crafts)),
                             "report", reads=reads, writes=("report/report.html", "report/report.md", "report/figures"))
    return stages


def _evaluation(stages: dict[str, Stage], name: str, params: dict[str, Any], threat: str | None = None) -> Stage:
    """Defence `name`'s evaluation: under the training threat (with the stored transfer attack, crafted in its
    ball), or under the unseen threat `threat` (no transfer points: its own radius)."""
    spec = defence(name, params)
    producers = tuple(dict.fromkeys(producer(stages, a) for a in spec.artifacts))
    folder = threat_folder(name, threat) if threat else f"eval/{name}"
    args = (("--model", MODEL), *(("--artifacts", a) for a in spec.artifacts), ("--data", "dataset"))
    reads = (MODEL, *spec.artifacts, "dataset/test.safetensors")
    if threat is None:
        args, reads = (*args, ("--adversarial", "adversarial")), (*reads, "adversarial/test.safetensors")
        keys, after, extra = evaluation_keys(spec), ("generate_adversarial", *producers), ("--defence", name)
    else:
        keys, after = threat_keys(spec, threat), ("train_classifier", *producers)
        extra = ("--defence", name, "--threat", threat)
    if craft_stage(threat) in stages:  # transfer from the unseen source models, crafted in this threat
        folder_of = crafted_folder(threat)
        args, reads = (*args, ("--sources", folder_of)), (*reads, f"{folder_of}/points.safetensors")
        after, keys = (*after, craft_stage(threat)), (*keys, "sources")  # (it checks that the points are given)
    files = tuple(str(lookup(params, key)) for key in spec.files)  # a loader-only defence's own files
    return Stage(evaluate_stage(name, threat), (*keys, *spec.files), after, folder, args, reads,
                 (f"{folder}/examples.safetensors", f"{folder}/metrics.json"), metrics=(f"{folder}/headline.json",),
                 extra=extra, files=files)


def upstream(stages: dict[str, Stage], name: str) -> list[str]:
    """`name` and every stage it depends on, directly or not."""
    seen, todo = [], [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.append(current)
            todo.extend(stages[current].after)
    return seen


def overlaps(read: str, changed: str) -> bool:
    """A stage that reads `read` sees a change of `changed` when one of the two dotted keys contains the other
    (reading `classifier` sees `classifier.epochs`; reading `evaluation.eps` does not see `evaluation.norm`)."""
    return read == changed or changed.startswith(read + ".") or read.startswith(changed + ".")


def reached(stages: dict[str, Stage], name: str, changed: str) -> bool:
    """Whether changing the key `changed` changes what stage `name` makes."""
    return any(overlaps(k, changed) for s in upstream(stages, name) for k in stages[s].keys)
