"""Each stage declares, as Snakemake inputs and DVC deps, exactly the library files it runs (carso.codedeps), and
the import closure that computes them is precise: a method's code reaches its own stages and defences only."""
from __future__ import annotations

from carso.codedeps import stage_code, stage_modules
from carso.defences import DEFENCES
from conftest import REPO


def expected_code(dvc_stage: str) -> list[str]:
    """What carso.codedeps says a DVC stage runs (dvc.yaml's report covers every registered defence)."""
    if dvc_stage.startswith("evaluate_"):  # evaluate_<defence>, or evaluate_<defence>_under_<threat>
        return stage_code("evaluate", [dvc_stage.removeprefix("evaluate_").split("_under_")[0]])
    return stage_code(dvc_stage.split("_under_")[0], list(DEFENCES) if dvc_stage == "report" else ())


def test_dvc_deps_are_the_code_each_stage_runs() -> None:
    from test_workflow import dvc_stages

    stages = dvc_stages(REPO)
    assert {name.split("@")[0] for name in stages} == {
        "fetch", "train_classifier", "generate_adversarial", "train_purifier", "pretrain_inpainter",
        "finetune_inpainter", "train_plain", "finetune_resize", *(f"evaluate_{d}" for d in DEFENCES),
        *(f"evaluate_{d}_under_{t}" for t in ("l2", "l1") for d in ("at", "carso", "atop_rt", "atop")), "report",
        "train_sources", "craft_sources", "craft_sources_under_l2", "craft_sources_under_l1"}
    for name, stage in stages.items():
        declared = sorted(d for d in stage["deps"] if d.startswith("carso/"))
        assert declared == expected_code(name.split("@")[0]), name


def test_a_method_reaches_only_its_own_stages_and_defences() -> None:
    atop = {m for m in stage_modules("finetune_inpainter") if m.startswith("carso.methods.atop.")}
    assert {"carso.methods.atop.training", "carso.methods.atop.inpainter", "carso.methods.atop.transforms"} <= atop
    assert "carso.methods.atop.training" not in stage_modules("evaluate", ["atop"])  # a defence loads, never trains
    assert "carso.methods.atop.defence" in stage_modules("evaluate", ["atop"])
    # every stage validates params.yaml, hence runs each method's params checks; nothing else of another method
    for stage, defences in (("evaluate", ["at"]), ("evaluate", ["carso"]), ("train_purifier", []), ("fetch", [])):
        modules = stage_modules(stage, defences)
        assert {m for m in modules if m.startswith("carso.methods.atop.")} == {"carso.methods.atop.params"}, stage
    carso = {m for m in stage_modules("evaluate", ["atop"]) if m.startswith("carso.methods.carso.")}
    assert carso == {"carso.methods.carso.params"}
    assert "carso.models" not in stage_modules("fetch") and "carso.params" in stage_modules("fetch")
