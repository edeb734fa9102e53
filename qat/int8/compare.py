"""Per-layer agreement between a fake-quant model and its int8 conversion: SQNR and max error in LSB.

Every activation quantizer of the prepared model names a value; the int8 model records which of its nodes
carries that value. Both models run on the same batches and the values are compared in float.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

from qat.fx.rewrite import activation_quantizer_name, is_activation_quantizer_call, undo_training_fusions
from qat.kernels import get_backend


@dataclass(frozen=True)
class LayerAgreement:
    name: str
    sqnr_db: float  # 10 log10(|ref|^2 / |ref - int8|^2); inf when identical
    max_error_lsb: float  # max |ref - int8| / scale
    within_1_lsb: float  # fraction of elements within 1 LSB


def _record(gm: fx.GraphModule, wanted: set[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                seen[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


def layer_agreement(prepared: fx.GraphModule, int8: fx.GraphModule, batches: Iterable) -> list[LayerAgreement]:
    """Agreement of every int8 value with its fake-quant counterpart, accumulated over `batches`."""
    backend = get_backend(int8.qat_backend)
    prepared = copy.deepcopy(prepared)
    undo_training_fusions(prepared)  # one node per quantizer, its value recorded
    fq_nodes = {activation_quantizer_name(n): n.name for n in prepared.graph.nodes if is_activation_quantizer_call(n)}
    pairs = {q: (fq_nodes[q], node) for q, node in int8.qat_value_map.items() if q in fq_nodes}
    stats = {q: [0.0, 0.0, 0.0, 0, 0] for q in pairs}  # signal, noise, max lsb, within, count
    prepared.eval()
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        ref = _record(prepared, {a for a, _ in pairs.values()}, x)
        out = _record(int8, {b for _, b in pairs.values()}, x)
        for q, (a, b) in pairs.items():
            qp = int8.qat_grids[b]
            r, o = ref[a].float(), backend.dequantize(out[b], qp)
            err = (r - o).abs() / qp.scale
            s = stats[q]
            s[0] += r.pow(2).sum().item()
            s[1] += (r - o).pow(2).sum().item()
            s[2] = max(s[2], err.max().item())
            s[3] += (err <= 1.0 + 1e-3).sum().item()
            s[4] += err.numel()
    return [LayerAgreement(q, math.inf if s[1] == 0 else 10 * math.log10(max(s[0], 1e-30) / s[1]), s[2], s[3] / s[4])
            for q, s in stats.items()]


def compare(prepared: fx.GraphModule, int8: fx.GraphModule, batches: Iterable) -> str:
    """A printable table: per-layer SQNR, max error in LSB and the share of elements within 1 LSB."""
    rows = layer_agreement(prepared, int8, batches)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'value':<{width}}  {'SQNR dB':>8}  {'max LSB':>7}  {'<=1 LSB':>8}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.sqnr_db:>8.1f}  {r.max_error_lsb:>7.2f}  {100 * r.within_1_lsb:>7.3f}%")
    return "\n".join(lines)
