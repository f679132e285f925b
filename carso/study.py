"""Studies: a parameter sweep as one cached, cluster-ready DAG (`snakemake --config study=studies/<name>.yaml`).

A study file names a base params file and axes: dotted params.yaml keys, each with a list of values, combined as
a grid (every combination) or zipped (the i-th value of every axis together). Every variant is validated like
params.yaml before anything runs.

Where outputs go (`Plan`): a stage's outputs depend only on the axes that reach it (carso.stages: the stage or a
stage upstream of it reads the key). A stage that no axis reaches, or whose axes all hold the base's values in a
variant, is the base run's own and lives under the base file's output_root: a sweep over carso.n_samples trains
one classifier and one purifier (the base run's) and evaluates CARSO once per N. Any other stage lives under
runs/studies/<study>/<the values of the axes that reach it>/ (e.g. n_samples=16/), shared by the variants that
agree on them; each such folder holds the params file its stages run with.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carso import stages as stage_graph
from carso.stages import lookup
from carso.errors import UserError
from carso.layout import Results
from carso.params import load_params, validate, with_overrides

STUDIES_ROOT = "runs/studies"
FIXED_KEYS = ("output_root", "datasets")  # what every variant must share: where the base writes, what it runs on
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")  # a value's label goes into folder names


@dataclass(frozen=True)
class Variant:
    label: str                      # e.g. "n_samples=4" (axes joined by commas)
    changes: dict[str, Any]         # dotted key -> value
    params: dict[str, Any]          # the base params with the changes, validated


@dataclass(frozen=True)
class Study:
    name: str
    source: str                     # the study file
    base: str                       # the base params file
    mode: str                       # grid | zip
    axes: dict[str, list[Any]]      # dotted key -> values
    labels: dict[str, list[str]]    # dotted key -> a label per value (folder names, the page's axis)
    variants: list[Variant]
    base_params: dict[str, Any]

    @property
    def root(self) -> str:
        return f"{STUDIES_ROOT}/{self.name}"


def _format(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "-".join(_format(v) for v in value) or "none"
    return str(value)


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each axis by the shortest end of its dotted key that no other axis shares (carso.n_samples: n_samples;
    evaluation.eps beside atop.finetune.adversary.eps: evaluation.eps and adversary.eps)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            end = ".".join(parts[-n:])
            if not any(o != key and (o == end or o.endswith("." + end)) for o in keys):
                break
        names[key] = end
    return names


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} does not exist; give a study file, e.g. --config study=studies/carso_samples.yaml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML; fix its syntax.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping with name, base and axes (see studies/carso_samples.yaml).")
    unknown = sorted(set(raw) - {"name", "description", "base", "mode", "axes", "labels"})
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; a study has name, description, base, mode, axes "
                        "and labels.")
    return raw


def _check_shape(raw: dict[str, Any], path: Path) -> None:
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{path}: 'name' must match [a-z][a-z0-9_]* (it names the folder runs/studies/<name>); "
                        f"got {name!r}.")
    if not isinstance(raw.get("base"), str):
        raise UserError(f"{path}: 'base' must name the params file the variants start from (e.g. params.yaml).")
    if raw.get("mode", "grid") not in ("grid", "zip"):
        raise UserError(f"{path}: 'mode' must be grid (every combination) or zip (the i-th values together); "
                        f"got {raw['mode']!r}.")
    axes = raw.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise UserError(f"{path}: 'axes' must map dotted params keys to lists of values, e.g. "
                        "{carso.n_samples: [1, 2, 4]}.")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: axis '{key}' must be a non-empty list of values.")
        if key in FIXED_KEYS or key.split(".")[0] in FIXED_KEYS:
            raise UserError(f"{path}: '{key}' cannot be an axis: every variant shares the base's {key}.")
    if raw.get("mode") == "zip" and len({len(v) for v in axes.values()}) > 1:
        raise UserError(f"{path}: with mode zip every axis needs as many values; got "
                        f"{ {k: len(v) for k, v in axes.items()} }.")


def _labels(raw: dict[str, Any], path: Path) -> dict[str, list[str]]:
    given = raw.get("labels") or {}
    labels = {}
    for key, values in raw["axes"].items():
        names = given.get(key, [_format(v) for v in values])
        if not isinstance(names, list) or len(names) != len(values):
            raise UserError(f"{path}: labels.{key} must give one label per value of the axis ({len(values)}).")
        bad = [n for n in names if not isinstance(n, str) or not _SAFE.match(n)]
        if bad:
            raise UserError(f"{path}: the value label {bad[0]!r} of axis '{key}' cannot name a folder; give "
                            f"labels.{key}: a list of names of letters, digits, '.', '_', '+' or '-'.")
        if len(set(names)) != len({repr(v) for v in values}):
            raise UserError(f"{path}: axis '{key}' has two different values with the same label (or one value with "
                             f"two labels); give labels.{key}: one name per distinct value.")
        labels[key] = names
    unknown = sorted(set(given) - set(raw["axes"]))
    if unknown:
        raise UserError(f"{path}: labels.{unknown[0]} names no axis.")
    return labels


def _combinations(axes: dict[str, list[Any]], mode: str) -> list[tuple[int, ...]]:
    """Indices into each axis's values, one tuple per variant."""
    if mode == "zip":
        return [(i,) * len(axes) for i in range(len(next(iter(axes.values()))))]
    return list(itertools.product(*(range(len(v)) for v in axes.values())))


def label(assignment: dict[str, str], keys: list[str]) -> str:
    """The folder name of an assignment of value labels to (some of) the axes, in axis order."""
    short = _short_names(keys)
    return ",".join(f"{short[k]}={assignment[k]}" for k in keys if k in assignment)


def load_study(path: str | Path) -> Study:
    """Read, check and expand a study file: one sentence for a bad key, a value the schema refuses (naming the
    variant) or an axis no stage reads."""
    path = Path(path)
    raw = _read(path)
    _check_shape(raw, path)
    labels = _labels(raw, path)
    base_params = load_params(raw["base"])
    axes = raw["axes"]
    keys = list(axes)
    variants = []
    for combo in _combinations(axes, raw.get("mode", "grid")):
        changes = {k: axes[k][i] for k, i in zip(keys, combo)}
        name = label({k: labels[k][i] for k, i in zip(keys, combo)}, keys)
        source = f"{path} (variant {name})"
        params = validate(with_overrides(base_params, changes, source), source)
        variants.append(Variant(name, changes, params))
    graph = stage_graph.graph(base_params)
    for key in keys:
        if not stage_graph.reached(graph, "report", key):
            raise UserError(f"{path}: no stage of {raw['base']} reads '{key}' (its evaluation.defences: "
                            f"{list(base_params['evaluation']['defences'])}); the axis would change nothing.")
    return Study(raw["name"], str(path), raw["base"], raw.get("mode", "grid"), axes, labels, variants, base_params)


def base_of(path: str | Path) -> str:
    """The base params file a study names (the Snakefile reads it before validating anything else)."""
    raw = _read(Path(path))
    _check_shape(raw, Path(path))
    return raw["base"]


class Plan:
    """Where each stage of each variant writes, and the params file it runs with. Without a study there is one
    variant, the params file itself, and every stage writes under its output_root."""

    def __init__(self, params_file: str, params: dict[str, Any], study: Study | None = None) -> None:
        self.base_params = params
        self.study = study
        self.graph = stage_graph.graph(params)
        self.axes = list(study.axes) if study else []
        base_root = params["output_root"]
        self.base_prefix = "" if base_root == "." else base_root.rstrip("/") + "/"
        self.variants = study.variants if study else [Variant("", {}, params)]
        reaching = {stage: [k for k in self.axes if stage_graph.reached(self.graph, stage, k)] for stage in self.graph}
        # variant number -> stage -> its folder, computed once: the DAG's input functions look them up per job
        self._prefixes = [{stage: self._prefix(axes, v) for stage, axes in reaching.items()} for v in self.variants]
        self.roots: dict[str, tuple[str, dict[str, Any]]] = {}  # prefix -> (params file, params)
        for v, prefixes in zip(self.variants, self._prefixes):
            for prefix in prefixes.values():
                if prefix not in self.roots:
                    base = prefix == self.base_prefix
                    self.roots[prefix] = (params_file, params) if base else (f"{prefix}params.yaml", v.params)

    def _prefix(self, reaching: list[str], variant: Variant) -> str:
        """The folder (with a trailing slash, "" for the project root) of a stage that the axes `reaching` reach: the
        base run's when each of them has the base's value in `variant` (or none reaches it), else one named by the
        labels of their values."""
        if all(variant.changes[k] == lookup(self.base_params, k) for k in reaching):
            return self.base_prefix
        assignment = {k: self.study.labels[k][self.study.axes[k].index(variant.changes[k])] for k in reaching}
        return f"{self.study.root}/{label(assignment, self.axes)}/"

    def prefix(self, stage: str, variant: int) -> str:
        """The folder under which `stage` of variant number `variant` writes data/, logs/ and benchmarks/."""
        return self._prefixes[variant][stage]

    def upstream_prefix(self, prefix: str, stage: str) -> str:
        """Where `stage` wrote for the jobs that write under `prefix`. The base's folder holds only stages whose axes
        have the base's values, so their upstream stages (reached by fewer axes) are the base's too; any other
        folder is named by the values of the axes reaching its stages, which every variant writing there shares."""
        if prefix == self.base_prefix:
            return self.base_prefix
        return self.prefix(stage, self.variant_at(prefix))

    def variant_at(self, prefix: str) -> int:
        """A variant (its number) with a stage writing under `prefix` (for the base's folder: the first variant)."""
        return next(i for i, prefixes in enumerate(self._prefixes) if prefix in prefixes.values())

    def results_at(self, prefix: str, dataset: str) -> Results:
        """The results a report writing under `prefix` reads: the base run's own folder, or a variant's."""
        if prefix == self.base_prefix:
            return Results(Path(f"{prefix}data/{dataset}"))
        return self.results(self.variant_at(prefix), dataset)

    def results(self, variant: int, dataset: str) -> Results:
        """Where variant number `variant`'s results of `dataset` are: its report's folder, with the stage folders
        it shares with other variants or the base run elsewhere."""
        own = self.prefix("report", variant)
        moved = {s.out: Path(f"{self.prefix(s.name, variant)}data/{dataset}/{s.out}") for s in self.graph.values()
                 if self.prefix(s.name, variant) != own}
        return Results(Path(f"{own}data/{dataset}"), moved)

    def params_of(self, prefix: str) -> dict[str, Any]:
        return self.roots[prefix][1]

    def params_file_of(self, prefix: str) -> str:
        return self.roots[prefix][0]

    def write_params_files(self) -> None:
        """Each study folder's params file (the first variant that writes there, output_root set to the folder),
        rewritten only when its content changes."""
        for prefix, (file, params) in self.roots.items():
            if prefix == self.base_prefix:
                continue
            own = copy.deepcopy(params)
            own["output_root"] = prefix.rstrip("/")
            text = (f"# written by carso.study from {self.study.source}: the params of the stages under this folder\n"
                    + yaml.safe_dump(own, sort_keys=False))
            write_if_changed(Path(file), text)


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically unless it holds that already (a file Snakemake reads at parse time keeps its
    time when nothing changed); whether it wrote. As carso.io.write_text, without importing torch (carso.io does):
    the Snakefile calls this at parse time."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True
