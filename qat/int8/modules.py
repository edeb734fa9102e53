"""Int8 modules: plain int8 weights, float32 scales and bias, activation qparams; compute through a kernel backend.

Each holds its backend by name and packs its weight for that backend lazily (packed data is not state).
Activations between int8 modules are the backend's tensors (plain uint8/int8, or quint8 on fbgemm).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qat.kernels import (ActQParams, AttentionGrids, ConvGeometry, Int8Weight, dequantize_activation, get_backend,
                         quantize_activation)


class BackendModule(nn.Module):
    """Base: remembers the backend name; the backend object itself is re-created after unpickling."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend_name = backend
        self._backend = None

    @property
    def backend(self):
        if self._backend is None:
            self._backend = get_backend(self.backend_name)
        return self._backend

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_backend"] = None
        if "_packed" in state:
            state["_packed"] = None
        return state


class Quantize(BackendModule):
    """float -> backend int8 tensor with qparams `qp` (graph inputs, outputs of float ops)."""

    def __init__(self, qp: ActQParams, backend: str):
        super().__init__(backend)
        self.qp = qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.quantize(x.float(), self.qp)

    def extra_repr(self) -> str:
        return f"{self.qp}"


class Dequantize(BackendModule):
    """backend int8 tensor -> float32, where float ops follow."""

    def __init__(self, qp: ActQParams, backend: str):
        super().__init__(backend)
        self.qp = qp

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.backend.dequantize(t, self.qp)

    def extra_repr(self) -> str:
        return f"{self.qp}"


class Requantize(BackendModule):
    """Move an int8 tensor from one grid to another: round(dequantize(t) * (1/s_out)) + z_out."""

    def __init__(self, in_qp: ActQParams, out_qp: ActQParams, backend: str):
        super().__init__(backend)
        self.in_qp, self.out_qp = in_qp, out_qp

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.backend.quantize(self.backend.dequantize(t, self.in_qp), self.out_qp)


class Relabel(BackendModule):
    """The same codes read on another grid: ``x * 2**k`` of an int8 x is x's codes with scale * 2**k (exact in
    float32). No pass over the data on the reference and cuda backends (plain codes); fbgemm re-wraps them.

    >>> r = Relabel(ActQParams(0.5, 0, -128, 127), ActQParams(0.0625, 0, -128, 127), "reference")
    >>> r(torch.tensor([3], dtype=torch.int8))  # 1.5 read as 0.1875 = 1.5 / 8
    tensor([3], dtype=torch.int8)
    """

    def __init__(self, in_qp: ActQParams, out_qp: ActQParams, backend: str):
        super().__init__(backend)
        if (in_qp.zero_point, in_qp.qmin, in_qp.qmax) != (out_qp.zero_point, out_qp.qmin, out_qp.qmax):
            raise ValueError(f"a relabel keeps the codes: only the scale may change, got {in_qp} -> {out_qp}")
        self.in_qp, self.out_qp = in_qp, out_qp

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.backend.to_backend(self.backend.from_backend(t, self.in_qp), self.out_qp)

    def extra_repr(self) -> str:
        return f"scale {self.in_qp.scale:.4g} -> {self.out_qp.scale:.4g}"


class Int8WeightLayer(BackendModule):
    """Shared state of Int8Linear / Int8Conv*: int8 weight, scales, float bias, in/out qparams, fused ReLU."""

    kind = "linear"

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, in_qp: ActQParams,
                 out_qp: ActQParams | None, relu: bool, backend: str, geometry: ConvGeometry | None = None):
        super().__init__(backend)
        self.register_buffer("weight_int8", weight.q)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.geometry, self.in_qp, self.out_qp, self.relu = geometry, in_qp, out_qp, relu
        self._packed = None

    @property
    def packed(self):
        if self._packed is None:
            weight = Int8Weight(self.weight_int8, self.weight_scale)
            pack = getattr(self.backend, f"pack_{self.kind}")
            self._packed = pack(weight, self.bias) if self.geometry is None else pack(weight, self.bias, self.geometry)
        return self._packed

    def _apply(self, fn, recurse=True):
        self._packed = None  # device or dtype moves invalidate the packed weight
        return super()._apply(fn, recurse)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return getattr(self.backend, self.kind)(t, self.in_qp, self.packed, self.out_qp, self.relu)

    def extra_repr(self) -> str:
        out = "float" if self.out_qp is None else f"scale={self.out_qp.scale:.4g}, zp={self.out_qp.zero_point}"
        return f"{self.kind}, weight={tuple(self.weight_int8.shape)}, out=({out}), relu={self.relu}, {self.backend_name}"


class Int8Linear(Int8WeightLayer):
    kind = "linear"


class Int8Conv2d(Int8WeightLayer):
    kind = "conv2d"


class Int8LayerAdd(Int8WeightLayer):
    """A layer whose output (on ``layer_qp``, ReLU'd when ``layer_relu``) feeds only an add with ``other``: one
    backend call, ``conv2d_add`` / ``linear_add``, fused into the layer's epilogue where the backend
    ``fuses_layer_add``. ``out_qp`` and ``relu`` are the add's."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, in_qp: ActQParams, layer_qp: ActQParams,
                 layer_relu: bool, other_qp: ActQParams, backend: str, geometry: ConvGeometry | None = None):
        super().__init__(weight, bias, in_qp, None, False, backend, geometry)
        self.layer_qp, self.layer_relu, self.other_qp = layer_qp, layer_relu, other_qp

    @classmethod
    def from_layer(cls, layer: Int8WeightLayer, other_qp: ActQParams) -> Int8LayerAdd:
        weight = Int8Weight(layer.weight_int8, layer.weight_scale)
        return cls(weight, layer.bias, layer.in_qp, layer.out_qp, layer.relu, other_qp, layer.backend_name,
                   layer.geometry)

    def forward(self, t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return getattr(self.backend, f"{self.kind}_add")(t, self.in_qp, self.packed, self.layer_qp, other,
                                                         self.other_qp, self.out_qp, self.relu, self.layer_relu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, + add ({self.kind} relu={self.layer_relu})"


class Int8Conv2dAdd(Int8LayerAdd):
    kind = "conv2d"


class Int8LinearAdd(Int8LayerAdd):
    kind = "linear"


FUSED_ADD = {Int8Conv2d: Int8Conv2dAdd, Int8Linear: Int8LinearAdd}  # layer type -> the layer with its add fused


class Int8ConvTranspose2d(Int8WeightLayer):
    kind = "conv_transpose2d"


class Int8Conv1d(Int8Conv2d):
    """Conv1d as a conv2d of height 1: weight [out, in, k] is stored as [out, in, 1, k]."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        out = super().forward(t.unsqueeze(2))  # (N, C, L) -> (N, C, 1, L)
        return out.squeeze(2)


class Int8Binary(BackendModule):
    """add / mul / matmul of two int8 tensors, requantized to out_qp (add/mul may fuse a ReLU)."""

    def __init__(self, op: str, a_qp: ActQParams, b_qp: ActQParams, backend: str):
        super().__init__(backend)
        self.op, self.a_qp, self.b_qp = op, a_qp, b_qp
        self.out_qp: ActQParams | None = None
        self.relu = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.backend, self.op)
        if self.op == "matmul":
            return fn(a, self.a_qp, b, self.b_qp, self.out_qp)
        return fn(a, self.a_qp, b, self.b_qp, self.out_qp, self.relu)

    def extra_repr(self) -> str:
        return f"{self.op}{'+relu' if self.relu else ''}, {self.backend_name}"


class Int8Cat(BackendModule):
    """Concatenate int8 tensors of (possibly) different grids onto out_qp."""

    def __init__(self, qps: tuple[ActQParams, ...], dim: int, backend: str):
        super().__init__(backend)
        self.qps, self.dim = qps, dim
        self.out_qp: ActQParams | None = None

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.backend.cat(list(tensors), self.qps, self.dim, self.out_qp)


class Int8LayerNorm(BackendModule):
    """LayerNorm over the last dim of an int8 tensor: dequantize, normalise, weight and bias, and requantize
    to out_qp when an activation quantizer follows (else float32 out), in one pass on the cuda backend
    instead of three (dequantize, LayerNorm, quantize). The float LayerNorm's numbers, up to the order of
    its sums (1 LSB at an exact rounding boundary)."""

    def __init__(self, in_qp: ActQParams, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                 backend: str):
        super().__init__(backend)
        self.in_qp, self.eps = in_qp, float(eps)
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_qp: ActQParams | None = None

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, in_qp: ActQParams, backend: str) -> "Int8LayerNorm":
        return cls(in_qp, ln.weight, ln.bias, ln.eps, backend)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.backend.layer_norm(t, self.in_qp, self.weight, self.bias, self.eps, self.out_qp)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, in={self.in_qp}, out={self.out_qp}, {self.backend_name}"


class Int8Softmax(BackendModule):
    """Softmax over the last dim of an int8 tensor: dequantize, softmax, and requantize to out_qp when an
    activation quantizer follows (else float32 out), one pass on the cuda backend instead of three. The
    float softmax's numbers up to the order of its sums (1 LSB at an exact rounding boundary)."""

    def __init__(self, in_qp: ActQParams, backend: str):
        super().__init__(backend)
        self.in_qp = in_qp
        self.out_qp: ActQParams | None = None

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.backend.softmax(t, self.in_qp, self.out_qp)

    def extra_repr(self) -> str:
        return f"in={self.in_qp}, out={self.out_qp}, {self.backend_name}"


class Int8Attention(BackendModule):
    """An attention core of int8 q, k_t, v: ``q @ k_t`` requantized, scaled by a power of two (relabelled),
    softmax requantized, ``@ v``, which the unfused graph runs as four modules (two Int8Binary matmuls, a
    Relabel, an Int8Softmax), as one backend call, ``attention``: one kernel where the backend
    ``fuses_attention``, the scores and probabilities never stored. ``out_qp`` is the second matmul's."""

    def __init__(self, grids: AttentionGrids, backend: str):
        super().__init__(backend)
        self.grids = grids
        self.out_qp: ActQParams | None = None

    def forward(self, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.attention(q, k_t, v, self.grids, self.out_qp)

    def extra_repr(self) -> str:
        return f"scores={self.grids.scores}, probs={self.grids.probs}, out={self.out_qp}, {self.backend_name}"


class Int8Lookup(BackendModule):
    """An elementwise float function of an int8 tensor (GELU, SiLU, sigmoid, ...) as a table over the input's
    256 codes: ``values[c] = fn(dequantize(c))`` (float32), requantized to out_qp when an activation quantizer
    follows (else the float values are the output). One gather pass instead of dequantize, fn, quantize, on
    the values the fake-quant graph applies fn to: the same numbers as far as torch agrees with itself (its
    vectorised and scalar GELU loops differ by ~1e-7, which requantized is 1 LSB at an exact rounding
    boundary). Holds only the table, whatever the function, so exported models need no code for it.

    >>> qp = ActQParams(scale=0.5, zero_point=128, qmin=0, qmax=255)
    >>> m = Int8Lookup.from_function(torch.nn.functional.relu, (), {}, qp, "reference", torch.device("cpu"))
    >>> m(torch.tensor([126, 128, 131], dtype=torch.uint8)).tolist()  # (q - 128) * 0.5, then relu
    [0.0, 0.0, 1.5]
    """

    def __init__(self, values: torch.Tensor, in_qp: ActQParams, backend: str):
        super().__init__(backend)
        if values.shape != (256,):
            raise ValueError(f"an Int8Lookup table has 256 entries, got shape {tuple(values.shape)}")
        self.register_buffer("values", values.detach().float().clone())
        self.in_qp = in_qp
        self.out_qp: ActQParams | None = None
        self._codes: tuple[tuple, torch.Tensor] | None = None  # ((out_qp, device), values requantized)

    @classmethod
    def from_function(cls, fn: Callable, args: tuple, kwargs: dict, in_qp: ActQParams, backend: str,
                      device: torch.device) -> "Int8Lookup":
        """The table of ``fn(x, *args, **kwargs)`` over the dequantized codes, computed on ``device`` (the
        fake-quant model's, so that the same kernels compute the same values)."""
        bits = torch.arange(256, dtype=torch.uint8, device=device)  # entry i: the code whose 8 bits are i
        with torch.no_grad():
            values = fn(dequantize_activation(bits.view(in_qp.dtype), in_qp), *args, **kwargs)
        return cls(values, in_qp, backend)

    def table(self) -> torch.Tensor:
        """The float values, or their codes on out_qp (computed once per out_qp and device)."""
        if self.out_qp is None:
            return self.values
        key = (self.out_qp, self.values.device)
        if self._codes is None or self._codes[0] != key:
            self._codes = (key, quantize_activation(self.values, self.out_qp))
        return self._codes[1]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.backend.lookup(t, self.in_qp, self.table(), self.out_qp)

    def __getstate__(self):
        state = super().__getstate__()
        state["_codes"] = None
        return state

    def extra_repr(self) -> str:
        return f"in={self.in_qp}, out={self.out_qp}, {self.backend_name}"


class KeepGrid(BackendModule):
    """A grid-preserving float op (max-pool, ReLU, zero padding) applied to an int8 tensor: dequantize, apply,
    quantize onto the same grid. Exact, because the op maps grid values to grid values."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, qp: ActQParams, backend: str):
        super().__init__(backend)
        self.fn, self.args, self.kwargs, self.qp = fn, args, kwargs, qp

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        out = self.backend.grid_op(self.fn, t, self.args, self.kwargs)  # None: the backend cannot do it natively
        if out is not None:
            return out
        x = self.backend.dequantize(t, self.qp)
        return self.backend.quantize(self.fn(x, *self.args, **self.kwargs), self.qp)
