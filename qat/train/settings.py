"""Plain, validated settings built from the Hydra config before any work starts.

Every field's type and allowed values are checked; a wrong value raises :class:`ConfigError` naming the
key and what is allowed. Only `data`, `trainer`, `logger` and `callbacks` stay Hydra `_target_` nodes
(instantiated at the edge, in :mod:`qat.train.pipeline`).

    >>> from omegaconf import OmegaConf
    >>> settings_from_dict(OptimizerSettings, {"name": "sgd", "lr": 0.1}, "optimizer").lr
    0.1
    >>> settings_from_dict(OptimizerSettings, {"name": "adam"}, "optimizer")
    Traceback (most recent call last):
    ...
    qat.train.settings.ConfigError: optimizer.name='adam' is invalid; allowed: sgd, adamw
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qat.fx.config import PRESETS, QuantConfig
from qat.kernels import BACKENDS
from qat.models import MODELS
from qat.quant.config import OBSERVERS

TASKS = ("fp32", "ptq", "qat")
OPTIMIZER_NAMES = ("sgd", "adamw")
SCHEDULER_NAMES = ("onecycle", "cosine", "none")
BACKEND_NAMES = ("auto", *BACKENDS)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
EDGE_KEYS = ("paths", "data", "trainer", "logger", "callbacks")  # instantiated with hydra.utils.instantiate


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the allowed values."""


def _choices(*allowed: str) -> dict:
    return {"allowed": tuple(allowed)}


def _check(predicate, description: str) -> dict:
    return {"check": (predicate, description)}


POSITIVE = _check(lambda v: v > 0, "a number > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "a number >= 0")
FRACTION = _check(lambda v: 0 < v < 1, "a number in (0, 1)")
UNIT_INTERVAL = _check(lambda v: 0 <= v <= 1, "a number in [0, 1]")


@dataclass(frozen=True)
class ModelSettings:
    """name: a qat.models registry entry; num_classes None: the data module's; pretrained: a state_dict file."""

    name: str = field(default="resnet20", metadata=_choices(*MODELS))
    num_classes: int | None = field(default=None, metadata=POSITIVE)
    pretrained: str | None = None


@dataclass(frozen=True)
class QuantSettings:
    """preset: a QuantConfig preset (None: float). observer: activation observer override (for learned
    presets, the observer that initialises them). Epochs: QAT mode switches (None: never)."""

    preset: str | None = field(default=None, metadata=_choices(*PRESETS))
    observer: str | None = field(default=None, metadata=_choices(*OBSERVERS))
    calibration_batches: int = field(default=16, metadata=NON_NEGATIVE)
    freeze_observer_epoch: int | None = field(default=None, metadata=NON_NEGATIVE)
    freeze_bn_epoch: int | None = field(default=None, metadata=NON_NEGATIVE)

    def quant_config(self) -> QuantConfig:
        """The preset, with the activation observer replaced when `observer` is set."""
        config = QuantConfig.preset(self.preset)
        if self.observer is None:
            return config

        def observed_by(cfg):
            return cfg.with_(**{"init_observer" if cfg.learnable else "range_method": self.observer})

        op_activation = config.op_activation and observed_by(config.op_activation)
        input_activation = config.input_activation and observed_by(config.input_activation)
        return config.with_(activation=observed_by(config.activation), op_activation=op_activation,
                            input_activation=input_activation)


@dataclass(frozen=True)
class OptimizerSettings:
    """Float weights use lr / weight_decay; learned quantizer ranges use quantizer_lr (None: lr) and
    quantizer_weight_decay. momentum / nesterov: SGD; betas: AdamW."""

    name: str = field(default="sgd", metadata=_choices(*OPTIMIZER_NAMES))
    lr: float = field(default=0.01, metadata=POSITIVE)
    weight_decay: float = field(default=5e-4, metadata=NON_NEGATIVE)
    momentum: float = field(default=0.9, metadata=NON_NEGATIVE)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    quantizer_lr: float | None = field(default=None, metadata=POSITIVE)
    quantizer_weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class SchedulerSettings:
    """onecycle: pct_start, div_factor, final_div_factor. cosine: warmup_epochs, min_lr. none: constant."""

    name: str = field(default="onecycle", metadata=_choices(*SCHEDULER_NAMES))
    pct_start: float = field(default=0.25, metadata=FRACTION)
    div_factor: float = field(default=25.0, metadata=POSITIVE)
    final_div_factor: float = field(default=1e4, metadata=POSITIVE)
    warmup_epochs: float = field(default=0.0, metadata=NON_NEGATIVE)
    min_lr: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation from the float model during QAT: loss = (1 - alpha) cross-entropy +
    alpha T^2 KL(teacher || student) of the logits at temperature T. alpha 0: off."""

    alpha: float = field(default=0.0, metadata=UNIT_INTERVAL)
    temperature: float = field(default=4.0, metadata=POSITIVE)


@dataclass(frozen=True)
class EvaluateSettings:
    limit_batches: int | None = field(default=None, metadata=POSITIVE)
    latency_batch_size: int = field(default=32, metadata=POSITIVE)
    latency_iters: int = field(default=20, metadata=POSITIVE)


@dataclass(frozen=True)
class ExportSettings:
    artifact: bool = True
    onnx: bool = True


@dataclass(frozen=True)
class RunSettings:
    name: str = "train"
    task: str = field(default="qat", metadata=_choices(*TASKS))
    seed: int = 0
    ckpt_path: str | None = None
    backend: str = field(default="auto", metadata=_choices(*BACKEND_NAMES))
    compile: bool = False  # training steps run the network under torch.compile
    compile_mode: str = field(default="default", metadata=_choices(*COMPILE_MODES))  # reduce-overhead: CUDA graphs
    memory_format: str = field(default="contiguous", metadata=_choices(*MEMORY_FORMATS))  # while fitting
    model: ModelSettings = ModelSettings()
    quant: QuantSettings = QuantSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    distill: DistillSettings = DistillSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    export: ExportSettings = ExportSettings()

    @property
    def quantized(self) -> bool:
        return self.task != "fp32"

    @property
    def trains(self) -> bool:
        return self.task != "ptq"


# Values of the `_target_` nodes that every data module / trainer takes, checked before instantiation.
EDGE_VALUES: dict[tuple[str, str], tuple[Any, dict]] = {
    ("data", "batch_size"): (int, POSITIVE),
    ("data", "num_workers"): (int, NON_NEGATIVE),
    ("trainer", "max_epochs"): (int | None, _check(lambda v: v >= -1, "an int >= -1 (-1: no limit)")),
    ("trainer", "devices"): (int | str, {}),
}


def run_settings(cfg: dict[str, Any]) -> RunSettings:
    """RunSettings from a resolved config dict (the edge keys are left to the caller), fully validated."""
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(RunSettings)} - set(EDGE_KEYS) - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; allowed: {_field_list(RunSettings)}, "
                          f"{', '.join(EDGE_KEYS)}")
    for (group, key), (hint, metadata) in EDGE_VALUES.items():
        if isinstance(cfg.get(group), dict) and key in cfg[group]:
            _validated(cfg[group][key], hint, metadata, f"{group}.{key}")
    run_cfg = {k: v for k, v in cfg.items() if k not in EDGE_KEYS and k != "hydra"}
    settings = settings_from_dict(RunSettings, run_cfg, "")
    _check_consistency(settings)
    return settings


def _check_consistency(s: RunSettings) -> None:
    if s.quantized and s.quant.preset is None:
        raise ConfigError(f"quant.preset=None is invalid for task={s.task}; allowed: {', '.join(PRESETS)}")
    if s.quantized and s.quant.calibration_batches < 1:
        raise ConfigError(f"quant.calibration_batches={s.quant.calibration_batches} is invalid for task={s.task}; "
                          "allowed: an int >= 1")
    if s.distill.alpha > 0 and s.task != "qat":
        raise ConfigError(f"distill.alpha={s.distill.alpha} is invalid for task={s.task} (the float model teaches "
                          "a quantized one); allowed: 0, or task=qat")
    if s.task == "ptq" and s.compile:
        raise ConfigError("compile=true is invalid for task=ptq (nothing is trained); allowed: false")
    if s.task == "ptq" and s.memory_format != "contiguous":
        raise ConfigError(f"memory_format={s.memory_format} is invalid for task=ptq (nothing is trained); "
                          "allowed: contiguous")
    if s.compile_mode != "default" and not s.compile:
        raise ConfigError(f"compile_mode={s.compile_mode} is invalid with compile=false (nothing is compiled); "
                          "allowed: default, or compile=true")
    if s.task == "ptq" and s.ckpt_path is not None:
        raise ConfigError("ckpt_path is invalid for task=ptq (nothing is trained); allowed: null")
    for key, path in (("model.pretrained", s.model.pretrained), ("ckpt_path", s.ckpt_path)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}={path!r} is invalid: no such file; allowed: an existing file or null")


def settings_from_dict(cls: type, values: dict[str, Any] | None, key: str):
    """Build dataclass `cls` from `values`, checking names, types and allowed values; errors name `key`."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{key}={values!r} is invalid; allowed: a mapping with keys {_field_list(cls)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(_join(key, u) for u in unknown)}; allowed: {_field_list(cls)}")
    hints = typing.get_type_hints(cls)
    built = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            built[f.name] = _validated(values[f.name], hints[f.name], f.metadata, _join(key, f.name))
    return cls(**built)


def _validated(value: Any, hint: Any, metadata: dict, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return settings_from_dict(hint, value, key)
    value = _coerced(value, hint, key)
    if value is None:
        return None
    allowed = metadata.get("allowed")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {', '.join(allowed)}")
    predicate, description = metadata.get("check", (None, None))
    if predicate is not None and not predicate(value):
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {description}")
    return value


def _coerced(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (int, float, bool, str, tuple[float, ...], optional variants)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}=None is invalid; allowed: {_describe(hint)}")
    for option in (o for o in options if o is not type(None)):
        converted = _convert(value, option)
        if converted is not None:
            return converted
    raise ConfigError(f"{key}={value!r} is invalid; allowed: {_describe(hint)}")


def _convert(value: Any, kind: Any) -> Any:
    """`value` converted to `kind`, or None when it is not of that kind (bools are never numbers)."""
    if typing.get_origin(kind) is tuple:
        item_type = typing.get_args(kind)[0]
        if isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(kind)):
            items = [_convert(v, item_type) for v in value]
            return tuple(items) if all(i is not None for i in items) else None
        return None
    if isinstance(value, bool):
        return value if kind is bool else None
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else None


def _describe(hint: Any) -> str:
    names = {bool: "true/false", int: "an int", float: "a number", str: "a string", type(None): "null"}
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join(names.get(o, "a list of numbers") for o in options)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _field_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))
