"""The RobustBench-compatible WRN (`dm_wide_resnet`) and importing a classifier with `classifier.pretrained`."""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from carso import pretrained
from carso.checkpoint import load_classifier
from carso.data import dataset_spec
from carso.errors import UserError
from carso.io import save_tensors
from carso.models import build_classifier
from conftest import REPO

C10 = dataset_spec("cifar10")
TINY = "Tiny_DMWRN-10-1"  # a stand-in RobustBench entry, registered only inside these tests
ZOO_NAME = "Cui2023Decoupled_WRN-28-10"


def robustbench_layout(depth: int, width: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of RobustBench's DMWideResNet (model_zoo/architectures/dm_wide_resnet.py),
    written out from its structure: init_conv, three groups `layer.G` of `block.B` (batchnorm_0, conv_0
    3x3, batchnorm_1, conv_1 3x3, a 1x1 `shortcut` where the width changes), batchnorm, logits."""
    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {**{f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")},
                f"{prefix}.num_batches_tracked": ()}

    n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    keys: dict[str, tuple[int, ...]] = {"init_conv.weight": (16, 3, 3, 3)}
    for g in range(3):
        for b in range(n):
            c_in, c_out, p = widths[g] if b == 0 else widths[g + 1], widths[g + 1], f"layer.{g}.block.{b}"
            keys |= bn(f"{p}.batchnorm_0", c_in) | {f"{p}.conv_0.weight": (c_out, c_in, 3, 3)}
            keys |= bn(f"{p}.batchnorm_1", c_out) | {f"{p}.conv_1.weight": (c_out, c_out, 3, 3)}
            if c_in != c_out:
                keys[f"{p}.shortcut.weight"] = (c_out, c_in, 1, 1)
    return keys | bn("batchnorm", widths[3]) | {"logits.weight": (num_classes, widths[3]), "logits.bias": (num_classes,)}


def dm_wrn(num_classes: int = 10, depth: int = 28, width: int = 10, meta: bool = False) -> nn.Module:
    spec = dataset_spec("cifar10" if num_classes == 10 else "cifar100")
    with torch.device("meta" if meta else "cpu"):
        return build_classifier("dm_wide_resnet", in_channels=3, num_classes=num_classes, image_size=32,
                                mean=spec.mean, std=spec.std, depth=depth, width=width)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_wrn_28_10_has_robustbench_names_and_shapes(num_classes: int) -> None:
    state = dm_wrn(num_classes, meta=True).state_dict()
    expected = robustbench_layout(28, 10, num_classes)
    assert len(expected) == 155  # 28 convs' worth of WRN-28-10: 3 shortcuts, 25 BatchNorms, the linear head
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    params = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked")))
    assert params == {10: 36_479_194, 100: 36_536_884}[num_classes]  # RobustBench's class, counted once


def test_wrn_28_10_conv_layers_are_the_28_robustbench_convs() -> None:
    convs = [n for n, m in dm_wrn(meta=True).named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 28 and convs[0] == "init_conv" and convs[3] == "layer.0.block.0.shortcut"


def test_normalisation_is_inside_and_not_in_the_state_dict() -> None:
    model = dm_wrn(depth=10, width=1).eval()
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(C10.mean))
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_matches_robustbench_zoo_entry_bit_for_bit(dataset: str) -> None:
    """robustbench's own Cui2023Decoupled_WRN-28-10 (its class, its constructor arguments, its normalisation)
    and ours, built the way the import builds it, give identical outputs with the same random weights."""
    model_dicts, benchmark_dataset, threat_model, _ = pretrained._robustbench_zoo()
    theirs = model_dicts[benchmark_dataset(dataset)][threat_model.Linf][ZOO_NAME]["model"]().eval()
    randomise_batchnorm(theirs)
    spec = dataset_spec(dataset)
    ours = build_classifier("dm_wide_resnet", in_channels=3, num_classes=spec.num_classes, image_size=32,
                            mean=spec.mean, std=spec.std, depth=28, width=10).eval()
    pretrained.load_exact(ours, theirs.state_dict(), "robustbench")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics, so that a mix-up of BatchNorm buffers changes the outputs."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(7)


# --- importing -------------------------------------------------------------------------------------------

def paper_classifier_cfg() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((REPO / "configs" / "cifar10.yaml").read_text())["classifier"])


@pytest.fixture()
def tiny_entry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A WRN-10-1 registered as a RobustBench model, and a classifier section that imports it."""
    monkeypatch.setitem(pretrained.ROBUSTBENCH_MODELS, TINY, (("cifar10",), "dm_wide_resnet", {"depth": 10, "width": 1}))
    cfg = paper_classifier_cfg()
    cfg.update(arch_kwargs={"depth": 10, "width": 1}, monitor_points=8)
    cfg["pretrained"] = {"source": "robustbench", "name": TINY, "file": None}
    return cfg


@pytest.fixture()
def cifar_dir(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=gen)
    save_tensors(tmp_path / "dataset" / "test.safetensors", {"images": images, "labels": torch.arange(12) % 10})
    return tmp_path / "dataset"


def robustbench_file(path: Path, model: nn.Module) -> Path:
    """`model` saved the way RobustBench's checkpoints are: {'state_dict': {'module.' + name: tensor}}."""
    torch.save({"state_dict": {f"module.{k}": v.clone() for k, v in model.state_dict().items()}}, path)
    return path


def test_robustbench_checkpoint_round_trips_bit_exactly(tiny_entry: dict[str, Any], cifar_dir: Path,
                                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = dm_wrn(depth=10, width=1).eval()
    randomise_batchnorm(source)
    tiny_entry["pretrained"]["file"] = str(robustbench_file(tmp_path / "rb.pt", source))
    out = tmp_path / "classifier"
    metrics = pretrained.import_classifier("cifar10", cifar_dir, out, tiny_entry, torch.device("cpu"),
                                           tmp_path / "zoo")
    loaded = load_classifier(out / "model.safetensors", "cifar10")
    mine, theirs = loaded.state_dict(), source.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))
    with open(out / "curve.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [["epoch", "lr", "train_loss", "train_adv_acc", "test_clean_acc", "test_adv_acc", "images_per_second",
                     "seconds"]]
    written = json.loads((out / "train_metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert (written["source"], written["name"], written["epochs"], written["monitor_points"]) == ("robustbench", TINY, 0, 8)
    assert 0 <= written["test_pgd10_acc"] <= written["test_clean_acc"] <= 1 and written["device"] == "cpu"
    assert len(written["file_sha256"]) == 64


def test_report_copes_with_an_imported_classifier(tiny_entry: dict[str, Any], cifar_dir: Path, tmp_path: Path) -> None:
    from carso.report import _imported_lines, curves_png, read_curve

    tiny_entry["pretrained"]["file"] = str(robustbench_file(tmp_path / "rb.pt", dm_wrn(depth=10, width=1)))
    pretrained.import_classifier("cifar10", cifar_dir, tmp_path / "c", tiny_entry, torch.device("cpu"), tmp_path)
    curve = read_curve(tmp_path / "c" / "curve.csv")
    assert curve == [] and curves_png(curve).startswith(b"\x89PNG")
    line, = _imported_lines(json.loads((tmp_path / "c" / "train_metrics.json").read_text()))
    assert line.startswith(f"Not trained here: {TINY} imported from robustbench, file ")


def test_cli_imports_instead_of_training(tiny_entry: dict[str, Any], cifar_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from carso import cli, training

    monkeypatch.setattr(training, "train_classifier", lambda *a, **k: pytest.fail("trained instead of importing"))
    tiny_entry["pretrained"]["file"] = str(robustbench_file(tmp_path / "rb.pt", dm_wrn(depth=10, width=1)))
    params = yaml.safe_load((REPO / "configs" / "cifar10.yaml").read_text())
    params["classifier"], params["runtime"]["device"] = tiny_entry, "cpu"  # the tests run on the CPU anywhere
    args = argparse.Namespace(dataset="cifar10", data=str(cifar_dir), out=str(tmp_path / "out"),
                              threads=torch.get_num_threads())
    cli.cmd_train_classifier(args, params)
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["name"] == TINY


def test_missing_file_names_the_key_and_the_file(tmp_path: Path, cifar_dir: Path) -> None:
    cfg = paper_classifier_cfg()
    cfg["pretrained"]["file"] = str(tmp_path / "nowhere.pt")
    with pytest.raises(UserError) as err:
        pretrained.import_classifier("cifar10", cifar_dir, tmp_path / "out", cfg, torch.device("cpu"), tmp_path)
    message = str(err.value)
    assert "'classifier.pretrained.file'" in message and "nowhere.pt" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def zoo_entry(tiny_entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """TINY in robustbench's own registry, and its downloader replaced by one that records each call and
    writes a RobustBench-format checkpoint of a random WRN-10-1 (the tests have no internet)."""
    model_dicts, benchmark_dataset, threat_model, _ = pretrained._robustbench_zoo()
    monkeypatch.setitem(model_dicts[benchmark_dataset("cifar10")][threat_model.Linf], TINY,
                        {"model": lambda: dm_wrn(depth=10, width=1), "gdrive_id": "tiny-gdrive-id"})
    calls: list[tuple[str, Path]] = []

    def download(gdrive_id: str, path: Path) -> None:
        calls.append((gdrive_id, Path(path)))
        robustbench_file(Path(path), dm_wrn(depth=10, width=1))

    monkeypatch.setattr("robustbench.utils.download_gdrive_new", download)
    return calls


def test_zoo_checkpoint_is_downloaded_once_with_robustbench(tiny_entry: dict[str, Any], zoo_entry: list,
                                                             cifar_dir: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    first = pretrained.import_classifier("cifar10", cifar_dir, tmp_path / "a", tiny_entry, torch.device("cpu"), zoo)
    target = zoo / "cifar10" / "Linf" / f"{TINY}.pt"  # where robustbench.utils.load_model keeps it too
    assert zoo_entry == [("tiny-gdrive-id", target.with_name(target.name + ".part"))]
    assert target.is_file() and first["file"] == str(target) and len(first["file_sha256"]) == 64
    second = pretrained.import_classifier("cifar10", cifar_dir, tmp_path / "b", tiny_entry, torch.device("cpu"), zoo)
    assert len(zoo_entry) == 1 and second["file_sha256"] == first["file_sha256"]  # a rerun reads the kept file
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_failed_download_names_the_key_and_leaves_no_file(tiny_entry: dict[str, Any], zoo_entry: list,
                                                          cifar_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(gdrive_id: str, path: Path) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise ConnectionError("Max retries exceeded with url: /uc?id=tiny-gdrive-id")

    monkeypatch.setattr("robustbench.utils.download_gdrive_new", offline)
    with pytest.raises(UserError) as err:
        pretrained.import_classifier("cifar10", cifar_dir, tmp_path / "out", tiny_entry, torch.device("cpu"),
                                     tmp_path / "zoo")
    message = str(err.value)
    assert "'classifier.pretrained.file'" in message and f"{TINY}.pt" in message and "ConnectionError" in message
    assert not list((tmp_path / "zoo").rglob("*.pt*")) and not (tmp_path / "out").exists()


def test_missing_robustbench_names_the_key_and_the_file(tmp_path: Path, cifar_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "robustbench", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    with pytest.raises(UserError) as err:
        pretrained.import_classifier("cifar100", cifar_dir, tmp_path / "out", paper_classifier_cfg(),
                                     torch.device("cpu"), tmp_path)
    message = str(err.value)
    assert "'classifier.pretrained.file'" in message and "robustbench" in message and "\n" not in message
    assert "models/cifar100/Linf/Cui2023Decoupled_WRN-28-10.pt" in message


@pytest.mark.parametrize("case, words", [
    ("pickled_object", ["cannot be loaded safely"]),
    ("missing_key", ["does not fit classifier.arch", "1 missing keys", "logits.bias"]),
    ("wrong_shape", ["does not fit classifier.arch", "logits.weight"]),
])
def test_a_checkpoint_that_does_not_fit_is_refused(tiny_entry: dict[str, Any], cifar_dir: Path, tmp_path: Path,
                                                   case: str, words: list[str]) -> None:
    state = {f"module.{k}": v for k, v in dm_wrn(depth=10, width=1).state_dict().items()}
    if case == "missing_key":
        state.pop("module.logits.bias")
    if case == "wrong_shape":
        state["module.logits.weight"] = torch.zeros(100, 64)
    path = tmp_path / "rb.pt"
    torch.save(argparse.Namespace(state_dict=state) if case == "pickled_object" else {"state_dict": state}, path)
    tiny_entry["pretrained"]["file"] = str(path)
    with pytest.raises(UserError) as err:
        pretrained.import_classifier("cifar10", cifar_dir, tmp_path / "out", tiny_entry, torch.device("cpu"), tmp_path)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_model_or_mismatched_arch_is_refused() -> None:
    cfg = paper_classifier_cfg()
    with pytest.raises(UserError, match="cannot convert; known RobustBench models: Cui2023Decoupled_WRN-28-10"):
        pretrained.check_pretrained({**cfg, "pretrained": {**cfg["pretrained"], "name": "Wang2023Better_WRN-70-16"}},
                                    "cifar10")
    with pytest.raises(UserError, match="set classifier.arch: dm_wide_resnet"):
        pretrained.check_pretrained({**cfg, "arch": "wide_resnet"}, "cifar10")
    with pytest.raises(UserError, match="no RobustBench L-inf checkpoint for fashion_mnist"):
        pretrained.check_pretrained(cfg, "fashion_mnist")
