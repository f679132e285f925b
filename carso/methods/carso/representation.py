"""The classifier's internal representation: activations of chosen layers, gathered with forward hooks."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from carso.datasets import dataset_spec
from carso.errors import UserError
from carso.models import build_classifier


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of every Conv2d of `model`, in registration order (the default layers to hook)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class RepresentationExtractor(nn.Module):
    """Runs the classifier once and returns the outputs of `layers` (default: every conv layer).

    The classifier's code is untouched: hooks record the activations during an ordinary forward pass,
    and gradients flow through them, so an attack on the defence sees the representation's true gradient.
    """

    def __init__(self, classifier: nn.Module, layers: Sequence[str] | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        modules = dict(classifier.named_modules())
        self.layers = list(layers) if layers else conv_layer_names(classifier)
        missing = [name for name in self.layers if name not in modules or name == ""]
        if missing:
            available = ", ".join(n for n in modules if n)
            raise UserError(f"layer '{missing[0]}' does not exist in the classifier; purifier.layers in "
                            f"params.yaml may name any of: {available}.")
        self._store: dict[str, torch.Tensor] = {}
        self._active = False  # record only during this module's own forward, not other classifier calls
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if self._active:
                self._store[name] = output
        return record

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) images in [0, 1] -> one activation tensor per hooked layer, in `layers` order."""
        self._store, self._active = {}, True
        try:
            self.classifier(x)
        finally:
            self._active = False
        acts = [self._store[name] for name in self.layers]
        self._store = {}
        return acts

    def shapes(self, sample: torch.Tensor) -> list[tuple[int, ...]]:
        """Per-layer activation shapes (without the batch dimension) for inputs like `sample`."""
        with torch.no_grad():
            return [tuple(a.shape[1:]) for a in self(sample[:1])]


def check_layers(params: dict[str, Any], source: str) -> None:
    """`purifier.layers` must name modules of the classifier that train_classifier builds, checked on the meta
    device (no weights, no data) by the Snakefile's dry run and by train_purifier (MethodSpec.check_models); an
    imported classifier (classifier.pretrained) is checked when it loads."""
    layers = params["purifier"]["layers"]
    if not layers or params["classifier"].get("pretrained"):
        return
    for dataset in params["datasets"]:
        spec = dataset_spec(dataset)
        with torch.device("meta"):
            model = build_classifier(params["classifier"]["arch"], in_channels=spec.channels,
                                     num_classes=spec.num_classes, image_size=spec.side, mean=spec.mean,
                                     std=spec.std, **params["classifier"]["arch_kwargs"])
        names = [n for n, _ in model.named_modules() if n]
        unknown = [layer for layer in layers if layer not in names]
        if unknown:
            raise UserError(f"{source}: 'purifier.layers' names '{unknown[0]}', which is not a module of "
                            f"classifier.arch {params['classifier']['arch']}; its modules are: {', '.join(names)}.")
