"""Optimizers and learning-rate schedules, chosen by name from tables.

Parameters of fake-quantizers (learned ranges: LSQ scale / zero point, PACT alpha) form their own group
with their own learning rate and no weight decay by default; the schedule scales every group alike.

    >>> from qat.quant import LearnableFakeQuantize, MinMaxObserver, QuantSpec
    >>> quantizer = LearnableFakeQuantize(QuantSpec(), MinMaxObserver(QuantSpec()))
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), quantizer)
    >>> groups = parameter_groups(net, OptimizerSettings(lr=0.1, quantizer_lr=0.01))
    >>> [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
    [('weights', 2, 0.1, 0.0005), ('quantizers', 1, 0.01, 0.0)]
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from qat.quant.fake_quantize import QuantizerBase
from qat.train.settings import OptimizerSettings, SchedulerSettings


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters owned by fake-quantizer modules (each once, in module order)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, QuantizerBase):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def parameter_groups(model: nn.Module, settings: OptimizerSettings) -> list[dict]:
    """[weights group, quantizers group] of trainable parameters; empty groups are left out."""
    quantizer_ids = {id(p) for p in quantizer_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in trainable if id(p) not in quantizer_ids]
    quantizers = [p for p in trainable if id(p) in quantizer_ids]
    groups = [
        {"name": "weights", "params": weights, "lr": settings.lr, "weight_decay": settings.weight_decay},
        {
            "name": "quantizers",
            "params": quantizers,
            "lr": settings.quantizer_lr if settings.quantizer_lr is not None else settings.lr,
            "weight_decay": settings.quantizer_weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]


OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerSettings], torch.optim.Optimizer]] = {
    "sgd": lambda groups, s: torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov),
    "adamw": lambda groups, s: torch.optim.AdamW(groups, lr=s.lr, betas=s.betas),
}


def build_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    return OPTIMIZERS[settings.name](parameter_groups(model, settings), settings)


def _onecycle(optimizer, s: SchedulerSettings, total_steps: int, steps_per_epoch: int):
    # OneCycleLR divides by zero when the warm-up is exactly one step (pct_start * total_steps == 1).
    pct_start = 0.0 if float(s.pct_start * total_steps) == 1.0 else s.pct_start
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=s.div_factor,
        final_div_factor=s.final_div_factor,
    )


def _cosine(optimizer, s: SchedulerSettings, total_steps: int, steps_per_epoch: int):
    """Linear warm-up over warmup_epochs, then cosine decay of every group's lr to min_lr."""
    warmup = min(round(s.warmup_epochs * steps_per_epoch), total_steps - 1)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def factor(group: int) -> Callable[[int], float]:
        floor = min(s.min_lr / base_lrs[group], 1.0)

        def at(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return at

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(i) for i in range(len(base_lrs))])


SCHEDULERS = {"onecycle": _onecycle, "cosine": _cosine}


def build_scheduler(optimizer, settings: SchedulerSettings, total_steps: int, steps_per_epoch: int):
    """A per-step LR scheduler, or None for a constant learning rate (name 'none')."""
    if settings.name == "none":
        return None
    if total_steps < 1:
        raise ValueError(f"scheduler {settings.name!r} needs at least one training step, got {total_steps}")
    return SCHEDULERS[settings.name](optimizer, settings, total_steps, max(steps_per_epoch, 1))
