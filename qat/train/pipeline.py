"""One run, top to bottom: validate -> data -> model -> prepare/calibrate -> fit -> convert -> evaluate -> report.

    settings = validated(cfg)                          every value checked before any work (ConfigError)
    resumed  = read_checkpoint_state(ckpt_path)        a damaged checkpoint stops the run here; before fit,
                                                       check_fits names what differs from the run's network
    trainer  = build_trainer(cfg, settings)            Lightning Trainer, loggers, callbacks (fp32 / qat)
    data     = build_datamodule(cfg.data)              dataset located and loaded (clear error if missing)
    model    = build_model(...)                        float, optionally from a pretrained checkpoint
    net      = prepare(model) + calibrate(net)         ptq / qat: before Trainer.fit, never inside hooks
    trainer.fit(LitClassifier(net), data, ckpt_path)   fp32 / qat
    int8     = quantize_and_export(net)                convert, evaluate, export (+ ONNX)
    report:    summary.json, a printed table and summary.png in the run directory

Only rank 0 of a DDP run evaluates, converts and reports; the ranks agree on the quantization state
beforehand (see :mod:`qat.train.sync`).
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.int8 import convert
from qat.artifact import export
from qat.artifact.onnx import export_onnx
from qat.fx import calibrate, enable_observer, prepare
from qat.models import build_model
from qat.train.callbacks import QATSchedule, RNGStateCheckpoint, SyncQuantState
from qat.train.evaluate import VariantResult, measure
from qat.train.module import LitClassifier
from qat.train.report import RunSummary, plot_summary, print_table, write_summary
from qat.train.resume import check_fits, read_checkpoint_state
from qat.train.settings import MEMORY_FORMATS, ConfigError, RunSettings, run_settings


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> float | None:
    """Run the task of `cfg` and report; returns the final model's top-1 (%) on rank 0, else None.

    `callbacks` are added to the Trainer's (e.g. to stop a run early in a test).
    """
    settings = validated(cfg)
    resumed = read_checkpoint_state(settings.ckpt_path) if settings.ckpt_path else None  # damaged: stop before work
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(settings.seed, workers=True)
    trainer = build_trainer(cfg, settings, callbacks) if settings.trains else None
    datamodule = build_datamodule(cfg)
    num_classes = settings.model.num_classes or datamodule.num_classes
    float_model = build_model(settings.model.name, num_classes, settings.model.pretrained)
    example = torch.zeros(2, *datamodule.input_size)  # [2, C, H, W]: traces shapes for prepare and export
    device = compute_device(cfg)
    if (warning := compiled_layout_warning(settings, device)) is not None:
        rank_zero_warn(warning)
    start = time.perf_counter()
    net = prepared_model(float_model, settings, datamodule, example, device) if settings.quantized else float_model
    if trainer is not None:
        _log_config(trainer, cfg)
        teacher = copy.deepcopy(float_model).eval() if settings.distill.alpha > 0 else None
        lit = LitClassifier(net, num_classes, settings.optimizer, settings.scheduler, teacher, settings.distill,
                            compile_mode=settings.compile_mode if settings.compile else None,
                            memory_format=MEMORY_FORMATS[settings.memory_format])
        if resumed is not None:
            check_fits(resumed, lit, settings.ckpt_path, f"model={settings.model.name}, "
                       f"quant.preset={settings.quant.preset}, distill.alpha={settings.distill.alpha}")
            resumed = None  # Lightning reads the file itself
        trainer.fit(lit, datamodule=datamodule, ckpt_path=settings.ckpt_path)
        if not trainer.is_global_zero:
            return None
    seconds = time.perf_counter() - start
    variants, artifacts = evaluate_variants(float_model, net, settings, datamodule, example, device, run_dir)
    return report(summarize(settings, trainer, seconds, variants, artifacts), run_dir)


def validated(cfg: DictConfig) -> RunSettings:
    """The run settings, every value checked; a missing mandatory value (???) or an unresolvable
    interpolation is a ConfigError too."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing mandatory value(s) {', '.join(missing)}; set them, e.g. {missing[0]}=...")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # omegaconf raises several error types for bad interpolations
        raise ConfigError(f"config cannot be resolved: {err}") from err
    return run_settings(container)


def compute_device(cfg: DictConfig) -> torch.device:
    """Where float / fake-quant models calibrate and evaluate: this rank's GPU unless told to use the CPU."""
    if cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def compiled_layout_warning(settings: RunSettings, device: torch.device) -> str | None:
    """The one setup in which compiled QAT steps are known to fail: a GPU and the contiguous layout (README,
    "Known bug"); None for any other."""
    if not (settings.compile and settings.quantized and device.type == "cuda"
            and settings.memory_format == "contiguous"):
        return None
    return ("compile=true with memory_format=contiguous on a GPU: a compiled QAT ResNet-18 (32 px) failed in this "
            "layout at its first backward (inductor's stride check of convolution_backward); "
            "memory_format=channels_last is the layout tested on GPUs")


def resolve_backend(name: str) -> str:
    """The int8 backend: 'auto' is cuda when a GPU is visible, else fbgemm."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "fbgemm"


def _instantiate(node: DictConfig, key: str, **kwargs):
    """hydra.utils.instantiate with plain Python containers as arguments (checkpoints of objects that save
    their hyperparameters then load with weights_only=True); errors become ConfigErrors naming `key`."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except (InstantiationException, TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from err


def build_trainer(cfg: DictConfig, settings: RunSettings, extra: Sequence[L.Callback] = ()) -> L.Trainer:
    """lightning.Trainer from cfg.trainer with the configured loggers and callbacks plus the app's own."""
    progress = cfg.trainer.get("enable_progress_bar", True)
    configured = [_instantiate(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    configured = [c for c in configured if progress or not isinstance(c, ProgressBar)]
    app = [RNGStateCheckpoint()]
    if settings.quantized:
        app += [QATSchedule(settings.quant.freeze_observer_epoch, settings.quant.freeze_bn_epoch), SyncQuantState()]
    loggers = [_instantiate(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    return _instantiate(cfg.trainer, "trainer", callbacks=configured + app + list(extra), logger=loggers or False)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The configured DataModule, with its data located and loaded (a missing dataset fails here)."""
    datamodule = _instantiate(cfg.data, "data")
    missing = [name for name in ("num_classes", "input_size") if not hasattr(datamodule, name)]
    if missing:
        raise ConfigError(f"data: {type(datamodule).__name__} lacks {', '.join(missing)}; allowed: a DataModule "
                          "with num_classes and input_size (C, H, W), e.g. qat.train.data.CIFAR10DataModule")
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    return datamodule


def prepared_model(
    float_model: nn.Module, settings: RunSettings, datamodule: L.LightningDataModule, example: torch.Tensor,
    device: torch.device,
) -> nn.Module:
    """prepare + calibrate on training batches. PTQ and QAT with observers frozen from epoch 0 freeze the
    observers after calibration; otherwise they keep observing during training."""
    quant = settings.quant
    net = prepare(float_model.train(), quant.quant_config(), example_inputs=(example,)).to(device)
    freeze = settings.task == "ptq" or quant.freeze_observer_epoch == 0
    calibrate(net, datamodule.train_dataloader(), num_batches=quant.calibration_batches, freeze=freeze)
    return net.cpu()


def _log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def _overrides() -> tuple[str, ...]:
    return tuple(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ()


def evaluate_variants(
    float_model: nn.Module, net: nn.Module, settings: RunSettings, datamodule: L.LightningDataModule,
    example: torch.Tensor, device: torch.device, run_dir: Path,
) -> tuple[list[VariantResult], dict[str, str]]:
    """Float (when known: trained, or pretrained), fake-quant and int8 results on the test split."""
    e = settings.evaluate
    options = {"limit": e.limit_batches, "latency_batch_size": e.latency_batch_size, "latency_iters": e.latency_iters}
    test = datamodule.test_dataloader
    variants, artifacts = [], {}
    if settings.task == "fp32":
        artifacts["float"] = str(run_dir / "model_float.pt")  # plain state_dict: model.pretrained=... of a PTQ run
        torch.save(net.state_dict(), artifacts["float"])
        return [measure("float", net.to(device), test(), device, **options)], artifacts
    if settings.model.pretrained is not None:
        variants.append(measure("float", float_model.to(device), test(), device, **options))
    enable_observer(net, False)  # settles every observer's qparams for good
    variants.append(measure("fake_quant", net.to(device), test(), device, **options))
    with deterministic_warn_only():
        int8, int8_device, artifacts = quantize_and_export(net, settings, example, device, run_dir)
        size_from = Path(artifacts["int8"]) if "int8" in artifacts else None
        variants.append(measure("int8", int8, test(), int8_device, size_from=size_from, **options))
    return variants, artifacts


@contextmanager
def deterministic_warn_only() -> Iterator[None]:
    """With trainer.deterministic=true, torch refuses ops that lack a deterministic flag, among them the
    fbgemm quantized tensor resize used by int8 inference; inside this block such ops only warn."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def quantize_and_export(
    net: nn.Module, settings: RunSettings, example: torch.Tensor, device: torch.device, run_dir: Path
) -> tuple[nn.Module, torch.device, dict[str, str]]:
    """Convert the prepared model to int8 with the configured backend; export the int8 artifact and the
    ONNX QDQ model (from the same qparams) into `run_dir`, as configured.

    Returns the int8 model, the device it runs on (CPU for fbgemm, the GPU for cuda, `device` for the
    reference backend) and the written artifact paths by kind ('int8', 'onnx').
    """
    backend = resolve_backend(settings.backend)
    gpu = device if device.type == "cuda" else torch.device("cuda")
    int8_device = {"fbgemm": torch.device("cpu"), "cuda": gpu}.get(backend, device)
    int8 = convert(net.eval().to(int8_device), backend=backend)
    inputs = (example.to(int8_device),)
    artifacts = {}
    if settings.export.artifact:
        artifacts["int8"] = str(run_dir / "model_int8.qat")
        export(int8, artifacts["int8"], example_inputs=inputs)
    if settings.export.onnx:
        artifacts["onnx"] = export_onnx(net, run_dir / "model_int8.onnx", example_inputs=(example,))
    return int8, int8_device, artifacts


def summarize(
    settings: RunSettings, trainer: L.Trainer | None, seconds: float, variants: list[VariantResult],
    artifacts: dict[str, str],
) -> RunSummary:
    quant = settings.quant if settings.quantized else None
    return RunSummary(
        name=settings.name,
        task=settings.task,
        model=settings.model.name,
        quant_preset=quant and quant.preset,
        observer=quant and quant.observer,
        backend=resolve_backend(settings.backend) if quant else None,
        world_size=trainer.world_size if trainer is not None else 1,
        epochs_trained=trainer.current_epoch if trainer is not None else 0,
        train_seconds=round(seconds, 2),
        variants=tuple(variants),
        artifacts=artifacts,
        overrides=_overrides(),
    )


def report(summary: RunSummary, run_dir: Path) -> float:
    """Write summary.json and summary.png, print the table; returns the last variant's top-1."""
    write_summary(summary, run_dir)
    plot_summary(summary, run_dir / "summary.png")
    print_table(summary)
    return summary.variants[-1].top1
