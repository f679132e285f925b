"""Methods from installed packages (plugins): found through the `carso.methods` entry-point group, loaded only
when a params file names them (`plugins: [<name>, ...]`), checked against this library's plugin API version and
against every name the registry already uses.

Finding what is installed reads package metadata only; a plugin's code is imported when a params file names it,
never from a "module:function" string in a params file. The public surface for plugin authors is `carso.plugin`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import import_module, metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable

from carso.errors import UserError
from carso.methods import MethodSpec

GROUP = "carso.methods"  # [project.entry-points."carso.methods"] <name> = "<module>:<MethodSpec>"
API_VERSION = 1  # what carso.plugin offers; a plugin states the version it was written for (MethodSpec.api)

# Names the shared pipeline owns, which no method may take.
SHARED_STAGES = ("fetch", "train_classifier", "generate_adversarial", "train_sources", "craft_sources", "evaluate",
                 "report")
SHARED_COMMANDS = ("fetch", "train-classifier", "generate-adversarial", "train-sources", "craft-sources", "evaluate",
                   "report", "compare", "dvc-yaml", "record")
SHARED_SECTIONS = ("output_root", "datasets", "runtime", "data", "classifier", "adversarial", "evaluation", "sources",
                   "report", "plugins", "params_file")
SHARED_FOLDERS = ("dataset", "classifier", "adversarial", "eval", "threats", "sources", "report")


@dataclass(frozen=True)
class Plugin:
    """An installed plugin a params file named: its entry point's name, where it comes from, and its code's digest."""

    name: str           # the entry point's name, as `plugins:` names it
    distribution: str   # the installed distribution that declares it
    version: str
    package: str        # the top-level package of its code
    digest: str         # sha256 over the package's files (its .py and .yaml), in path order

    def record(self) -> dict[str, str]:
        """What metrics.json and the report say about it."""
        return {"plugin": self.name, "distribution": self.distribution, "version": self.version,
                "digest": self.digest}


def installed() -> dict[str, metadata.EntryPoint]:
    """The plugins installed, by name, from package metadata (nothing is imported)."""
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP)}


def _installed_text(found: dict[str, metadata.EntryPoint]) -> str:
    if not found:
        return "no plugin is installed (a plugin declares an entry point in the group 'carso.methods')"
    return "the installed plugins are: " + ", ".join(
        f"{name} (distribution {_dist(ep)[0]} {_dist(ep)[1]})" for name, ep in sorted(found.items()))


def _dist(ep: metadata.EntryPoint) -> tuple[str, str]:
    return (ep.dist.name, ep.dist.version) if ep.dist is not None else ("unknown", "unknown")


def module_dir(module: str) -> Path:
    """The folder of an importable module (a package: its own folder), wherever it is installed (site-packages, a
    --target folder, editable)."""
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"plugin module '{module}' is not importable; reinstall its distribution")
    return Path(spec.origin).resolve().parent


def digest(folder: Path) -> str:
    """sha256 over a package's .py and .yaml files (their paths and contents), so any edit changes it."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def load(name: str) -> tuple[MethodSpec, Plugin]:
    """The MethodSpec that installed plugin `name` declares, with where it comes from; refused in one sentence when
    it is not installed, is not a MethodSpec or speaks another API version."""
    found = installed()
    if name not in found:
        raise UserError(f"'plugins' names '{name}', which is not installed; {_installed_text(found)}. "
                        "Install its package (pip install ...) or remove it from `plugins`.")
    ep = found[name]
    distribution, version = _dist(ep)
    module, _, attr = ep.value.partition(":")
    try:
        spec = getattr(import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"plugin '{name}' (distribution {distribution} {version}): its entry point {ep.value} does "
                        f"not load ({err}); reinstall it") from err
    if not isinstance(spec, MethodSpec):
        raise UserError(f"plugin '{name}' (distribution {distribution} {version}): its entry point {ep.value} is a "
                        f"{type(spec).__name__}, not a carso.plugin.MethodSpec")
    if spec.api != API_VERSION:
        raise UserError(f"plugin '{name}' (distribution {distribution} {version}) was written for carso's plugin "
                        f"API version {spec.api}, and this carso offers version {API_VERSION}; install a version "
                        "of the plugin made for it")
    package = module.split(".")[0]
    plugin = Plugin(name, distribution, version, package, digest(module_dir(package)))
    return replace(spec, package=module), plugin


def check_clashes(builtin: Iterable[MethodSpec], added: list[tuple[MethodSpec, Plugin]], shared_defences: Iterable[str]
                  ) -> None:
    """Refuse, in one sentence, a plugin that takes a name the registry already uses: a method, defence, stage, CLI
    command, params section or output folder."""
    owners: dict[tuple[str, str], str] = {}
    for kind, names in (("stage", SHARED_STAGES), ("CLI command", SHARED_COMMANDS), ("params section", SHARED_SECTIONS),
                        ("output folder", SHARED_FOLDERS), ("defence", tuple(shared_defences))):
        owners.update({(kind, n): "the shared pipeline" for n in names})
    for method in builtin:
        _claim(owners, method, f"built-in method '{method.name}'")
    for method, plugin in added:
        _claim(owners, method, f"plugin '{plugin.name}' (distribution {plugin.distribution})")


def _claim(owners: dict[tuple[str, str], str], method: MethodSpec, who: str) -> None:
    """Record what `method` names, refusing a name another owner holds (an output folder: its first component)."""
    claims = [("method", method.name), *(("defence", d.name) for d in method.defences),
              *(("stage", s.name) for s in method.stages), *(("CLI command", s.command) for s in method.stages),
              *(("params section", s) for s in method.sections),
              *(("output folder", s.out.split("/")[0]) for s in method.stages)]
    for kind, name in claims:
        other = owners.setdefault((kind, name), who)
        if other != who:
            raise UserError(f"{who} declares the {kind} '{name}', which {other} already uses; rename it in the "
                            "plugin, or leave one of the two out of `plugins`")
