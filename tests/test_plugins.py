"""Methods from installed packages (carso.discovery, carso.plugin): discovery by entry point, refusals in one sentence,
what a plugin changes in the params, the code deps and the rules, and the example plugin (examples/carso-denoiser)
installed offline into a temporary folder and run through the protocol by Snakemake and DVC."""
from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from carso import discovery
from carso.defences import BUILTIN, DEFENCES, METHODS, use_plugins
from carso.errors import UserError
from conftest import LOCAL_CORES, REPO, load_tiny, run_tool, sh, without_timings, write_params

EXAMPLE = REPO / "examples" / "carso-denoiser"
D = "data/fashion_mnist"


def install_example(target: Path) -> Path:
    """examples/carso-denoiser installed offline into `target` (pip --target), built from a copy of its folder so
    the repository gets no build/ or egg-info."""
    source = target.parent / "carso-denoiser-src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


@pytest.fixture(scope="session")
def example_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(tmp_path_factory.mktemp("plugin") / "site")


@pytest.fixture()
def on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Put folders on sys.path as a Python started with them on PYTHONPATH would; the registry is reset after."""
    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        discovery.load.cache_clear()
    yield add
    use_plugins([])
    discovery.load.cache_clear()
    for module in [m for m in sys.modules if m.startswith(("fake_", "carso_denoiser"))]:  # each test's own
        del sys.modules[module]


def fake_plugin(root: Path, name: str, body: str) -> Path:
    """A distribution installed in folder `root` whose entry point `name` is its module's METHOD, written by `body`."""
    package = f"fake_{name}"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("from carso.plugin import DefenceSpec, MethodSpec, StageSpec\n" + body)
    (root / package / "schema.yaml").write_text("sections: {}\n")
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[carso.methods]\n{name} = {package}:METHOD\n")
    return root


def spec_text(api: int = 1, method: str = "mine", defence: str = "mine_def", stage: str = "train_mine",
              section: str = "mine", out: str = "mine") -> str:
    return (f"METHOD = MethodSpec('{method}', 'a fake method', ('{section}',), (StageSpec('{stage}', 'x:y', (), "
            f"out='{out}'),), (DefenceSpec('{defence}', 't', 'l', 'x:y'),), api={api})\n")


def test_unknown_plugin_names_what_is_installed_without_importing_it(example_target: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(example_target)}
    code = ("import sys; from carso.defences import use_plugins\n"
            "try:\n    use_plugins(['nope'])\nexcept Exception as err:\n    print(err)\n"
            "print('imported' if 'carso_denoiser' in sys.modules else 'not imported')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert "'plugins' names 'nope', which is not installed" in out
    assert "denoiser (distribution carso-denoiser 0.1.0)" in out and "denoiser_file" in out
    assert out.strip().endswith("not imported")  # the metadata alone named them


def test_plugins_join_and_leave_the_registry(example_target: Path, on_path: Any) -> None:
    on_path(example_target)
    use_plugins(["denoiser", "denoiser_file"])
    assert [m.name for m in METHODS] == [*(m.name for m in BUILTIN), "denoiser", "denoiser_file"]
    assert {"denoiser", "denoiser_file"} <= set(DEFENCES)
    use_plugins([])  # a params file that names none: installing a package changed nothing
    assert list(METHODS) == list(BUILTIN) and "denoiser" not in DEFENCES


@pytest.mark.parametrize("change, words", [
    ({"api": 99}, "was written for carso's plugin API version 99, and this carso offers version 1"),
    ({"defence": "carso"}, "declares the defence 'carso', which built-in method 'carso' already uses"),
    ({"defence": "at"}, "declares the defence 'at', which the shared pipeline already uses"),
    ({"stage": "train_classifier"}, "declares the stage 'train_classifier', which the shared pipeline"),
    ({"stage": "finetune_resize"}, "declares the stage 'finetune_resize', which built-in method 'controls'"),
    ({"stage": "dvc_yaml"}, "declares the CLI command 'dvc-yaml', which the shared pipeline"),
    ({"section": "classifier"}, "declares the params section 'classifier', which the shared pipeline"),
    ({"out": "eval/mine"}, "declares the output folder 'eval', which the shared pipeline"),
    ({"out": "atop/mine"}, "declares the output folder 'atop', which built-in method 'atop'"),
])
def test_a_plugin_of_another_api_or_taking_a_used_name_is_refused(tmp_path: Path, on_path: Any,
                                                                  change: dict[str, Any], words: str) -> None:
    on_path(fake_plugin(tmp_path, "mine", spec_text(**change)))
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        use_plugins(["mine"])
    assert "plugin 'mine'" in str(err.value) and "\n" not in str(err.value)
    assert list(METHODS) == list(BUILTIN)  # nothing half-registered


def test_two_plugins_that_clash_with_each_other_are_refused(tmp_path: Path, on_path: Any) -> None:
    on_path(fake_plugin(tmp_path, "one", spec_text(method="one", stage="train_one", section="one", out="one")))
    on_path(fake_plugin(tmp_path / "b", "two", spec_text(method="two", stage="train_two", section="two", out="two")))
    with pytest.raises(UserError, match="declares the defence 'mine_def', which plugin 'one'"):
        use_plugins(["one", "two"])


def test_an_entry_point_that_is_not_a_method_spec_is_refused(tmp_path: Path, on_path: Any) -> None:
    on_path(fake_plugin(tmp_path, "odd", "METHOD = 'not a spec'\n"))
    with pytest.raises(UserError, match="its entry point fake_odd:METHOD is a str, not a carso.plugin.MethodSpec"):
        use_plugins(["odd"])


def test_a_checkpoint_made_by_other_plugin_code_is_never_resumed(example_target: Path, on_path: Any, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    from argparse import Namespace

    import torch

    from carso.defences import PLUGINS
    from carso.io import save_tensors

    on_path(example_target)
    use_plugins(["denoiser"])
    from carso_denoiser.training import stage

    clean = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    save_tensors(tmp_path / "train.safetensors", {"clean": clean, "labels": torch.zeros(16, dtype=torch.long),
                                                  "pgd": (clean + 0.1).clamp(0, 1)})
    params = {"denoiser": {"width": 4, "epochs": 1, "batch_size": 8, "lr": 1e-2, "train_points": None},
              "adversarial": {"attacks": {"pgd": {}}}, "runtime": {"seed": 0}}
    args = Namespace(adversarial=str(tmp_path), out=str(tmp_path / "out"))
    stage(args, params, torch.device("cpu"), None)  # one epoch, checkpointed
    with caplog.at_level("INFO"):
        stage(args, params, torch.device("cpu"), None)  # the same code and settings: resumed after its epoch
    assert "resuming from" in caplog.text and "training from scratch" not in caplog.text
    caplog.clear()
    PLUGINS["denoiser"] = dataclasses.replace(PLUGINS["denoiser"], digest="0" * 64)  # the plugin's code edited
    with caplog.at_level("INFO"):
        stage(args, params, torch.device("cpu"), None)
    assert "made with other settings, data or code; training from scratch" in caplog.text


def example_params(base: dict[str, Any], root: str, weights: str) -> dict[str, Any]:
    """A params file that evaluates `at` and the example plugin's two defences (and no built-in method, whose
    sections it leaves out): `base`'s shared settings, without the unseen threats and sources."""
    params = {k: copy.deepcopy(v) for k, v in base.items() if k not in ("purifier", "carso", "atop", "controls",
                                                                      "sources")}
    params.update(output_root=root, plugins=["denoiser", "denoiser_file"],
                  denoiser={"width": 8, "epochs": 2, "batch_size": 64, "lr": 1e-3, "train_points": None},
                  denoiser_file={"weights": weights, "width": 8})
    at = params["evaluation"]["defences"]["at"]
    params["evaluation"]["defences"] = {"at": at, "denoiser": copy.deepcopy(at), "denoiser_file": copy.deepcopy(at)}
    params["evaluation"].pop("threats", None)
    return params


def test_only_the_evaluated_methods_sections_are_required(example_target: Path, on_path: Any) -> None:
    from carso.params import validate

    on_path(example_target)
    params = example_params(load_tiny(), ".", "w.safetensors")
    validate(copy.deepcopy(params))  # no purifier, carso, atop or controls section: none of their defences is evaluated
    del params["denoiser"]
    with pytest.raises(UserError, match="the key 'denoiser' is missing; Residual denoiser in front of the classifier "
                                        r"\(example plugin carso-denoiser\) needs it"):
        validate(copy.deepcopy(params))
    params = example_params(load_tiny(), ".", "w.bin")
    with pytest.raises(UserError, match=re.escape("'denoiser_file.weights' must match \\.safetensors$ (got 'w.bin')")):
        validate(params)


def test_a_plugins_code_counts_only_for_its_own_stages(example_target: Path, on_path: Any) -> None:
    from carso.codedeps import stage_code

    on_path(example_target)
    use_plugins(["denoiser", "denoiser_file"])
    mine = str(example_target.resolve() / "carso_denoiser")
    assert [f for f in stage_code("train_denoiser") if f.startswith(mine)] == [
        f"{mine}/__init__.py", f"{mine}/model.py", f"{mine}/training.py"]
    assert [f for f in stage_code("evaluate", ["denoiser_file"]) if f.startswith(mine)] == [
        f"{mine}/__init__.py", f"{mine}/defence.py", f"{mine}/model.py"]
    assert f"{mine}/report.py" in stage_code("report", ["at", "denoiser"])
    for stage, defences in (("fetch", []), ("train_classifier", []), ("evaluate", ["at"]), ("report", ["at"])):
        assert not [f for f in stage_code(stage, defences) if f.startswith(mine)], stage


def _finished(stderr: str) -> list[str]:
    return sorted(line.split("Rule: ")[1].rstrip(")") for line in stderr.splitlines() if "Finished jobid" in line
                  and "Rule: all" not in line)


def _dry_jobs(project: Path, env_path: Path) -> list[str]:
    result = run_tool_env(["snakemake", "-n", "--cores", "2", "--config", "params_file=plugin.yaml"], project, env_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("Job stats:")[1].split("\n\n")[0] if "Job stats:" in result.stdout else ""
    return sorted(f"{row.split()[0]}x{row.split()[1]}" for row in table.splitlines()[3:] if row.split()
                  and row.split()[0] not in ("all", "total"))


def _same_jobs_as_dvc(project: Path, plugin_path: Path) -> None:
    """Every job of the plugin run's whole DAG is the stage of its dvc.yaml: command, deps (the plugin's modules by
    absolute path), outs, params file."""
    from test_dvc_record import pipeline_stages
    from test_workflow import normalise, stage_name

    result = run_tool_env(["snakemake", "-n", "-p", "--forceall", "--cores", "2", "--config", "params_file=plugin.yaml"],
                          project, plugin_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = pipeline_stages(project, "runs/plugin/dvc.yaml")
    where = lambda path: str((project / path).resolve())  # noqa: E731
    jobs = _parse_jobs(result.stdout)
    assert {j["rule"] for j in jobs} == {"fetch", "train_classifier", "generate_adversarial", "train_denoiser",
                                         "evaluate", "report"}
    for job in jobs:
        stage = stages.pop(stage_name(job))
        assert normalise(job["shell"]) == normalise(stage["cmd"]) and stage["wdir"] == ".", stage_name(job)
        assert sorted(map(where, job["input"])) == sorted(map(where, stage["deps"])), stage_name(job)
        assert sorted(job["output"]) == stage["outs"] and list(stage["params"]) == ["plugin.yaml"], stage_name(job)
    assert not stages, stages


def _parse_jobs(text: str) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from job_snapshot import parse
    finally:
        sys.path.remove(str(REPO / "tools"))
    return parse(text, with_code=True)


def _dvc_changed(project: Path, plugin_path: Path) -> list[str]:
    """The stages `dvc status` reports changed in the plugin run's dvc.yaml."""
    result = run_tool_env(["dvc", "status", "runs/plugin/dvc.yaml"], project, plugin_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(line.rstrip(":").split(":")[-1] for line in result.stdout.splitlines()
                  if line and not line[0].isspace() and line.endswith(":"))


def run_tool_env(args: list[str], cwd: Path, plugin_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """snakemake / dvc from this virtualenv with the plugin's folder on PYTHONPATH (as an installed package is)."""
    return run_tool(args, cwd, timeout, env={"PYTHONPATH": str(plugin_path), "DVC_NO_ANALYTICS": "1"})


@pytest.mark.slow
def test_the_example_plugin_through_snakemake_and_dvc(tiny_local_run: Path, tmp_path: Path) -> None:
    """The example installed offline into a temporary folder, its two defences and `at` evaluated in a run of their
    own (its own output root and dvc.yaml); the shared stages' outputs are the tiny run's, whose keys it shares."""
    target = install_example(tmp_path / "site")
    project = tmp_path / "project"
    shutil.copytree(tiny_local_run, project, symlinks=True)
    tracked_dvc = (project / "dvc.yaml").read_text()
    root = project / "runs" / "plugin"
    for folder in ("dataset", "classifier", "adversarial", "eval/at"):  # the stages whose keys the plugin run shares
        shutil.copytree(project / D / folder, root / D / folder)
    sys.path.insert(0, str(target))
    try:
        from carso_denoiser.model import Denoiser
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        (project / "weights").mkdir()
        save_file({k: v.contiguous() for k, v in Denoiser(1, 8).state_dict().items()},
                  str(project / "weights" / "denoiser.safetensors"))
    finally:
        sys.path.remove(str(target))
    write_params(project / "plugin.yaml", example_params(yaml.safe_load((project / "params.yaml").read_text()),
                                                         "runs/plugin", "weights/denoiser.safetensors"))
    sh("git add plugin.yaml weights && git commit -qm plugin", project)

    result = run_tool_env(["snakemake", "--cores", str(LOCAL_CORES), "--config", "params_file=plugin.yaml"], project,
                          target)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _finished(result.stderr) == ["evaluate", "evaluate", "report", "train_denoiser"]  # nothing shared reran
    assert (project / "dvc.yaml").read_text() == tracked_dvc  # the tracked file untouched: the run has its own
    _same_jobs_as_dvc(project, target)

    metrics = {n: json.loads((root / D / "eval" / n / "metrics.json").read_text()) for n in ("denoiser", "denoiser_file")}
    for name, m in metrics.items():
        assert m["plugin"]["distribution"] == "carso-denoiser" and m["plugin"]["version"] == "0.1.0"
        assert m["plugin"]["digest"] == discovery.digest(target / "carso_denoiser")
    report = (root / D / "report" / "report.md").read_text()
    assert "## Defences from installed plugins" in report and "## Denoiser (example plugin carso-denoiser)" in report
    assert "| `denoiser_file` (classifier behind a residual denoiser loaded from a file (plugin))" in report

    # DVC: the workflow recorded the jobs it ran; DVC reproduces the plugin's stages bit for bit
    copied = [f"runs/plugin/dvc.yaml:{s}@fashion_mnist" for s in ("fetch", "train_classifier", "generate_adversarial",
                                                                 "evaluate_at")]
    commit = run_tool_env(["dvc", "commit", "--force", "--quiet", *copied], project, target)  # (made by the tiny run:
    assert commit.returncode == 0, commit.stderr[-3000:]  # the workflow recorded only the jobs it ran)
    status = run_tool_env(["dvc", "status", "runs/plugin/dvc.yaml"], project, target)
    assert "up to date" in status.stdout, status.stdout + status.stderr
    made = ["denoiser/model.safetensors", "eval/denoiser/examples.safetensors", "eval/denoiser_file/examples.safetensors"]
    before = {f: (root / D / f).read_bytes() for f in made}
    before_metrics = without_timings(metrics)
    for folder in ("denoiser", "eval/denoiser", "eval/denoiser_file", "report"):
        shutil.rmtree(root / D / folder)
    repro = run_tool_env(["dvc", "repro", "runs/plugin/dvc.yaml"], project, target)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert {f: (root / D / f).read_bytes() for f in made} == before
    assert without_timings({n: json.loads((root / D / "eval" / n / "metrics.json").read_text())
                            for n in metrics}) == before_metrics

    # editing the installed plugin reruns exactly its stages, its evaluations and the report
    training = target / "carso_denoiser" / "training.py"
    training.write_text(training.read_text() + "# edited\n")
    assert _dry_jobs(project, target) == ["evaluatex1", "reportx1", "train_denoiserx1"]
    assert _dvc_changed(project, target) == ["train_denoiser@fashion_mnist"]  # (DVC finds the rest as it reruns)
    model = target / "carso_denoiser" / "model.py"
    model.write_text(model.read_text() + "# edited\n")
    assert _dry_jobs(project, target) == ["evaluatex2", "reportx1", "train_denoiserx1"]


def test_the_example_plugins_own_tests_pass(example_target: Path) -> None:
    """examples/carso-denoiser/tests, run against the plugin installed in a temporary folder."""
    env = {**os.environ, "PYTHONPATH": str(example_target)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout.splitlines()[-1]
