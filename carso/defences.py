"""The registry of defences: one place that maps a defence name to its method (what that method trains, its
params sections, its report part) and to how the defence loads as one nn.Module from [0, 1] images to logits.

The CLI, the params validation, the evaluation, the report and the Snakemake rules ask this module; none of
them imports a method by name. A built-in method is a subpackage of `carso.methods` plus one entry in `BUILTIN`;
an installed package adds one through the `carso.methods` entry-point group, active while a params file names it
in `plugins` (`use_plugins`, called by the params validation: carso.discovery).
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from carso import discovery
from carso.errors import UserError
from carso.methods import DefenceSpec, MethodSpec, StageSpec
from carso.methods.atop import METHOD as ATOP
from carso.methods.carso import METHOD as CARSO
from carso.methods.controls import METHOD as CONTROLS


AT = DefenceSpec("at", "adversarially-trained classifier alone", "the classifier alone",
                 "carso.checkpoint:load_classifier_defence")
BUILTIN: tuple[MethodSpec, ...] = (CARSO, ATOP, CONTROLS)  # a new built-in method: one more entry here
METHODS: list[MethodSpec] = list(BUILTIN)  # the built-in methods, then the plugins the params file names
DEFENCES: dict[str, DefenceSpec] = {AT.name: AT, **{d.name: d for m in METHODS for d in m.defences}}
PLUGINS: dict[str, discovery.Plugin] = {}  # the active plugins, by method name


def plugins_named(params: Any) -> list[str]:
    """The plugins a params file names (`plugins`), or none where the key is absent or not a list of names (the
    schema then says what is wrong with it)."""
    plugins = params.get("plugins") if isinstance(params, dict) else None
    return plugins if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins) else []


def use_plugins(names: list[str]) -> None:
    """Make the registry the built-in methods plus exactly the plugins `names` (params.yaml `plugins`), in that
    order; a plugin not installed, of another API version or taking a used name is refused in one sentence."""
    loaded = [discovery.load(n) for n in dict.fromkeys(names)]
    discovery.check_clashes(BUILTIN, loaded, [AT.name])
    METHODS[:] = [*BUILTIN, *(m for m, _ in loaded)]
    DEFENCES.clear()
    DEFENCES.update({AT.name: AT, **{d.name: d for m in METHODS for d in m.defences}})
    PLUGINS.clear()
    PLUGINS.update({m.name: p for m, p in loaded})


def plugin_of(name: str) -> discovery.Plugin | None:
    """The plugin behind registered defence `name`, or None for a built-in one."""
    method = method_of(name)
    return PLUGINS.get(method.name) if method else None


# Keys a variant of any defence may set besides those its base reads: the threat model's radius, and the stored
# transfer attack that must lie inside it (the same trained files evaluated at another eps).
THREAT_KEYS = ("evaluation.eps", "evaluation.transfer_attack")


def resolve(path: str) -> Callable[..., Any]:
    """The function a "module:function" path names, imported on demand."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def defence(name: str, params: dict[str, Any] | None = None) -> DefenceSpec:
    """A registered defence, or a variant that `params` declares (evaluation.defences.<name> with variant_of)."""
    if name in DEFENCES:
        return DEFENCES[name]
    section = (params or {}).get("evaluation", {}).get("defences", {}).get(name) or {}
    if section.get("variant_of") in DEFENCES:
        return variant(name, section)
    raise UserError(f"unknown defence '{name}'; the defences are: {', '.join(DEFENCES)}, and the variants that "
                    "evaluation.defences declares (variant_of: <defence>, set: {<params key>: <value>}).")


def variant(name: str, section: dict[str, Any]) -> DefenceSpec:
    """The registered defence `section["variant_of"]` re-evaluated with some inference settings changed: the same
    loader, trained files and code, compared on the same points with `at` and with its base."""
    base = DEFENCES[section["variant_of"]]
    change = overrides_text(section["set"])
    return replace(base, name=name, title=f"{base.title}, {change}", label=f"{base.label} ({change})",
                   compare_with=tuple(dict.fromkeys((*base.compare_with, base.name))), published="",
                   variant_of=base.name, overrides=tuple(section["set"].items()))


def overrides_text(overrides: dict[str, Any]) -> str:
    """Dotted params keys and values as the report and the logs name them: "carso.aggregation=logit, ..."."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def evaluation_keys(spec: DefenceSpec) -> list[str]:
    """The params.yaml keys one defence's evaluation depends on (the evaluate rule's settings, the DVC stage's
    params): the threat model, the intervals, its own section, the seed and what its loader reads. Another
    defence's section is not among them, so changing it leaves this evaluation be."""
    return ["evaluation.norm", "evaluation.eps", "evaluation.confidence", "evaluation.transfer_attack",
            f"evaluation.defences.{spec.name}", "runtime.seed", *spec.settings]


def threat_keys(spec: DefenceSpec, threat: str) -> list[str]:
    """The params.yaml keys one defence's evaluation under the unseen threat `threat` depends on: that threat's
    section instead of the training threat, so changing one threat's radius reruns only its evaluations."""
    return ["evaluation.confidence", f"evaluation.threats.{threat}", f"evaluation.defences.{spec.name}", "runtime.seed",
            *spec.settings]


def report_keys(methods: list[MethodSpec]) -> list[str]:
    """The params.yaml sections the report depends on: it prints every setting of the shared stages, the
    evaluation, its own, and those of each method it reports on."""
    return ["runtime", "data", "classifier", "adversarial", *(s for m in methods for s in m.sections), "evaluation",
            "report"]


def method_of(name: str) -> MethodSpec | None:
    """The method a registered defence belongs to (None for `at`, the classifier alone)."""
    return next((m for m in METHODS if any(d.name == name for d in m.defences)), None)


def methods_of(defences: list[str], params: dict[str, Any] | None = None) -> list[MethodSpec]:
    """The methods behind `defences` (variants declared in `params`: their base's), in registry order."""
    wanted = {m.name for m in (method_of(defence(d, params).base) for d in defences) if m is not None}
    return [m for m in METHODS if m.name in wanted]


def stage_owner(stage: str) -> MethodSpec:
    """The method whose training stage `stage` is."""
    return next(m for m in METHODS if any(s.name == stage for s in m.stages))


def check_models(methods: list[MethodSpec], params: dict[str, Any], source: str) -> None:
    """The checks of `methods` that build a model (`MethodSpec.check_models`): what the schema and the cross-key
    checks cannot see, e.g. a layer name the classifier lacks; one sentence (UserError) on failure."""
    for method in methods:
        if method.check_models:
            resolve(method.check_models)(params, source)


def training_stages() -> dict[str, StageSpec]:
    """Every method's training stages, by name."""
    return {s.name: s for m in METHODS for s in m.stages}


def method_dir(method: MethodSpec) -> Path:
    """The folder that holds a method's schema.yaml: carso/methods/<name>/, or a plugin's declaring module's."""
    if method.package:
        return discovery.module_dir(method.package)
    return Path(__file__).resolve().parent / "methods" / method.name
