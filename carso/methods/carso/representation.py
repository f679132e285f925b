"""The classifier's internal representation: activations of chosen layers, gathered with forward hooks."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from carso.errors import UserError


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
