"""Importing an adversarially-trained classifier instead of training one (`classifier.pretrained`).

CARSO's published CIFAR results use RobustBench's Cui2023Decoupled_WRN-28-10. With
`classifier.pretrained: {source: robustbench, name: ..., file: ...}` the `train_classifier` stage converts
that checkpoint into this pipeline's own architecture (`dm_wide_resnet`, same state-dict names and shapes,
loaded with strict=True and compared tensor by tensor) and writes what training writes: `model.safetensors`,
`curve.csv` (the header, no epoch rows: nothing was trained) and `train_metrics.json` (where the weights came
from, and their clean and PGD-10 accuracy on the first `monitor_points` test images, in fp32).

`file: null` downloads the checkpoint named in robustbench's model zoo (the `robustbench` package and
internet) to `<data.download_root>/robustbench/<dataset>/Linf/<name>.pt`, where a rerun finds it; `file: PATH`
reads a RobustBench .pt checkpoint from disk. Either way the file is read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso.attacks import AttackSpec, accuracy, robust_accuracy
from carso.checkpoint import save_classifier
from carso.data import dataset_spec, load_split
from carso.device import describe
from carso.errors import UserError
from carso.io import sha256_file, write_json, write_text
from carso.models import build_classifier
from carso.training import CURVE_COLUMNS, training_radii

log = logging.getLogger(__name__)

# RobustBench model name -> (datasets it exists for, our architecture with the same state dict, its arch_kwargs)
ROBUSTBENCH_MODELS: dict[str, tuple[tuple[str, ...], str, dict[str, int]]] = {
    "Cui2023Decoupled_WRN-28-10": (("cifar10", "cifar100"), "dm_wide_resnet", {"depth": 28, "width": 10}),
}
KEY = "classifier.pretrained"


def zoo_path(name: str, dataset: str) -> str:
    """Where `robustbench.utils.load_model` (default model_dir) keeps the checkpoint of `name`."""
    return f"models/{dataset}/Linf/{name}.pt"


def check_pretrained(cfg: dict[str, Any], dataset: str) -> tuple[str, dict[str, int]]:
    """The named model must be one we can convert, exist for `dataset`, and match classifier.arch."""
    spec = cfg["pretrained"]
    name = spec["name"]
    if name not in ROBUSTBENCH_MODELS:
        raise UserError(f"'{KEY}.name' is '{name}', which this pipeline cannot convert; known RobustBench models: "
                        f"{', '.join(ROBUSTBENCH_MODELS)} (add one to carso.pretrained.ROBUSTBENCH_MODELS after "
                        "checking that a registered classifier.arch has its state-dict layout).")
    datasets, arch, kwargs = ROBUSTBENCH_MODELS[name]
    if dataset not in datasets:
        raise UserError(f"'{KEY}.name' ({name}) has no RobustBench L-inf checkpoint for {dataset} (only "
                        f"{', '.join(datasets)}); train the classifier instead ({KEY}: null) or pick another model.")
    if cfg["arch"] != arch or dict(cfg["arch_kwargs"]) != kwargs:
        raise UserError(f"'{KEY}.name' ({name}) is a {arch} with arch_kwargs {kwargs}, but classifier.arch is "
                        f"'{cfg['arch']}' with {cfg['arch_kwargs']}; set classifier.arch: {arch} and "
                        f"classifier.arch_kwargs: {kwargs}.")
    return arch, kwargs


def read_robustbench_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A RobustBench .pt file as a plain state dict: unwrap {'state_dict': ...} and drop 'module.' prefixes."""
    if not path.is_file():
        raise UserError(f"'{KEY}.file' is {path}, which does not exist; put the RobustBench checkpoint there "
                        "(robustbench.utils.load_model saves it as models/<dataset>/Linf/<name>.pt) or set "
                        f"'{KEY}.file' to null to fetch it with robustbench.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated, foreign or pickled-object files
        raise UserError(f"'{KEY}.file' {path} cannot be loaded safely as a checkpoint ({type(err).__name__}); "
                        "provide the RobustBench .pt file itself.") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"'{KEY}.file' {path} holds no state dict (a mapping of names to tensors, possibly "
                        "under 'state_dict'); provide the RobustBench .pt file itself.")
    state = {}
    for key, value in checkpoint.items():
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    return state


def _robustbench_zoo() -> tuple[Any, Any, Any, Any]:
    """robustbench's model registry, its dataset and threat-model enums, and its checkpoint downloader.

    robustbench 1.1.1 declares pyautoattack as a dependency but imports it under the reference package's
    name, `autoattack` (robustbench/eval.py, at package import). pyautoattack is that code packaged, with
    the same modules, so where the reference package is absent the name is pointed at it."""
    try:
        import autoattack  # noqa: F401  (the reference package, where installed)
    except ImportError:
        import pyautoattack
        import pyautoattack.state
        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    with warnings.catch_warnings():  # robustbench's imports (timm, pkg_resources, torch.jit) are all deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import download_gdrive_new
    return model_dicts, BenchmarkDataset, ThreatModel, download_gdrive_new


def fetch_from_zoo(name: str, dataset: str, model_dir: Path) -> Path:
    """The checkpoint of RobustBench's `name` for `dataset` (L-inf), downloaded with robustbench into
    `model_dir/<dataset>/Linf/<name>.pt` (robustbench's own layout) unless it is already there."""
    path = model_dir / zoo_path(name, dataset).removeprefix("models/")
    if path.is_file():
        return path
    try:
        model_dicts, benchmark_dataset, threat_model, download = _robustbench_zoo()
    except ImportError:
        raise UserError(f"'{KEY}.file' is null, so {name} must come from RobustBench's model zoo, but the "
                        "robustbench package is not installed; either pip install -e '.[robustbench]' (the "
                        f"download needs internet), or provide the checkpoint file {zoo_path(name, dataset)} "
                        f"and set '{KEY}.file' to its path.") from None
    gdrive_id = model_dicts[benchmark_dataset(dataset)][threat_model.Linf][name]["gdrive_id"]
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        download(gdrive_id, part)
        if not part.is_file():
            raise RuntimeError("the download wrote no file")
    except Exception as err:  # no internet, a moved file on Google Drive, a full disk...
        part.unlink(missing_ok=True)
        raise UserError(f"robustbench could not download {name} for {dataset} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); download {path.name} on a machine "
                        f"with internet and set '{KEY}.file' to its path.") from None
    part.replace(path)  # whole or not at all: a killed download never leaves a truncated checkpoint behind
    return path


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` with strict=True, then check every tensor arrived unchanged."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise UserError(f"{source} does not fit classifier.arch ({len(missing)} missing keys, e.g. "
                        f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); check "
                        f"'{KEY}.name' and classifier.arch.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{source} does not fit classifier.arch ({str(err).splitlines()[-1].strip()}); check "
                        f"'{KEY}.name' and classifier.arch_kwargs.") from None
    for key, value in model.state_dict().items():
        if not torch.equal(value.cpu(), state[key].to(value.dtype)):
            raise UserError(f"{source}: tensor '{key}' changed while loading; the checkpoint is not usable as is.")


def import_classifier(dataset: str, data_dir: Path, out_dir: Path, cfg: dict[str, Any], device: torch.device,
                      model_dir: Path) -> dict[str, Any]:
    """Convert the classifier named by `cfg['pretrained']`, measure it, and write the stage's outputs."""
    t0 = time.perf_counter()
    arch, kwargs = check_pretrained(cfg, dataset)
    spec, name = cfg["pretrained"], cfg["pretrained"]["name"]
    path = Path(spec["file"]) if spec["file"] else fetch_from_zoo(name, dataset, model_dir)
    state, source, digest = read_robustbench_checkpoint(path), str(path), sha256_file(path)
    ds = dataset_spec(dataset)
    model = build_classifier(arch, in_channels=ds.channels, num_classes=ds.num_classes, image_size=ds.side,
                             mean=ds.mean, std=ds.std, **kwargs)
    load_exact(model, state, source)
    model = model.to(device).eval()
    x_mon, y_mon = load_split(data_dir, "test", limit=cfg["monitor_points"])
    eps = max(training_radii(cfg))
    clean = accuracy(model, x_mon, y_mon, device, batch_size=500)
    pgd = robust_accuracy(model, x_mon, y_mon, AttackSpec("pgd", eps=eps, steps=10, step_size=eps / 4), device,
                          batch_size=500)
    log.info("imported %s from %s: clean %.4f, PGD-10 at eps %.4g %.4f on %d test images", name, source, clean,
             pgd, eps, len(y_mon))
    save_classifier(out_dir / "model.safetensors", model, dataset, arch, kwargs)
    write_text(out_dir / "curve.csv", ",".join(CURVE_COLUMNS) + "\n")
    metrics = {"source": spec["source"], "name": name, "file": str(path), "file_sha256": digest, "epochs": 0,
               "test_clean_acc": clean, "test_pgd10_acc": pgd, "pgd10_eps": eps, "monitor_points": len(y_mon),
               "parameters": sum(p.numel() for p in model.parameters()),
               "import_seconds": time.perf_counter() - t0, **describe(device)}
    write_json(out_dir / "train_metrics.json", metrics)
    return metrics
