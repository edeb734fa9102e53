"""State-dict helpers shared by observers and quantizers.

Per-channel ranges have a shape only known after the first forward pass (or after loading). Modules mixing
in :class:`ShapeFromStateDict` adopt the shapes found in a state_dict before loading it, so a fresh module
loads a calibrated one's state without running a forward pass first.
"""
from __future__ import annotations

import torch
from torch import nn


class ShapeFromStateDict(nn.Module):
    """Resize buffers and parameters to the shapes stored in a state_dict before it is copied in."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        for name, tensor in list(self._buffers.items()) + list(self._parameters.items()):
            key = prefix + name
            if tensor is None or key not in state_dict or state_dict[key].shape == tensor.shape:
                continue
            replacement = torch.empty_like(state_dict[key], dtype=tensor.dtype, device=tensor.device)
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(replacement, requires_grad=tensor.requires_grad)
            else:
                self._buffers[name] = replacement
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def assign_(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Copy `value` into `target` in place, resizing it first if the shapes differ (no grad tracking)."""
    with torch.no_grad():
        if target.shape != value.shape:
            target.data = torch.empty_like(value, dtype=target.dtype, device=target.device)
        target.copy_(value)
    return target
