"""Every registry entry builds and classifies; CIFAR ResNets trace with torch.fx and load the shared
pretrained checkpoints strictly, with the published accuracy."""
from pathlib import Path

import pytest
import torch

from qat.data import cifar10_test_batches
from qat.models import (
    MODELS,
    PadShortcut,
    available_models,
    build_model,
    cifar_resnet,
    get_entry,
    load_cifar_resnet,
)

CIFAR_DEPTHS = (20, 32, 44, 56)
# He et al. 2016, table 6: 0.27M, 0.46M, 0.66M, 0.85M parameters.
CIFAR_PARAMETERS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}
# Input sizes each traced model must handle: CIFAR ResNets pool adaptively, so none is baked in at trace.
TRACE_INPUT_SIZES = {"resnet20": (32, 40), "resnet32": (32, 40), "resnet44": (32, 40), "resnet56": (32, 40),
                     "tiny_transformer": (32,)}


def pretrained_path(shared_data: Path, depth: int) -> Path:
    return next((shared_data / "pretrained").glob(f"resnet{depth}-*.th"))


@pytest.mark.parametrize("name", available_models())
def test_small_forward_gives_finite_logits(name):
    entry = get_entry(name)
    model = build_model(name, num_classes=7, **dict(entry.small_kwargs)).eval()
    with torch.no_grad():
        logits = model(entry.example_input(batch_size=2, small=True))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", available_models())
def test_default_input_forward_gives_finite_logits(name):
    entry = get_entry(name)
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        logits = model(entry.example_input(batch_size=2))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20, resnet32") as info:
        build_model("resnet21")
    assert all(name in str(info.value) for name in MODELS)


@pytest.mark.parametrize("name", TRACE_INPUT_SIZES)
def test_fx_trace_matches_eager(name):
    model = build_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    for size in TRACE_INPUT_SIZES[name]:
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_cifar_resnet_parameter_count_matches_paper(depth):
    assert sum(p.numel() for p in cifar_resnet(depth).parameters()) == CIFAR_PARAMETERS[depth]


@pytest.mark.parametrize("depth", (0, 7, 21))
def test_cifar_resnet_rejects_depths_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(depth)


def test_pad_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(32)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert out[:, :8].eq(0).all() and out[:, 24:].eq(0).all()


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_pretrained_checkpoints_load_strictly(shared_data, depth):
    path = pretrained_path(shared_data, depth)
    model = build_model(f"resnet{depth}", pretrained_path=path)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.linear.weight, raw["module.linear.weight"], rtol=0, atol=0)
    assert set(model.state_dict()) - {k.removeprefix("module.") for k in raw} <= {
        k for k in model.state_dict() if k.endswith("num_batches_tracked")
    }


def top1(model: torch.nn.Module, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return correct / total


def test_resnet20_pretrained_accuracy_on_lossless_subset(shared_data):
    model = load_cifar_resnet(20, pretrained_path(shared_data, 20)).eval()
    accuracy = top1(model, cifar10_test_batches(shared_data, n=512, batch_size=256, source="lossless_subset"))
    assert accuracy > 0.88  # measured 0.9121 (467/512); 0.9164 on all 1017 images


@pytest.mark.slow
@pytest.mark.parametrize(("depth", "expected"), [(20, 0.9164), (32, 0.9282), (44, 0.9341), (56, 0.9272)])
def test_pretrained_accuracy_on_full_lossless_subset_matches_readme(shared_data, depth, expected):
    model = load_cifar_resnet(depth, pretrained_path(shared_data, depth)).eval()
    accuracy = top1(model, cifar10_test_batches(shared_data, source="lossless_subset"))
    assert accuracy == pytest.approx(expected, abs=0.001)


def test_corrupt_checkpoint_raises_naming_the_path(tmp_path, shared_data):
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.th"
    truncated.write_bytes(pretrained_path(shared_data, 20).read_bytes()[:5000])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=f"cannot read checkpoint {path}"):
            load_cifar_resnet(20, path)


def test_checkpoint_of_another_depth_raises_naming_the_path(shared_data):
    path = pretrained_path(shared_data, 32)
    with pytest.raises(ValueError, match=f"checkpoint {path} does not fit CifarResNet"):
        load_cifar_resnet(20, path)


def test_non_state_dict_checkpoint_and_missing_file_raise(tmp_path):
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(ValueError, match=f"checkpoint {not_weights} holds no state_dict"):
        load_cifar_resnet(20, not_weights)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_cifar_resnet(20, tmp_path / "absent.th")
