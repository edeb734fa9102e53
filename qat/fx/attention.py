"""A traceable multi-head attention built from nn.Linear and matmuls, so the graph pass quantizes the q/k/v/out
projections and the QK^T and AV products. `decompose_attention` swaps every nn.MultiheadAttention in a model
for it, with the same weights and outputs.

>>> mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
>>> x = torch.randn(2, 5, 16)
>>> torch.allclose(DecomposedMultiheadAttention.from_float(mha)(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
True
"""
from __future__ import annotations

import math

import torch
from torch import nn


class DecomposedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (same call signature) for kdim = vdim = embed_dim, without bias_k/zero_attn."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, bias: bool, batch_first: bool):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "DecomposedMultiheadAttention":
        if not supports(mha):
            raise ValueError("only MultiheadAttention with kdim = vdim = embed_dim and no bias_k/add_zero_attn decomposes")
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, has_bias, mha.batch_first)
        with torch.no_grad():
            for proj, w in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_weight.chunk(3)):
                proj.weight.copy_(w)
            if has_bias:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.in_proj_weight.device).train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (N,L,E)->(N,H,L,D)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (L,N,E)->(N,L,E)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (N,H,L,S)
        if attn_mask is not None:
            mask = _additive(attn_mask, scores)
            if mask.dim() == 3:
                mask = mask.reshape(scores.shape[0], self.num_heads, *mask.shape[-2:])  # (N*H,L,S)->(N,H,L,S)
            scores = scores + mask
        elif is_causal:
            causal = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores + _additive(causal, scores)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores)[:, None, None, :]
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2)  # (N,H,L,D)->(N,L,H,D)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Boolean masks (True = masked) become -inf; float masks are added as they are."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def supports(mha: nn.MultiheadAttention) -> bool:
    return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace every supported nn.MultiheadAttention in `model` (in place); returns the replaced paths."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and supports(module):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                    DecomposedMultiheadAttention.from_float(module))
            replaced.append(name)
    return replaced
