# Validation of params.yaml and the small helpers shared by all stages.
import sys
from pathlib import Path

from carso.errors import UserError
from carso.params import validate as validate_params

try:
    validate_params({k: v for k, v in config.items() if k != "params_file"}, PARAMS_FILE)
except UserError as err:
    sys.exit(f"error: {err}")
validate(config, "../schemas/params.schema.yaml")

DATASETS = config["datasets"]
DEFENCES = ["at", "carso"]  # at: the adversarially-trained classifier alone; carso: classifier + purifier

# The library modules each stage runs: they are inputs, so editing one reruns exactly the stages it affects
# (the same lists are `deps` in dvc.yaml).
BASE_CODE = ["carso/cli.py", "carso/params.py", "carso/io.py", "carso/errors.py"]
MODEL_CODE = ["carso/attacks.py", "carso/checkpoint.py", "carso/data.py", "carso/device.py", "carso/distributed.py",
              "carso/models.py"]
PURIFIER_CODE = ["carso/purifier.py", "carso/representation.py"]
CODE = {
    "fetch": BASE_CODE + ["carso/data.py"],
    "train_classifier": BASE_CODE + MODEL_CODE + ["carso/training.py", "carso/resume.py", "carso/pretrained.py"],
    "generate_adversarial": BASE_CODE + MODEL_CODE + ["carso/advgen.py"],
    "train_purifier": BASE_CODE + [m for m in MODEL_CODE if m != "carso/attacks.py"] + PURIFIER_CODE
    + ["carso/purifier_training.py", "carso/resume.py"],
    "evaluate": BASE_CODE + MODEL_CODE + PURIFIER_CODE + ["carso/defence.py", "carso/aggregation.py",
                                                          "carso/evaluation.py", "carso/stats.py"],
    "report": BASE_CODE + ["carso/report.py", "carso/stats.py"],
}


def all_targets():
    return expand("data/{dataset}/report/report.html", dataset=DATASETS)


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
    """The two training rules also take `processes`: more than one GPU or process makes them data-parallel
    (e.g. `--set-resources train_purifier:gpu=4`, or `train_classifier:processes=2` on CPUs)."""
    return {**heavy_resources(mem_mb), "processes": 1}


def launcher(wildcards, resources):
    """`python -m carso`, or torchrun with one process per GPU (or per `processes`) when there are several."""
    n = max(int(getattr(resources, "gpu", 0)), int(getattr(resources, "processes", 1)))
    if n <= 1:
        return "python -m carso"
    return f"python -m torch.distributed.run --standalone --nproc_per_node {n} -m carso"


def evaluate_inputs(wildcards):
    """Both defences need the classifier, the test set and the stored transfer examples; carso its purifier."""
    inputs = {
        "code": CODE["evaluate"],
        "model": f"data/{wildcards.dataset}/classifier/model.safetensors",
        "test": f"data/{wildcards.dataset}/dataset/test.safetensors",
        "adversarial": f"data/{wildcards.dataset}/adversarial/test.safetensors",
    }
    if wildcards.defence == "carso":
        inputs["purifier"] = f"data/{wildcards.dataset}/purifier/model.safetensors"
    return inputs


def evaluate_settings(wildcards):
    """The keys one defence's evaluation depends on: a change to the other defence's section leaves it be."""
    keys = ["evaluation.eps", "evaluation.confidence", "evaluation.transfer_attack",
            f"evaluation.defences.{wildcards.defence}", "runtime.seed"]
    return settings(*keys, *(["carso"] if wildcards.defence == "carso" else []))
