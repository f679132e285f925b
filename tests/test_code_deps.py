"""Each stage declares, as Snakemake inputs and DVC deps, exactly the library modules it runs."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ENTRY = {  # the modules each stage's CLI function imports
    "fetch": ["data"],
    "train_classifier": ["training", "pretrained", "device", "distributed"],
    "generate_adversarial": ["advgen", "checkpoint", "device", "distributed"],
    "train_purifier": ["purifier_training", "device", "distributed"],
    "evaluate": ["data", "defence", "evaluation", "io", "device", "distributed"],
    "report": ["report"],
}
BASE = ["cli", "params", "io", "errors"]


def carso_imports(module: str) -> set[str]:
    """Library modules `module` imports (for cli.py only its top level: its stage functions import lazily)."""
    tree = ast.parse((REPO / "carso" / f"{module}.py").read_text())
    nodes = tree.body if module == "cli" else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("carso."):
            found.add(node.module.split(".")[1])
    return found


def closure(modules: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(carso_imports(m))
    return seen


def test_cli_imports_what_entry_says() -> None:
    tree = ast.parse((REPO / "carso" / "cli.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")):
        stage = fn.name.removeprefix("cmd_")
        imported = {n.module.split(".")[1] for n in ast.walk(fn)
                    if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("carso.")}
        runtime = {"device", "distributed"} if any(isinstance(n, ast.Name) and n.id == "_runtime" for n in ast.walk(fn)) else set()
        assert imported | runtime == set(ENTRY[stage]), stage


def test_declared_code_deps_cover_every_imported_module() -> None:
    from test_workflow import dvc_stages

    stages = dvc_stages(REPO)
    names = {"evaluate": ["evaluate_at", "evaluate_carso"]}  # one DVC stage per defence
    for stage, entry in ENTRY.items():
        for name in names.get(stage, [stage]):
            declared = {Path(d).stem for d in stages[f"{name}@fashion_mnist"]["deps"] if d.startswith("carso/")}
            assert declared == closure(BASE + entry), name
