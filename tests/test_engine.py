"""The attack engine (carso/engine.py): folding frozen BatchNorm, batching EoT draws and compiling change how fast a
defence's attack passes run, never what they compute."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carso.attacks import AttackSpec, BatchedEoT, _input_gradient, attack, attack_loss, eot_chunks, eot_logits, predict
from carso.checkpoint import load_classifier
from carso.data import load_split
from carso.engine import (CPU_PASS_IMAGES, compile_model, draws_per_pass, engine_settings, fold_batchnorm, layout_plan,
                          prepare)
from carso.methods.atop.defence import AtopDefence, AtopPurifier
from carso.methods.atop.inpainter import Inpainter, InpainterConfig
from carso.methods.atop.transforms import TransformConfig
from carso.methods.carso.defence import CarsoDefence
from carso.methods.carso.purifier import PurifierConfig, build_purifier
from carso.models import build_classifier

CPU = torch.device("cpu")


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("cnn_small", in_channels=1, num_classes=10, image_size=28, mean=[0.286], std=[0.353],
                            width=4).eval()


def _randomise_batchnorm(model: nn.Module) -> None:
    """Running statistics and affine weights far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.2)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def _carso(latent: str = "zero", n_samples: int = 4) -> CarsoDefence:
    purifier, extractor = build_purifier(_classifier(), "fashion_mnist", PurifierConfig(decoder_channels=(8, 4, 4)),
                                         None)
    _randomise_batchnorm(purifier)
    return CarsoDefence(extractor.classifier, purifier, extractor, n_samples=n_samples, aggregation="logit",
                        latent=latent).eval()


def _atop(per: str = "image") -> AtopDefence:
    torch.manual_seed(0)
    inpainter = Inpainter(InpainterConfig(width=4, refine_width=4), 1).eval()
    return AtopDefence(_classifier(), AtopPurifier(TransformConfig(per=per), inpainter))


def _points(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


def _output_and_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xa = x.clone().requires_grad_(True)
    out = model(xa)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y), xa)
    return out.detach(), grad


def test_folding_keeps_carsos_outputs_and_input_gradients_and_leaves_no_batchnorm() -> None:
    model = _carso()
    x, y = _points()
    out, grad = _output_and_gradient(model, x, y)
    folds = fold_batchnorm(model)
    # 2 conv layers x 3 compressor blocks, the condition head's linear layer, 2 transposed convs of the decoder
    assert folds == 9
    assert not [m for m in model.purifier.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    folded_out, folded_grad = _output_and_gradient(model, x, y)
    assert torch.allclose(folded_out, out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(folded_grad, grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("layer, bn, shape", [
    (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), (4, 3, 8, 8)),
    (nn.ConvTranspose2d(3, 5, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(5), (4, 3, 8, 8)),
    (nn.Linear(7, 5), nn.BatchNorm1d(5), (4, 7)),
])
def test_each_foldable_pair_computes_the_same_function(layer: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(layer, bn, nn.LeakyReLU(0.2)).eval()
    _randomise_batchnorm(seq)
    x = torch.randn(*shape)
    expected = seq(x).detach()
    assert fold_batchnorm(seq) == 1
    assert isinstance(seq[1], nn.Identity) and not seq[0].weight.requires_grad
    assert torch.allclose(seq(x), expected, rtol=1e-4, atol=1e-5)


def test_folding_leaves_observed_layers_alone_and_refuses_a_training_model() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).eval()
    seq[0].register_forward_hook(lambda *args: None)  # e.g. CARSO's representation watches this layer
    assert fold_batchnorm(seq) == 0 and isinstance(seq[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).train())


@pytest.mark.parametrize("amx", [True, False])
def test_layout_auto_puts_the_inpainter_in_nchw_only_on_a_cpu_with_amx(amx: bool, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    """The per-CPU-kind rule (measured: NCHW faster on a Xeon with AMX, channels_last on an AMD EPYC without),
    decided by the hardware's kind: the same on every run of a host."""
    monkeypatch.setattr("carso.methods.atop.inpainter.has_amx", lambda: amx)
    model = prepare(_atop(), CPU)
    nchw = model.purifier.inpainter.coarse.head.weight.is_contiguous()
    assert nchw == amx and nchw != model.purifier.inpainter.coarse.head.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert model.classifier.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.classifier.conv2.weight.is_contiguous()
    assert layout_plan(_atop(), CPU) == ({"": "channels_last", "purifier.inpainter": "contiguous"} if amx else
                                         {"": "channels_last"})
    assert layout_plan(_atop(), torch.device("cuda")) == {"": "channels_last"}  # unmeasured there: as every layer


def test_a_layout_named_in_params_lays_out_every_layer_and_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("carso.methods.atop.inpainter.has_amx", lambda: True)
    x, _ = _points(4)
    outputs = []
    for layout in ("auto", "channels_last", "contiguous"):
        model = prepare(_atop(), CPU, layout=layout)
        weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        fmt = torch.contiguous_format if layout == "contiguous" else torch.channels_last
        assert layout == "auto" or all(w.is_contiguous(memory_format=fmt) for w in weights)
        torch.manual_seed(3)  # the same random transform in each pass
        outputs.append(model(x))
    assert all(torch.allclose(o, outputs[0], rtol=1e-4, atol=1e-5) for o in outputs[1:])
    with pytest.raises(ValueError, match="unknown layout"):
        layout_plan(_atop(), CPU, "nhwc")


def test_the_draws_per_pass_fill_the_pass_budget() -> None:
    carso, atop = _carso(n_samples=8), _atop()
    assert draws_per_pass(carso, 25, 20, 1000) == 5   # 25 points x 8 reconstructions x 5 draws = 1,000 images
    assert draws_per_pass(atop, 100, 20, 1000) == 10
    assert draws_per_pass(carso, 1000, 20, 1000) == 1  # never fewer than one draw
    assert draws_per_pass(carso, 1, 20, 1000) == 20    # never more than the EoT draws
    assert draws_per_pass(carso, 25, 20, None) == 1 and draws_per_pass(carso, 25, 1, 1000) == 1
    assert eot_chunks(carso, 25, 20, 1000) == [5, 5, 5, 5] and eot_chunks(carso, 25, 7, 1000) == [5, 2]


def test_engine_settings_resolve_auto_per_defence_and_device() -> None:
    assert engine_settings({}, CPU, _carso()) == {"pass_images": 1000, "compile": "eager", "layout": "auto",
                                                  "memory_formats": {"": "channels_last"}}
    assert engine_settings({}, CPU, _atop())["pass_images"] == 500  # each defence's measured tile
    assert engine_settings({}, CPU, _classifier())["pass_images"] == CPU_PASS_IMAGES
    assert engine_settings({"engine": {"pass_images": "auto"}}, torch.device("cuda"), _carso())["pass_images"] is None
    assert engine_settings({"engine": {"pass_images": 64, "compile": "default", "layout": "contiguous"}}, CPU,
                           _carso()) == {"pass_images": 64, "compile": "default", "layout": "contiguous",
                                         "memory_formats": {"": "contiguous"}}


def test_batched_draws_are_independent_passes() -> None:
    x, _ = _points(3)
    torch.manual_seed(0)
    carso = eot_logits(_carso(latent="sample"), x, 2)
    assert carso.shape == (6, 10) and not torch.allclose(carso[:3], carso[3:])
    torch.manual_seed(0)
    atop = eot_logits(_atop(per="batch"), x, 2)  # one mask per batch within a draw, a new one per draw
    assert atop.shape == (6, 10) and not torch.allclose(atop[:3], atop[3:])


@pytest.mark.parametrize("build", [lambda: _carso(latent="zero"), lambda: _atop(), lambda: _atop(per="batch")],
                         ids=["carso", "atop", "atop-per-batch"])
def test_batched_eot_gives_the_gradient_of_one_draw_at_a_time(build) -> None:
    model, (x, y) = build(), _points()
    torch.manual_seed(3)
    looped = _input_gradient(model, x, y, None, eot=6, loss="dlr", pass_images=None)
    torch.manual_seed(3)
    batched = _input_gradient(model, x, y, None, eot=6, loss="dlr", pass_images=10_000)
    assert looped.abs().sum() > 0
    assert torch.allclose(batched, looped, rtol=1e-4, atol=1e-6 * looped.abs().max().item())  # fp32 sums in another order


class _Counted(nn.Module):
    """A defence that records the batch size of every pass it makes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.passes = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_autoattacks_batched_eot_answers_what_its_own_loop_would(loss: str) -> None:
    """APGD (is_tf_model) asks `eot` times per step for (logits, loss, gradient) on the same input tensor and sums
    the gradients: the sum is the EoT gradient, the last answer is the last draw's, and it costs one batched pass."""
    model, (x, y) = _Counted(_atop()), _points()
    adapter = BatchedEoT(model, eot=6, pass_images=10_000)
    ask = adapter.get_logits_loss_grad_xent if loss == "ce" else adapter.get_logits_loss_grad_dlr
    torch.manual_seed(3)
    expected = _input_gradient(model, x, y, None, eot=6, loss=loss, pass_images=10_000)
    torch.manual_seed(3)
    last_draw = eot_logits(model, x, 6)[-len(x):].detach()
    model.passes.clear()
    torch.manual_seed(3)
    x_adv = x.clone().requires_grad_(True)
    answers = [ask(x_adv, y) for _ in range(6)]
    assert model.passes == [6 * len(x)]  # all six draws in one pass
    assert expected.abs().sum() > 0
    assert torch.allclose(sum(grad for _, _, grad in answers) / 6, expected, rtol=1e-4,
                          atol=1e-6 * expected.abs().max().item())
    logits, value, _ = answers[-1]
    assert torch.allclose(logits, last_draw) and torch.allclose(value, attack_loss(last_draw, y, loss))
    assert not torch.allclose(answers[0][0], logits)  # each answer is its own draw
    ask(x_adv.detach().clone().requires_grad_(True), y)  # the next step's input: new draws
    assert model.passes == [6 * len(x)] * 2


def test_compile_eager_leaves_the_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called with compile: eager")
    monkeypatch.setattr(torch, "compile", refuse)
    model = _carso()
    assert prepare(model, CPU, "eager") is model and compile_model(model, "eager") is model
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_model(model, "fastest")


def test_compiled_and_eager_verdicts_agree_on_the_tiny_run(tiny_local_run: Path) -> None:
    """The tiny run's classifier (`at`): PGD crafted on the eager and on the compiled model (same seed), each judged by
    both; every verdict agrees, and so do the clean ones."""
    data = tiny_local_run / "data" / "fashion_mnist"
    eager = prepare(load_classifier(data / "classifier" / "model.safetensors", "fashion_mnist"), CPU)
    compiled = compile_model(load_classifier(data / "classifier" / "model.safetensors", "fashion_mnist").eval(),
                             "default")
    x, y = load_split(data / "dataset", "test", limit=64)
    spec = AttackSpec("pgd", eps=0.1, steps=5, step_size=0.03, loss="dlr")
    torch.manual_seed(0)
    adv_eager = attack(eager, x, y, spec)
    torch.manual_seed(0)
    adv_compiled = attack(compiled, x, y, spec)
    for points in (x, adv_eager, adv_compiled):
        assert torch.equal(predict(eager, points, CPU, 64), predict(compiled, points, CPU, 64))
    assert torch.equal(predict(eager, adv_eager, CPU, 64) == y, predict(compiled, adv_compiled, CPU, 64) == y)
