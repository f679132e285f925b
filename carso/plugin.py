"""The stable surface for plugin authors: everything a package needs to add a method (its training stages) and its
defences to this pipeline without touching the repository. Import from here only; the rest of `carso` is internal.

A plugin is an installed distribution that declares, in its pyproject.toml,

    [project.entry-points."carso.methods"]
    <name> = "<package>:METHOD"

where METHOD is a `MethodSpec` with `api=API_VERSION` as this module states it when the plugin is written. A params
file uses it by naming it: `plugins: [<name>]`; its sections' JSON schema is `schema.yaml` beside the module that
declares METHOD (`sections:` mapping each section to its schema), and its defences get evaluation.defences entries
like the built-in ones. Each stage function is called as f(args, params, device, team) with the parsed CLI
arguments (args.out, and each flag of the stage's `args`), the validated params and the device to run on. Each
defence loader is called as f(classifier_path, artifacts, dataset, params) and returns one nn.Module from [0, 1]
images to logits, differentiable end to end. A loader-only defence (no stage) names its own files through params
keys (`DefenceSpec.files`), loaded as safetensors. A method's report part (`MethodSpec.report`) is called as
f(results, params), where results.path("<folder>/<file>") is a file under the dataset's results, and returns a
list of sections: (title, "list", [sentences]), (title, "table", [[header...], [row...]...]) or (title, "code", text).

See examples/carso-denoiser/ for a complete plugin with one trained method and one loader-only defence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from carso.checkpoint import load_classifier
from carso.data import load_adversarial, load_split
from carso.discovery import API_VERSION
from carso.errors import UserError
from carso.io import load_tensors, read_json, save_tensors, write_json, write_text
from carso.methods import DefenceSpec, MethodSpec, StageSpec
from carso.resume import EpochCheckpoint, seed_epoch

__all__ = ["API_VERSION", "DefenceSpec", "EpochCheckpoint", "MethodSpec", "StageSpec", "UserError", "checkpoint_key",
           "load_adversarial", "load_classifier", "load_split", "load_tensors", "load_weights", "read_json",
           "save_tensors", "seed_epoch", "write_json", "write_text"]


def checkpoint_key(method: str, *parts: Any) -> str:
    """A key for `EpochCheckpoint` that changes with `parts` (the stage's settings, its inputs' digests) and with
    the code of the plugin that declares `method`: a checkpoint made by other plugin code is never resumed."""
    from carso.defences import PLUGINS
    from carso.io import fingerprint

    plugin = PLUGINS.get(method)
    if plugin is None:
        raise UserError(f"method '{method}' is not an active plugin; name it in the params file's `plugins`")
    return fingerprint([plugin.record(), *parts])


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file (never unpickled), refused in one sentence if missing or not one."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: weights are read from .safetensors files only (never unpickled); convert it with "
                        "safetensors.torch.save_file")
    if not path.exists():
        raise UserError(f"{path} does not exist; check the params key that names it")
    return load_tensors(path)[0]
