"""Models are saved as safetensors, loaded safely, and bad files give one clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carso.checkpoint import load_classifier, save_classifier
from carso.errors import UserError
from carso.io import load_checkpoint, save_checkpoint
from carso.models import build_classifier


def _model(arch: str = "cnn_small", side: int = 28, channels: int = 1, **kw: int) -> torch.nn.Module:
    return build_classifier(arch, in_channels=channels, num_classes=10, image_size=side,
                            mean=[0.5] * channels, std=[0.5] * channels, **kw)


def test_roundtrip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model().eval()
    save_classifier(tmp_path / "m.safetensors", model, "fashion_mnist", "cnn_small", {})
    loaded = load_classifier(tmp_path / "m.safetensors", "fashion_mnist")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


def test_corrupted_file_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_classifier(path, _model(), "fashion_mnist", "cnn_small", {})
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match="corrupted"):
        load_classifier(path, "fashion_mnist")


def test_wrong_dataset_is_refused(tmp_path: Path) -> None:
    save_classifier(tmp_path / "m.safetensors", _model(), "fashion_mnist", "cnn_small", {})
    with pytest.raises(UserError, match="trained on fashion_mnist, not mnist"):
        load_classifier(tmp_path / "m.safetensors", "mnist")


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    model = _model(width=8)
    save_classifier(tmp_path / "m.safetensors", model, "fashion_mnist", "cnn_small", {})  # metadata lies
    with pytest.raises(UserError, match="does not match"):
        load_classifier(tmp_path / "m.safetensors", "fashion_mnist")


def test_training_checkpoint_refuses_pickled_objects(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "evil.pt")
    save_checkpoint(tmp_path / "ok.pt", {"epoch": 3, "w": torch.ones(2)})
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 3


@pytest.mark.parametrize("arch,side,channels,kw", [("cnn_small", 28, 1, {}), ("preact_resnet18", 32, 3, {}),
                                                   ("wide_resnet", 32, 3, {"depth": 10, "width": 1})])
def test_registry_models_map_unit_images_to_logits(arch: str, side: int, channels: int, kw: dict) -> None:
    model = _model(arch, side, channels, **kw).eval()
    assert model(torch.rand(2, channels, side, side)).shape == (2, 10)


def test_architecture_that_does_not_fit_the_images_is_refused() -> None:
    with pytest.raises(UserError, match="built for 32x32"):
        _model("preact_resnet18", 28, 1)


def _lookahead(device: str = "cpu") -> tuple[torch.nn.Module, "torch.optim.Optimizer"]:
    from carso.methods.carso.training import Lookahead

    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3, device=device)
    return net, Lookahead(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), k=3, alpha=0.5)


def _steps(net: torch.nn.Module, opt: "torch.optim.Optimizer", first: int, last: int) -> None:
    for i in range(first, last):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()


def test_lookahead_resumed_from_a_checkpoint_continues_exactly(tmp_path: Path) -> None:
    """The slow weights and the step counter are part of the state: a run resumed between two slow updates
    ends where an uninterrupted one does."""
    net, opt = _lookahead()
    _steps(net, opt, 0, 8)
    half, half_opt = _lookahead()
    _steps(half, half_opt, 0, 4)  # one slow update done, the next one due in 2 steps
    save_checkpoint(tmp_path / "c.pt", {"model": half.state_dict(), "optimizer": half_opt.state_dict()})
    state = load_checkpoint(tmp_path / "c.pt")
    resumed, resumed_opt = _lookahead()
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    _steps(resumed, resumed_opt, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), resumed.parameters()))


def test_lookahead_state_is_restored_on_the_device_of_the_run(tmp_path: Path) -> None:
    """A checkpoint loads onto the CPU; on a GPU run every restored tensor must follow the parameters. The meta
    device stands in for the GPU here: anything left on the CPU would fail the first step there."""
    net, opt = _lookahead()
    _steps(net, opt, 0, 2)
    save_checkpoint(tmp_path / "c.pt", {"optimizer": opt.state_dict()})
    other_net, other_opt = _lookahead(device="meta")
    other_opt.load_state_dict(load_checkpoint(tmp_path / "c.pt")["optimizer"])
    restored = [t for group in other_opt.slow for t in group]
    restored += [v for s in other_opt.inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert len(restored) == 4 and all(t.device.type == "meta" for t in restored)
