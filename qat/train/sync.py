"""Synchronise observer statistics and BatchNorm running statistics across DDP ranks.

DDP keeps parameters equal on every rank, but each rank's observers (and BatchNorm running statistics)
see only that rank's batches. Before qparams are read (validation, the end of an epoch, the end of
training), :func:`sync_quant_state` merges them, so every rank holds the same quantizer state and
converts to the same int8 model; :func:`assert_ranks_agree` checks that. Both are no-ops without an
initialised process group of more than one rank. Every merge is idempotent (syncing twice changes nothing).

Merges (by module type; subclasses use their closest base in the table):

    MinMaxObserver               min_val: MIN, max_val: MAX
    MovingAverageMinMaxObserver  min_val, max_val: mean
    HistogramObserver            span: MIN / MAX, histograms re-binned onto it, then mean; min/max as MinMax
    BatchNorm                    running_mean, running_var: mean

Quantizers whose observer is still enabled then recompute their qparams from the merged statistics.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from qat.quant.fake_quantize import FakeQuantize, LearnableFakeQuantize, QuantizerBase
from qat.quant.histogram import HistogramObserver
from qat.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer
from qat.quant.state import assign_


def world_size() -> int:
    """Ranks in the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> None:
    dist.all_reduce(tensor, op=op)


def _mean(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)  # gloo has no AVG
    tensor.div_(world_size())


def _sync_minmax(observer: Observer) -> None:
    _reduce(observer.min_val, dist.ReduceOp.MIN)
    _reduce(observer.max_val, dist.ReduceOp.MAX)


def _sync_moving_average(observer: Observer) -> None:
    _mean(observer.min_val)
    _mean(observer.max_val)


def _sync_histogram(observer: HistogramObserver) -> None:
    _sync_minmax(observer)
    old = observer.histograms()
    lo, hi = observer.hist_min.clone(), observer.hist_max.clone()
    _reduce(lo, dist.ReduceOp.MIN)
    _reduce(hi, dist.ReduceOp.MAX)
    lo, hi = lo.reshape(-1), hi.reshape(-1)  # (C,)
    changed = (lo != old.lo) | (hi != old.hi)  # (C,)
    counts = torch.where(changed[:, None], old.rebin(lo, hi).counts, old.counts)  # (C, bins)
    _mean(counts)
    assign_(observer.hist_min, lo.reshape(observer.hist_min.shape))
    assign_(observer.hist_max, hi.reshape(observer.hist_max.shape))
    assign_(observer.histogram, counts.reshape(observer.histogram.shape))


def _sync_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    if bn.running_mean is not None:
        _mean(bn.running_mean)
        _mean(bn.running_var)


SYNC_RULES: dict[type, Callable[[nn.Module], None]] = {
    MinMaxObserver: _sync_minmax,
    MovingAverageMinMaxObserver: _sync_moving_average,
    HistogramObserver: _sync_histogram,
    nn.modules.batchnorm._BatchNorm: _sync_batchnorm,
}

# How a quantizer with a live observer re-derives its qparams from (merged) statistics.
REFRESH_QPARAMS: dict[type, Callable[[QuantizerBase], None]] = {
    FakeQuantize: lambda q: q.calculate_qparams(),
    LearnableFakeQuantize: lambda q: q.reinitialize_from_observer(),
}


def _rule(table: dict[type, Callable], module: nn.Module) -> Callable | None:
    return next((table[k] for k in type(module).__mro__ if k in table), None)


@torch.no_grad()
def sync_quant_state(model: nn.Module) -> bool:
    """Merge observer and BatchNorm statistics across ranks (see the module docstring); False if single-rank."""
    if world_size() == 1:
        return False
    for module in model.modules():
        rule = _rule(SYNC_RULES, module)
        if rule is not None:
            rule(module)
            if isinstance(module, Observer):
                module.has_data = bool(torch.isfinite(module.min_val).all()) and module.min_val.numel() > 0
    for module in model.modules():
        refresh = _rule(REFRESH_QPARAMS, module)
        if refresh is not None and module.observer_enabled and module.observer.has_data:
            refresh(module)
    return True


def state_digest(model: nn.Module) -> dict[str, str]:
    """A short hash of every state_dict entry (tensor bytes, or the repr of extra state)."""
    digest = {}
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            digest[key] = hashlib.sha1(data + str((value.dtype, tuple(value.shape))).encode()).hexdigest()[:16]
        else:
            digest[key] = hashlib.sha1(repr(value).encode()).hexdigest()[:16]
    return digest


def assert_ranks_agree(model: nn.Module) -> bool:
    """Raise RuntimeError naming the state entries that differ between ranks; False if single-rank."""
    if world_size() == 1:
        return False
    digests: list[dict[str, str] | None] = [None] * world_size()
    dist.all_gather_object(digests, state_digest(model))
    differing = sorted({k for d in digests[1:] for k in set(d) | set(digests[0]) if d.get(k) != digests[0].get(k)})
    if differing:
        raise RuntimeError(
            f"DDP ranks hold different quantization state in {len(differing)} entries, e.g. {differing[:5]}; "
            "they would convert to different int8 models"
        )
    return True
