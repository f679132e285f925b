"""What a method is: its training stages, its defences, its params sections and its part of the report.

Each method is a subpackage (`carso/methods/<name>/`) whose `__init__.py` defines `METHOD`, a `MethodSpec`,
and whose `schema.yaml` holds the JSON schema of its params.yaml sections. `carso.defences` registers it.
Functions are named by import path ("module:function") and imported only when a stage calls them, so reading
a record imports neither torch nor the method's code.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """A training stage of a method: a Snakemake rule and a DVC stage `name`, CLI subcommand `command`."""

    name: str                                # e.g. train_purifier (rule and DVC stage); CLI: train-purifier
    run: str                                 # "module:function", called as f(args, params, device, team)
    options: tuple[tuple[str, str], ...]     # CLI flags beyond --params/--dataset/--threads/--log-file, with help
    data_parallel: bool = False              # may run under torchrun (every other stage refuses it)
    help: str = ""
    settings: tuple[str, ...] = ()           # params.yaml keys it reads (the rule's settings, dvc.yaml's params)
    after: tuple[str, ...] = ()              # the stages whose outputs it reads (carso.stages adds their closure)
    out: str = ""                            # its folder under data/<dataset>/, e.g. "purifier"
    args: tuple[tuple[str, str], ...] = ()   # each option but --out and the path under data/<dataset>/ it carries
    reads: tuple[str, ...] = ()              # the files under data/<dataset>/ it reads (DVC deps, rule inputs)
    writes: tuple[str, ...] = ()             # the files under data/<dataset>/ it writes (DVC outs), curves aside
    curves: tuple[str, ...] = ()             # its training curves (DVC plots with x: epoch)
    mem_mb: int = 8000                       # the memory its job asks a cluster for (Snakemake's mem_mb resource)

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")


@dataclass(frozen=True)
class DefenceSpec:
    """A defence: how to load it as one nn.Module from [0, 1] images to logits, and how the report names it."""

    name: str                                # the `defence` wildcard, evaluation.defences.<name>, eval/<name>/
    title: str                               # the report's description, e.g. "classifier + CARSO purifier"
    label: str                               # its name in a sentence, e.g. "CARSO", "the classifier alone"
    load: str                                # "module:function", f(classifier_path, artifacts, dataset, params)
    artifacts: tuple[str, ...] = ()          # trained files it loads, relative to the dataset's folder, in order
    settings: tuple[str, ...] = ()           # params.yaml keys the loaded defence reads (beyond its weights)
    compare_with: tuple[str, ...] = ()       # defences the report compares it with, on the same points
    published: str = ""                      # what its paper reports, for the report's comparisons
    published_settings: tuple[tuple[str, str, float], ...] = ()  # (dataset, norm, eps) the paper reports figures for
    negative_control_of: str = ""            # a negative control: the defence whose headline it must equal (within
                                             # the interval) because its expected predictions are that one's
    positive_control_of: str = ""            # a positive control: a defence known to be broken, wrapping the undefended
                                             # model this names; the protocol must bring it down to that one's figure
    naive: tuple[str, ...] = ()              # a positive control's naive evaluation: the attacks (metrics names) whose
                                             # worst case alone would overstate it
    variant_of: str = ""                     # a variant (evaluation.defences.<name>.variant_of): its registered base
    overrides: tuple[tuple[str, object], ...] = ()  # the variant's `set`: dotted params keys and their values
    files: tuple[str, ...] = ()              # a loader-only defence: params keys whose values are files it loads (e.g.
                                             # a pretrained purifier's .safetensors), relative to the project root

    @property
    def base(self) -> str:
        """The registered defence whose loader, trained files and code this one uses (itself unless a variant)."""
        return self.variant_of or self.name


@dataclass(frozen=True)
class MethodSpec:
    """A method: the params sections it owns, its training stages, its defences and its report part."""

    name: str                                # its subpackage, carso/methods/<name>/
    title: str                               # e.g. "CARSO (arXiv 2306.06081)"
    sections: tuple[str, ...]                # top-level params.yaml sections (schema: <name>/schema.yaml)
    stages: tuple[StageSpec, ...]
    defences: tuple[DefenceSpec, ...]
    check_params: str | None = None          # "module:function", f(params, source): cross-key checks (UserError)
    check_models: str | None = None          # "module:function", f(params, source): checks that build a model (on
                                             # the meta device), run by the Snakefile's dry run and the method's own
                                             # stages only, so the other stages' code stays free of models
    report: str | None = None                # "module:function", f(root, params) -> the report's sections
    report_files: tuple[str, ...] = ()       # files, relative to the dataset's folder, that its report part reads
    api: int = 0                             # a plugin: the carso.plugin API version it was written for
    package: str = ""                        # a plugin: the module that declares it (set by the registry); its
                                             # folder holds schema.yaml. Built-in methods: carso/methods/<name>/
