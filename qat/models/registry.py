"""The table of buildable models: CIFAR ResNets, torchvision classifiers and a tiny transformer.

Torchvision models are built with weights=None (no downloads); pass `pretrained_path` to load a local
state_dict strictly. Every entry carries the input size its default build expects and a small
configuration (keyword overrides + input size) that builds the same architecture for fast tests.

    >>> model = build_model("resnet20", num_classes=10).eval()
    >>> tuple(model(MODELS["resnet20"].example_input(batch_size=2)).shape)
    (2, 10)
"""
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import torch
import torchvision.models as tvm
from torch import nn

from qat.models.checkpoint import load_pretrained
from qat.models.cifar_resnet import cifar_resnet
from qat.models.tiny_transformer import TinyTransformer

CIFAR_INPUT = (3, 32, 32)
IMAGENET_INPUT = (3, 224, 224)


@dataclass(frozen=True)
class ModelEntry:
    """builder(num_classes=..., **kw) -> nn.Module; input_size is (C, H, W) for the default build.

    small_kwargs / small_input_size: overrides that keep the architecture but make a forward cheap.
    """

    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    small_kwargs: tuple[tuple[str, Any], ...] = ()
    small_input_size: tuple[int, int, int] | None = None

    def example_input(self, batch_size: int = 2, small: bool = False) -> torch.Tensor:
        """A standard-normal batch [batch_size, C, H, W] of the default (or small) input size."""
        size = self.small_input_size if small and self.small_input_size else self.input_size
        return torch.randn(batch_size, *size)


def _imagenet(builder: Callable[..., nn.Module], **fixed: Any) -> ModelEntry:
    """A torchvision classifier: weights=None, ImageNet input size, 32x32 for fast tests."""
    return ModelEntry(partial(builder, weights=None, **fixed), IMAGENET_INPUT, small_input_size=CIFAR_INPUT)


MODELS: MappingProxyType[str, ModelEntry] = MappingProxyType({
    "resnet20": ModelEntry(partial(cifar_resnet, 20), CIFAR_INPUT),
    "resnet32": ModelEntry(partial(cifar_resnet, 32), CIFAR_INPUT),
    "resnet44": ModelEntry(partial(cifar_resnet, 44), CIFAR_INPUT),
    "resnet56": ModelEntry(partial(cifar_resnet, 56), CIFAR_INPUT),
    "resnet18": _imagenet(tvm.resnet18),
    "resnet50": _imagenet(tvm.resnet50),
    "mobilenet_v2": _imagenet(tvm.mobilenet_v2),
    "mobilenet_v3_large": _imagenet(tvm.mobilenet_v3_large),
    "efficientnet_b0": _imagenet(tvm.efficientnet_b0),
    "shufflenet_v2_x1_0": _imagenet(tvm.shufflenet_v2_x1_0),
    "regnet_x_400mf": _imagenet(tvm.regnet_x_400mf),
    "densenet121": _imagenet(tvm.densenet121),
    "googlenet": _imagenet(tvm.googlenet, aux_logits=False, init_weights=True),
    "convnext_tiny": _imagenet(tvm.convnext_tiny),
    "vit_b_16": ModelEntry(
        partial(tvm.vit_b_16, weights=None), IMAGENET_INPUT,
        small_kwargs=(("image_size", 32),), small_input_size=CIFAR_INPUT,
    ),
    "swin_t": _imagenet(tvm.swin_t),
    "tiny_transformer": ModelEntry(TinyTransformer, CIFAR_INPUT),
})


def available_models() -> tuple[str, ...]:
    return tuple(MODELS)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; an unknown name raises ValueError listing the available ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return MODELS[name]


def build_model(name: str, num_classes: int = 10, pretrained_path: str | Path | None = None, **kw: Any) -> nn.Module:
    """Build model `name` with `num_classes` outputs; load `pretrained_path` strictly when given.

    Extra keywords go to the builder (e.g. image_size=32 for vit_b_16, depth=4 for tiny_transformer).
    """
    model = get_entry(name).builder(num_classes=num_classes, **kw)
    return model if pretrained_path is None else load_pretrained(model, pretrained_path)
