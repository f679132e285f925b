"""How a defence runs inside the attacks: frozen BatchNorm folded into the layer before it, laid out for the
device, optionally compiled. None of it changes the function a defence computes (up to fp32 rounding): the
attacks stay as strong, each pass gets cheaper (bench/defence_throughput.py measures each lever).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

log = logging.getLogger(__name__)

COMPILE_MODES = ("eager", "default", "max-autotune-no-cudagraphs")  # eager: not compiled
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _observed(module: nn.Module) -> bool:
    """Whether hooks watch this module's output (e.g. CARSO's representation): then it must stay as it is."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _fuse(layer: nn.Module, bn: nn.Module) -> nn.Module | None:
    """`layer` followed by the frozen `bn` as one layer, or None when the pair is not a foldable one."""
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return None
    if bn.running_mean is None or _observed(layer) or _observed(bn):
        return None
    if isinstance(layer, nn.Linear):
        if not isinstance(bn, nn.BatchNorm1d) or bn.num_features != layer.out_features:
            return None
        return fuse_linear_bn_eval(layer, bn)
    if bn.num_features != layer.out_channels:
        return None
    return fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every frozen BatchNorm that directly follows a convolution or linear layer inside an
    `nn.Sequential` into that layer (the BatchNorm becomes an Identity). `model` must be in eval mode: folding
    uses the running statistics, which is what eval mode computes with. Returns the number of folds."""
    if any(m.training for m in model.modules()):
        raise ValueError("fold_batchnorm needs a model in eval mode (it folds the running statistics)")
    folds = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names[:-1], names[1:]):
            fused = _fuse(seq._modules[first], seq._modules[second])
            if fused is None:
                continue
            for p in fused.parameters():
                p.requires_grad_(False)
            seq._modules[first], seq._modules[second] = fused, nn.Identity()
            folds += 1
    return folds


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """`torch.compile` in `mode` (`COMPILE_MODES`; "eager": the model itself, untouched). A defence's `draws`
    (EoT passes as one batch, carso.attacks.eot_logits) is compiled with it. Shapes are static: the random draws
    of the defences do not trace with dynamic ones, and the cascade's few batch sizes each compile once."""
    if mode == "eager":
        return model
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    options = {"mode": None if mode == "default" else mode, "dynamic": False}
    if hasattr(model, "draws"):
        model.draws = torch.compile(model.draws, **options)
    return torch.compile(model, **options)


LAYOUTS = ("auto", "channels_last", "contiguous")  # engine.layout; contiguous: NCHW
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def layout_plan(model: nn.Module, device: torch.device, layout: str = "auto") -> dict[str, str]:
    """The memory format of `model` ("": every layer) and of each submodule laid out otherwise, by module name.
    `channels_last` / `contiguous`: every layer so. `auto`: channels_last (faster convolutions on the CPUs and GPUs
    measured), except submodules whose `preferred_memory_format(device)` names another format (measured per CPU kind:
    bench/defence_throughput.py, docs/performance.md). Decided by the hardware's kind, never by timing at run time."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout != "auto":
        return {"": layout}
    plan = {"": "channels_last"}
    for name, module in model.named_modules():
        prefers = getattr(module, "preferred_memory_format", None)
        if prefers is not None and (fmt := prefers(device)) != torch.channels_last:
            plan[name] = next(k for k, v in _FORMATS.items() if v == fmt)
    return plan


def lay_out(model: nn.Module, device: torch.device, layout: str = "auto") -> nn.Module:
    """`model` in the memory formats of `layout_plan`, in place (the function it computes is unchanged)."""
    plan = layout_plan(model, device, layout)
    model.to(memory_format=_FORMATS[plan.pop("")])
    for name, fmt in plan.items():
        model.get_submodule(name).to(memory_format=_FORMATS[fmt])
    return model


def prepare(model: nn.Module, device: torch.device, compile_mode: str = "eager", layout: str = "auto") -> nn.Module:
    """A defence ready for attack passes on `device`: eval mode, laid out (`lay_out`), BatchNorm folded
    (`fold_batchnorm`), compiled if asked. Folding works in place on `model` (the function it computes is unchanged)."""
    model = lay_out(model.to(device).eval(), device, layout)
    folds = fold_batchnorm(model)
    if folds:
        log.info("folded %d frozen BatchNorm layers into the layers before them", folds)
    return compile_model(model, compile_mode)


# Images per attack pass on a CPU, up to which EoT draws are batched, unless a defence names its own best tile
# (`cpu_pass_images`; bench/defence_throughput.py measures them: CARSO N=8 at 25 points is fastest at 5 draws =
# 1,000 reconstructions, AToP at 5 draws of 100). Much larger passes are slower here: activations past 32 MiB are
# mmapped by glibc and page-faulted in again at every pass. On a GPU "auto" batches no draws: a defence's
# batch_size already fills it.
CPU_PASS_IMAGES = 1000


def cpu_pass_images(model: nn.Module) -> int:
    """The best tile of `model`'s attack passes on a CPU (`CPU_PASS_IMAGES` unless it names its own)."""
    return int(getattr(model, "cpu_pass_images", CPU_PASS_IMAGES))


def engine_settings(cfg: dict, device: torch.device, model: nn.Module) -> dict:
    """A defence's `engine` section of params.yaml, resolved for `model` on `device`: {pass_images: int | None,
    compile: str, layout: str, memory_formats: `layout_plan`}. The section is optional (defaults: pass_images auto,
    compile eager, layout auto)."""
    engine = {"pass_images": "auto", "compile": "eager", "layout": "auto", **cfg.get("engine", {})}
    if engine["pass_images"] == "auto":
        engine["pass_images"] = cpu_pass_images(model) if device.type == "cpu" else None
    return {**engine, "memory_formats": layout_plan(model, device, engine["layout"])}


def images_per_input(model: nn.Module) -> int:
    """Images one input becomes inside a defence's pass (CARSO: N reconstructions; AToP RT3: its masks)."""
    return int(getattr(model, "images_per_input", 1))


def draws_per_pass(model: nn.Module, batch: int, eot: int, pass_images: int | None) -> int:
    """How many of `eot` EoT draws of a `batch`-point step go into one pass: as many as fit `pass_images` images
    (at least 1; None: one draw per pass)."""
    if pass_images is None or eot <= 1:
        return 1
    return max(1, min(eot, pass_images // max(1, batch * images_per_input(model))))
