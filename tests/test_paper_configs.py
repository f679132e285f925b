"""configs/cifar10.yaml and configs/cifar100.yaml: complete, valid, the published CARSO settings, and one
`--config params_file=...` away from a Snakemake run (checked with a dry run; nothing is computed)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from carso.data import dataset_spec
from carso.models import build_classifier
from carso.params import load_params
from carso.pretrained import check_pretrained
from carso.methods.carso.purifier import PurifierConfig, build_purifier
from conftest import REPO, dry_run_config

CONFIGS = {"cifar10": 0.5, "cifar100": 0.15}  # dataset -> published adversarial fraction of the purifier's batches
EPS, HALF_EPS = 8 / 255, 4 / 255
STAGE_JOBS = {"fetch": 1, "train_classifier": 1, "generate_adversarial": 1, "train_purifier": 1,
              "pretrain_inpainter": 1, "finetune_inpainter": 1, "evaluate": 4, "evaluate_threat": 8,
              "report": 1}  # 19 jobs (plus `all`): 4 defences under the training threat and under L2 and L1


def key_tree(node: Any) -> Any:
    return {k: key_tree(v) for k, v in node.items()} if isinstance(node, dict) else None


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, load_params(REPO / "configs" / f"{request.param}.yaml")  # schema + cross-checks


def test_same_keys_as_params_yaml_plus_the_import(config: tuple[str, dict[str, Any]]) -> None:
    _, params = config
    mine, default = key_tree(params), key_tree(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert mine["classifier"].pop("pretrained") == {"source": None, "name": None, "file": None}
    default["classifier"].pop("pretrained", None)  # null there, if the default lists it
    for tree in (mine, default):  # constructor arguments: free-form per architecture
        tree["classifier"].pop("arch_kwargs")
    # the negative control's noise is sized for the default classifier's logits (controls.at_noise), and the
    # positive controls for Fashion-MNIST at eps 0.1: the paper configurations evaluate the paper's four defences
    for control in ("at_noise", "plain", "ctl_scaled", "ctl_quant", "ctl_resize"):
        default["evaluation"]["defences"].pop(control)
    default.pop("sources")  # the unseen source models are sized for Fashion-MNIST (cnn_v1 is 28 x 28 only): a
    # paper configuration adds its own section to transfer from them
    assert mine == default


def test_published_settings(config: tuple[str, dict[str, Any]]) -> None:
    dataset, p = config
    assert p["datasets"] == [dataset] and p["runtime"]["device"] == "auto" and p["data"]["source"] == "download"
    assert p["data"]["subset"]["train_per_class"] is None and p["data"]["subset"]["test_per_class"] is None
    assert p["classifier"]["pretrained"] == {"source": "robustbench", "name": "Cui2023Decoupled_WRN-28-10", "file": None}
    assert check_pretrained(p["classifier"], dataset) == ("dm_wide_resnet", {"depth": 28, "width": 10})
    attacks = p["adversarial"]["attacks"]
    assert p["adversarial"]["train_points"] is None and p["adversarial"]["test_points"] is None
    assert sorted((a["method"], a["eps"], a.get("steps"), a.get("step_size")) for a in attacks.values()) == sorted(
        [("fgsm", HALF_EPS, None, None), ("fgsm", EPS, None, None), ("pgd", HALF_EPS, 40, 0.01), ("pgd", EPS, 40, 0.01)])
    pur = p["purifier"]
    assert (pur["epochs"], pur["batch_size"], pur["condition_dim"], pur["latent_dim"], pur["compressor_depth"]) == \
        (200, 5120, 512, 128, 3)
    assert pur["pre_encoder_channels"] == [6, 12] and pur["decoder_channels"] == [256, 256, 128, 64, 32]
    assert pur["adversarial_fraction"] == CONFIGS[dataset] and sorted(pur["attacks"]) == sorted(attacks)
    assert pur["lookahead"] and p["carso"] == {"n_samples": 8, "aggregation": "peel", "latent": "sample"}
    ev = p["evaluation"]
    assert ev["eps"] == EPS and attacks[ev["transfer_attack"]]["eps"] == EPS
    at, carso = ev["defences"]["at"], ev["defences"]["carso"]
    assert at["autoattack"] == {"enabled": True, "version": "standard"} and at["n_points"] == 10000
    assert carso["autoattack"] == {"enabled": True, "version": "rand"} and carso["n_points"] == 10000
    lee_kim = {"steps": 200, "step_size": 0.007, "eot": 20, "restarts": 1, "zero_grad_patience": 10}
    assert carso["pgd"][:2] == [{"loss": "dlr", **lee_kim}, {"loss": "ce", **lee_kim}]  # margin loss, then as published
    assert carso["pgd"][2]["surrogate"] == {"carso.aggregation": "logit"}
    assert at["square"]["enabled"] and carso["square"]["enabled"]
    atop = p["atop"]  # the paper's AToP: RT2, 25% of 4 x 4 px blocks, width 48, lambda 0.05, FGSM at 8/255
    assert atop["transform"]["kind"] == "rt2" and atop["transform"]["grid"] == 8
    assert (atop["transform"]["missing_share"], atop["transform"]["noise_sigma"]) == (0.25, 0.25)
    assert atop["inpainter"]["width"] == atop["inpainter"]["refine_width"] == 48
    assert atop["finetune"]["ce_weight"] == 0.05 and atop["finetune"]["adversary"] == {"target": "classifier", "eps": EPS}
    for name in ("atop_rt", "atop"):  # the paper's 512 points, attacked end to end as CARSO is
        ev_atop = ev["defences"][name]
        assert ev_atop["n_points"] == 512 and ev_atop["autoattack"]["version"] == "rand"
        assert ev_atop["pgd"] == carso["pgd"][:2] and ev_atop["square"] == carso["square"]


def test_the_26_hooked_layers_exist_and_the_purifier_builds(config: tuple[str, dict[str, Any]]) -> None:
    dataset, p = config
    spec = dataset_spec(dataset)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        clf = build_classifier(p["classifier"]["arch"], in_channels=spec.channels, num_classes=spec.num_classes,
                               image_size=spec.side, mean=spec.mean, std=spec.std, **p["classifier"]["arch_kwargs"])
        purifier, extractor = build_purifier(clf.eval(), dataset, PurifierConfig.from_params(p["purifier"]),
                                             p["purifier"]["layers"])
    convs = [n for n, m in clf.named_modules() if isinstance(m, torch.nn.Conv2d)]
    layers = p["purifier"]["layers"]
    assert len(layers) == len(set(layers)) == 26 and set(layers) <= set(convs)
    assert sorted(set(convs) - set(layers)) == ["init_conv", "layer.0.block.0.shortcut"]
    assert [n for n in convs if n in layers] == layers  # in the classifier's order
    with torch.device("meta"):
        assert purifier.decode(torch.zeros(2, 128), torch.zeros(2, 512)).shape == (2, 3, 32, 32)
    assert len(extractor.layers) == 26


@pytest.mark.parametrize("dataset", sorted(CONFIGS))
def test_snakemake_dry_run_lists_the_nineteen_jobs(dataset: str, tmp_path: Path) -> None:
    table, commands, project = dry_run_config(tmp_path, f"configs/{dataset}.yaml")
    assert table == {**STAGE_JOBS, "all": 1, "total": 20}
    assert len(commands) == 19
    assert all(f"--params configs/{dataset}.yaml --dataset {dataset} " in c for c in commands), commands
    assert not (project / "data").exists()


def test_the_atop_defence_builds_at_paper_size(config: tuple[str, dict[str, Any]]) -> None:
    """AToP's inpainter (width 48, contextual attention) and discriminator on 3 x 32 x 32 images, on the meta
    device: the defence maps a batch to the WRN's logits, the purified image keeps the input's shape."""
    from carso.methods.atop.defence import AtopDefence, AtopPurifier
    from carso.methods.atop.inpainter import Inpainter, InpainterConfig, PatchDiscriminator
    from carso.methods.atop.transforms import TransformConfig

    dataset, p = config
    spec = dataset_spec(dataset)
    with torch.device("meta"):
        clf = build_classifier(p["classifier"]["arch"], in_channels=3, num_classes=spec.num_classes, image_size=32,
                               mean=spec.mean, std=spec.std, **p["classifier"]["arch_kwargs"]).eval()
        inpainter = Inpainter(InpainterConfig.from_params(p["atop"]["inpainter"]), 3)
        defence = AtopDefence(clf, AtopPurifier(TransformConfig.from_params(p["atop"]["transform"]), inpainter))
        x = torch.rand(2, 3, 32, 32)
        assert defence.purifier(x).shape == (2, 3, 32, 32) and defence(x).shape == (2, spec.num_classes)
        assert PatchDiscriminator(3, p["atop"]["discriminator"]["channels"])(x, x[:, :1]).shape == (2, 256 * 2 * 2)
    assert inpainter.refine.attention is not None


@pytest.mark.parametrize("config", ["configs/cifar10.yaml", "params.yaml"])
def test_the_gpu_hour_estimate_costs_every_attack_of_each_suite(config: str) -> None:
    """bench/paper_scale.py (FLOP counts only) charges each PGD run of a defence's list, Square and AutoAttack, for
    the paper's CIFAR-10 and for the default Fashion-MNIST run (no published robust fraction: every point)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/paper_scale.py", "--skip-cpu", "--config", config],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    carso = [line for line in out.stdout.splitlines() if line.startswith("evaluate_carso / ")]
    for attack in ("PGD-200 (dlr) x EoT 20", "PGD-200 (ce) x EoT 20", "PGD-100 (ce via surrogate) x EoT 10",
                   "Square (1000 queries)", "AutoAttack rand"):
        assert any(line.startswith(f"evaluate_carso / {attack}") for line in carso), attack
    assert "GPU-hours per stage:" in out.stdout
    assert ("no published figure" in out.stdout) == (config == "params.yaml")


def test_a_studys_gpu_estimate_counts_the_jobs_it_runs_beyond_its_base() -> None:
    """bench/paper_scale.py --study: the samples study's four new CARSO evaluations, each costed with its own N
    (the decoder and classifier run N times per image, the representation once: N = 16 costs 4 to 16x N = 1),
    nothing else."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/paper_scale.py", "--study", "studies/carso_samples.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.findall(r"n_samples=(\d+) (\w+) ([\d.]+) s", out.stdout)
    costs = {int(n): float(s) for n, _, s in found}
    assert {stage for _, stage, _ in found} == {"evaluate_carso"} and len(found) == 4 and sorted(costs) == [1, 2, 4, 16]
    assert 4 < costs[16] / costs[1] <= 16 and abs(sum(costs.values()) - float(re.search(r": ([\d.]+) s of one H100",
                                                                                        out.stdout).group(1))) < 0.2
