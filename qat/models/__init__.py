"""Model definitions and the model registry (pure torch/torchvision)."""
from qat.models.checkpoint import load_pretrained, read_state_dict
from qat.models.cifar_resnet import CifarResNet, PadShortcut, cifar_resnet, load_cifar_resnet
from qat.models.registry import MODELS, ModelEntry, available_models, build_model, get_entry
from qat.models.tiny_transformer import TinyTransformer

__all__ = [
    "MODELS",
    "CifarResNet",
    "ModelEntry",
    "PadShortcut",
    "TinyTransformer",
    "available_models",
    "build_model",
    "cifar_resnet",
    "get_entry",
    "load_cifar_resnet",
    "load_pretrained",
    "read_state_dict",
]
