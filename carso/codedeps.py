"""The library files each stage runs, for the Snakemake rules' inputs and DVC's deps: editing a file reruns
exactly the stages that run it.

A stage's code is the import closure (every `carso` import, those inside functions included, and the packages
they live in) of: carso/__main__.py, cli.py's top-level imports and those of its `main`, the imports of the CLI
function that runs the stage (and of `_runtime`, where it calls it), and the registry functions it calls by name:
every built-in method's params checks (the validation runs in every stage), a method's stage function, the
evaluated defence's loader, the report part of each evaluated method. tests/test_stages.py checks the result
against what each stage really imports.

A plugin's modules (carso.discovery) are followed the same way wherever the plugin is installed, and count only
for its own stages, the evaluations of its defences and the report on them: editing an installed plugin reruns
exactly those. Its files are named by absolute path when they lie outside the repository.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from carso.discovery import module_dir

ROOT = Path(__file__).resolve().parent.parent  # the repository: paths are relative to it


def _packages() -> set[str]:
    """The top-level packages whose modules are followed: carso's and each active plugin's."""
    from carso.defences import PLUGINS

    return {"carso", *(p.package for p in PLUGINS.values())}


def module_file(module: str) -> Path:
    """carso.methods.atop.training -> carso/methods/atop/training.py (a package -> its __init__.py); a plugin's
    module: its file where the plugin is installed."""
    top = module.split(".")[0]
    base = ROOT if top == "carso" else module_dir(top).parent
    path = base.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _carso_imports(nodes: Iterable[ast.AST]) -> set[str]:
    """The imports among `nodes` of carso's modules and of the active plugins' modules."""
    packages, found = _packages(), set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in packages:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}").exists()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in packages}
    return found


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(module_file(module).read_text())


def imports(module: str) -> set[str]:
    """Every carso module `module` imports, anywhere in it (cli.py: its top level only, as its stage functions
    import what their stage needs; `stage_modules` adds those)."""
    tree = _tree(module)
    return _carso_imports(tree.body if module == "carso.cli" else ast.walk(tree))


def closure(modules: Iterable[str]) -> set[str]:
    """`modules`, the packages that hold them, and everything they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for m in [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if m not in seen:
                seen.add(m)
                todo.extend(imports(m))
    return seen


def files(modules: Iterable[str]) -> list[str]:
    """The modules' files: relative to the repository, or absolute for a plugin installed outside it."""
    paths = [module_file(m).resolve() for m in modules]
    return sorted(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths)


def cli_function_imports(name: str) -> set[str]:
    """The imports inside cli.py's function `name`, and those of `_runtime` if it calls it."""
    functions = {n.name: n for n in _tree("carso.cli").body if isinstance(n, ast.FunctionDef)}
    found = _carso_imports(ast.walk(functions[name]))
    if any(isinstance(n, ast.Name) and n.id == "_runtime" for n in ast.walk(functions[name])):
        found |= _carso_imports(ast.walk(functions["_runtime"]))
    return found


def _module_of(function_path: str) -> str:
    return function_path.split(":")[0]


def stage_modules(stage: str, defences: Sequence[str] = ()) -> set[str]:
    """The modules stage `stage` runs; `defences`: the defence it evaluates (evaluate) or reports on (report)."""
    from carso.defences import BUILTIN, DEFENCES, PLUGINS, methods_of, stage_owner, training_stages

    method_stages = training_stages()
    entry = cli_function_imports("main")  # every stage starts there: logging, params, the stage's function
    entry |= {_module_of(m.check_params) for m in BUILTIN if m.check_params}  # the params validation calls them
    if stage in method_stages:
        owners = [stage_owner(stage)]
        entry |= cli_function_imports("method_stage") | {_module_of(method_stages[stage].run)}
        entry |= {_module_of(m.check_models) for m in owners if m.check_models}  # its own stages run them
    else:
        entry |= cli_function_imports(f"cmd_{stage}")
        owners = methods_of(list(defences)) if stage in ("evaluate", "report") else []
    if stage == "evaluate":
        entry |= {_module_of(DEFENCES[d].load) for d in defences}
    if stage == "report":
        entry |= {_module_of(m.report) for m in owners if m.report}
    for method in (m for m in owners if m.name in PLUGINS):  # the plugin's declaration and its params checks
        entry |= {method.package, *([_module_of(method.check_params)] if method.check_params else [])}
    return closure({"carso.__main__", "carso.cli"} | entry)


def stage_code(stage: str, defences: Sequence[str] = ()) -> list[str]:
    """The files of `stage_modules`, as paths relative to the repository (Snakemake inputs, DVC deps)."""
    return files(stage_modules(stage, defences))
