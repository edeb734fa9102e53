"""QAT replacements for leaf modules that read their children's weights directly (so swapping the child
module alone would not quantize anything). One row per supported leaf type.

Swin's ShiftedWindowAttention passes `self.qkv.weight` / `self.proj.weight` to a wrapped function and reads
self.training, so it stays a leaf: its replacement fake-quantizes the input and both weights and calls the
same function; the attention internals run in float.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import swin_transformer

from qat.fx.config import LayerQuant
from qat.fx.modules import QLinear


class QShiftedWindowAttention(nn.Module):
    """torchvision ShiftedWindowAttention with quantized input and quantized qkv / proj weights."""

    def __init__(self, attention: swin_transformer.ShiftedWindowAttention, layer: LayerQuant):
        super().__init__()
        attention.qkv = QLinear.from_float(attention.qkv, layer.weight)
        attention.proj = QLinear.from_float(attention.proj, layer.weight)
        self.attention = attention
        self.input_fq = layer.activation.build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        return swin_transformer.shifted_window_attention(
            self.input_fq(x),
            a.qkv.weight_fq(a.qkv.weight),
            a.proj.weight_fq(a.proj.weight),
            a.get_relative_position_bias(),
            a.window_size,
            a.num_heads,
            shift_size=a.shift_size,
            attention_dropout=a.attention_dropout,
            dropout=a.dropout,
            qkv_bias=a.qkv.bias,
            proj_bias=a.proj.bias,
            training=self.training,
        )


LEAF_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    swin_transformer.ShiftedWindowAttention: QShiftedWindowAttention,
}
