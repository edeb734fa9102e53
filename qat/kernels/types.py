"""Plain data shared by every kernel backend: activation qparams, conv geometry, int8 weights, the interface.

Every backend takes and returns plain tensors (``torch.uint8`` / ``torch.int8`` / ``torch.float32``) plus
these dataclasses; nothing here touches quantized dtypes.

>>> qp = ActQParams(scale=0.1, zero_point=128, qmin=0, qmax=255)
>>> qp.dtype, qp.relu_floor
(torch.uint8, 128)
>>> ConvGeometry(stride=2, padding=1).stride
(2, 2)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

_DTYPE_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (returned as a Python float, exactly representable)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True)
class ActQParams:
    """Per-tensor affine activation qparams: ``q = clamp(round(x * inv_scale) + zero_point, qmin, qmax)``.

    ``scale`` is stored rounded to float32 (what fake-quant uses); the integer dtype is uint8 when
    ``qmin >= 0`` else int8, and [qmin, qmax] may be narrower than the dtype (e.g. reduce_range [0, 127]).
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float32(float(self.scale)))
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"scale must be positive and finite, got {self.scale}")
        lo, hi = _DTYPE_RANGES[self.dtype]
        if not lo <= self.qmin < self.qmax <= hi:
            raise ValueError(f"[qmin, qmax] = [{self.qmin}, {self.qmax}] must lie in [{lo}, {hi}] with qmin < qmax")
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"zero_point {self.zero_point} outside [{self.qmin}, {self.qmax}]")

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.qmin >= 0 else torch.int8

    @property
    def inv_scale(self) -> float:
        """``1 / scale`` computed in float32, exactly as ``torch.fake_quantize_per_tensor_affine`` does."""
        return float32(1.0 / self.scale)

    @property
    def relu_floor(self) -> int:
        """Lower clamp bound of a fused ReLU: ``max(qmin, zero_point)``."""
        return max(self.qmin, self.zero_point)

    def as_int8(self) -> "ActQParams":
        """The same values on int8 codes, ``q - 128`` with zero point ``z - 128`` (a uint8 grid moved down by
        128; int8 grids unchanged): for kernels whose tensor-core operands are signed.

        >>> ActQParams(0.5, 3, 0, 255).as_int8()
        ActQParams(scale=0.5, zero_point=-125, qmin=-128, qmax=127)
        """
        if self.dtype == torch.int8:
            return self
        return ActQParams(self.scale, self.zero_point - 128, self.qmin - 128, self.qmax - 128)

    @property
    def full_range(self) -> bool:
        """True when [qmin, qmax] is the whole range of ``dtype``."""
        return (self.qmin, self.qmax) == _DTYPE_RANGES[self.dtype]


@dataclass(frozen=True)
class AttentionGrids:
    """The grids of an attention core ``softmax(q @ k_t * c) @ v`` as the int8 graph holds them: the inputs
    ``q``, ``k`` (of k_t) and ``v``; ``scores``, where ``q @ k_t`` is requantized; ``logits``, the same codes
    as the softmax reads them (the scores' scale times c, c a power of two folded in by relabelling, or the
    scores' grid itself); ``probs``, where the softmax is requantized.

    >>> s = ActQParams(0.08, 3, -128, 127)
    >>> AttentionGrids(s, s, s, ActQParams(0.01, 3, -128, 127), ActQParams(1 / 255, 0, 0, 255), s).logits.scale
    0.009999999776482582
    """

    q: ActQParams
    k: ActQParams
    scores: ActQParams
    logits: ActQParams
    probs: ActQParams
    v: ActQParams

    def __post_init__(self) -> None:
        if (self.scores.zero_point, self.scores.qmin, self.scores.qmax) != (
                self.logits.zero_point, self.logits.qmin, self.logits.qmax):
            raise ValueError(f"the logits are the scores' codes on another scale: {self.scores} vs {self.logits}")


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as (h, w): an int repeated, or a sequence of two."""
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return pair


@dataclass(frozen=True)
class ConvGeometry:
    """Geometry of a 2-d convolution; ints are expanded to pairs. ``output_padding`` is for transposed conv."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    output_padding: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name in ("stride", "padding", "dilation", "output_padding"):
            object.__setattr__(self, name, as_pair(getattr(self, name), name))
        if self.groups < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"invalid conv geometry {self}")

    def output_size(self, size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
        """(Ho, Wo) of a (non-transposed) conv over an input of ``size`` (H, W)."""
        return conv_output_size(size, kernel, self.stride, self.padding, self.dilation)


def conv_output_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> tuple[int, ...]:
    """Output extent per spatial dim of a conv: ``(size + 2 p - d (k - 1) - 1) // stride + 1``."""
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """Symmetric per-output-channel int8 weight (zero point 0); per-tensor means all scales equal.

    ``q`` is ``[out, in/groups, *kernel]`` for Linear/Conv. For ConvTranspose it keeps torch's layout
    ``[in, out/groups, *kernel]`` while ``scale`` stays per output channel (``[out]``).
    """

    q: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.dim() < 2:
            raise ValueError(f"q must be an int8 tensor of rank >= 2, got {self.q.dtype} {tuple(self.q.shape)}")
        if self.scale.dtype != torch.float32 or self.scale.dim() != 1:
            raise ValueError(f"scale must be a 1-d float32 tensor, got {self.scale.dtype} {tuple(self.scale.shape)}")

    @property
    def out_channels(self) -> int:
        return self.scale.numel()


@dataclass(frozen=True, eq=False)
class Packed:
    """What ``pack_*`` returns: the caller's weight, float32 bias and geometry, plus backend-private data."""

    weight: Int8Weight
    bias: Tensor | None
    geometry: ConvGeometry | None = None
    native: Any = field(default=None, repr=False)


class KernelBackend(Protocol):
    """The interface every backend implements (reference, fbgemm, cuda); signatures are identical.

    Activations are "backend tensors": what ``to_backend(q, qp)`` returns. On reference and cuda that is
    the plain uint8/int8 tensor itself; on fbgemm an opaque torch quantized tensor, so consecutive ops
    skip conversions. ``out_qp=None`` returns float32 ``y``; otherwise a backend tensor quantized to out_qp.
    """

    name: str

    def to_backend(self, q: Tensor, qp: ActQParams) -> Tensor: ...

    def grid_op(self, fn, t: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
        """Apply a grid-keeping op (max-pool, ReLU) to a backend tensor directly, or None if unsupported."""
        ...

    def from_backend(self, t: Tensor, qp: ActQParams) -> Tensor: ...

    def quantize(self, x: Tensor, qp: ActQParams) -> Tensor: ...

    def dequantize(self, t: Tensor, qp: ActQParams) -> Tensor: ...

    def layer_norm(self, t: Tensor, in_qp: ActQParams, weight: Tensor | None, bias: Tensor | None, eps: float,
                   out_qp: ActQParams | None) -> Tensor:
        """LayerNorm over the last dim of the dequantized t (float32), requantized to out_qp when given."""
        ...

    def softmax(self, t: Tensor, in_qp: ActQParams, out_qp: ActQParams | None) -> Tensor:
        """Softmax over the last dim of the dequantized t (float32), requantized to out_qp when given."""
        ...

    def lookup(self, t: Tensor, in_qp: ActQParams, table: Tensor, out_qp: ActQParams | None) -> Tensor:
        """``table[code]`` for every code of t (its 8 bits index 256 entries): codes of out_qp's dtype when
        out_qp is given, else float32 values."""
        ...

    def pack_linear(self, weight: Int8Weight, bias: Tensor | None) -> Packed: ...

    def linear(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor: ...

    def pack_conv2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed: ...

    def conv2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor: ...

    def pack_conv_transpose2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed: ...

    def conv_transpose2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
                         out_qp: ActQParams | None = None, relu: bool = False) -> Tensor: ...

    fuses_layer_add: bool
    """Class attribute: True when ``conv2d_add`` and ``linear_add`` are each one fused kernel (lowering then fuses
    residual adds into the conv or Linear before them)."""

    int8_activations: bool
    """Class attribute: True when the backend's kernels are faster on int8 than on uint8 activations (lowering
    then moves every uint8 grid to its int8 equivalent, ``ActQParams.as_int8``: the same values)."""

    def conv2d_add(self, x: Tensor, x_qp: ActQParams, packed: Packed, conv_qp: ActQParams, other: Tensor,
                   other_qp: ActQParams, out_qp: ActQParams, relu: bool = False, conv_relu: bool = False) -> Tensor:
        """``add(conv2d(x, x_qp, packed, conv_qp, conv_relu), conv_qp, other, other_qp, out_qp, relu)``: what
        the unfused graph computes (``reference.layer_then_add``), fused where ``fuses_layer_add``."""
        ...

    def linear_add(self, x: Tensor, x_qp: ActQParams, packed: Packed, linear_qp: ActQParams, other: Tensor,
                   other_qp: ActQParams, out_qp: ActQParams, relu: bool = False, linear_relu: bool = False) -> Tensor:
        """``add(linear(x, x_qp, packed, linear_qp, linear_relu), linear_qp, other, other_qp, out_qp, relu)``,
        likewise."""
        ...

    def add(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor: ...

    def mul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor: ...

    def cat(self, tensors: Sequence[Tensor], qps: Sequence[ActQParams], dim: int, out_qp: ActQParams) -> Tensor: ...

    def matmul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
               out_qp: ActQParams | None = None) -> Tensor: ...

    fuses_attention: bool
    """Class attribute: True when ``attention`` is one fused kernel (lowering then fuses attention cores)."""

    def attention(self, q: Tensor, k_t: Tensor, v: Tensor, grids: AttentionGrids,
                  out_qp: ActQParams | None = None) -> Tensor:
        """``softmax(q @ k_t) @ v`` on ``grids``: what the unfused graph computes (``reference.attention_unfused``:
        matmul, relabel, softmax, matmul), fused where ``fuses_attention``."""
        ...
