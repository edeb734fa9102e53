"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) with "option A" identity shortcuts.

The parameter names match the checkpoints of akamaster/pytorch_resnet_cifar10 once their `module.`
prefix is stripped, so `load_cifar_resnet` loads them strictly. Every module is FX-traceable: the
downsampling shortcut is a small module (`PadShortcut`) with no data-dependent control flow.

    >>> import torch
    >>> model = cifar_resnet(20).eval()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qat.models.checkpoint import load_pretrained

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56)
STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 in H and W, zero-pad the channels from planes // 2 to planes.

    >>> PadShortcut(32)(torch.ones(1, 16, 8, 8)).shape
    torch.Size([1, 32, 4, 4])
    """

    def __init__(self, planes: int):
        super().__init__()
        self.planes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.planes // 4
        subsampled = x[:, :, ::2, ::2]  # [N, C, H/2, W/2]
        return F.pad(subsampled, (0, 0, 0, 0, pad, pad))  # [N, C + 2 * pad, H/2, W/2]

    def extra_repr(self) -> str:
        return f"planes={self.planes}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three stages of `blocks_per_stage` basic blocks (16, 32, 64 channels), global pool, linear head."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], blocks_per_stage, stride=1)
        self.layer2 = _make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], blocks_per_stage, stride=2)
        self.layer3 = _make_stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(STAGE_WIDTHS[2], num_classes)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.flatten(self.avgpool(out))  # [N, 64, H/4, W/4] -> [N, 64]
        return self.linear(out)


def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_planes, planes, stride)]
    blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _kaiming_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a randomly initialised CIFAR ResNet of depth 6n + 2 (20, 32, 44, 56, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (e.g. {CIFAR_RESNET_DEPTHS}), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)


def load_cifar_resnet(depth: int, checkpoint_path: str | Path | None = None, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet and, given a checkpoint, load it strictly (a `module.` prefix is stripped).

    Accepts a bare state_dict or a dict holding one under 'state_dict' (the akamaster format).
    Raises FileNotFoundError / ValueError naming the path when the file is missing, unreadable or does
    not fit the model.
    """
    model = cifar_resnet(depth, num_classes)
    return model if checkpoint_path is None else load_pretrained(model, checkpoint_path)
