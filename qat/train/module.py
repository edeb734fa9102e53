"""LitClassifier: cross-entropy training of any classifier, float or already prepared for QAT.

The network is handed over ready-made (`qat.prepare` runs before Trainer.fit), so this module knows nothing
of quantization beyond two things: quantizer parameters get their own optimizer group (see
:mod:`qat.train.optim`), and observers are paused while validating or testing, so held-out data never
moves a quantization range (their enabled/disabled switches are restored right after each step).

    >>> lit = LitClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10)), num_classes=10)
    >>> lit(torch.randn(4, 3, 2, 2)).shape
    torch.Size([4, 10])
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from qat.quant.fake_quantize import QuantizerBase
from qat.train.optim import build_optimizer, build_scheduler
from qat.train.settings import DistillSettings, OptimizerSettings, SchedulerSettings

DEFAULT_OPTIMIZER = OptimizerSettings()
CONSTANT_LR = SchedulerSettings(name="none")
NO_DISTILLATION = DistillSettings()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened distributions, averaged over the batch (Hinton et al.).

    >>> logits = torch.randn(4, 10)
    >>> distillation_loss(logits, logits, 4.0).abs().item() < 1e-6
    True
    """
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


@contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Observers record nothing inside the block; each quantizer's switch is restored afterwards."""
    quantizers = [m for m in model.modules() if isinstance(m, QuantizerBase) and m.observer_enabled]
    for q in quantizers:
        q.observer_enabled = False  # the flag itself: no qparam settling, as nothing new was observed
    try:
        yield
    finally:
        for q in quantizers:
            q.observer_enabled = True


@contextmanager
def one_graph_under_ddp() -> Iterator[None]:
    """dynamo's DDPOptimizer off inside the block (dynamo reads the flag whenever it compiles a frame). Under DDP
    it would split a compiled step at gradient-bucket boundaries, and with calibrated quantizers (buffers updated
    in place) the split graphs' backward fails ("modified by an inplace operation"). One graph instead: DDP's
    reducer syncs the gradients after the backward. About 4 us per step (`torch._dynamo.config.patch`: ~80)."""
    config = torch._dynamo.config
    previous, config.optimize_ddp = config.optimize_ddp, False
    try:
        yield
    finally:
        config.optimize_ddp = previous


class LitClassifier(L.LightningModule):
    """Logs train/loss, train/acc1 (train/kd when distilling), val|test/{loss, acc1, acc5} and each group's lr
    (lr/<group name>, at the steps Lightning writes: every `trainer.log_every_n_steps`).

    teacher: a float model distilled into `net` with `distill` (alpha > 0); frozen and kept in eval mode.
    compile_mode: None (eager), or a torch.compile mode ("default", "reduce-overhead", "max-autotune"): training
    steps call `net`'s forward under torch.compile in that mode (compiled on the first step, and again when a
    callback flips a quantizer switch); validation and test run it eagerly. Every compiled step starts a new
    CUDA-graph generation (the previous step's graph outputs are done with). The compiled function is a plain
    attribute, so the state dict and checkpoints keep `net`'s own keys.
    memory_format: the layout of image batches and of the networks' 4-d weights while fitting (channels_last: NHWC,
    which GPU convolutions prefer under bf16); `net` is contiguous again when fitting ends.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerSettings = DEFAULT_OPTIMIZER,
        scheduler: SchedulerSettings = CONSTANT_LR,
        teacher: nn.Module | None = None,
        distill: DistillSettings = NO_DISTILLATION,
        compile_mode: str | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        super().__init__()
        self.net = net
        self.compile_mode = compile_mode
        self.memory_format = memory_format
        self._compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.teacher = teacher  # frozen, always in eval mode; not in the optimizer
        if teacher is not None:
            teacher.requires_grad_(False)
        self.distill = distill
        self.optimizer_settings, self.scheduler_settings = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss()
        top5 = min(5, num_classes)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("val", "test")
            for name, k in (("acc1", 1), ("acc5", top5))
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _training_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compile_mode is None:
            return self.net(x)
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.net.forward, mode=self.compile_mode)
        torch.compiler.cudagraph_mark_step_begin()
        with one_graph_under_ddp():
            return self._compiled_forward(x)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in `memory_format` (no copy where it already is)."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = self._images(batch[0]), batch[1]
        logits = self._training_forward(x)
        loss = self.criterion(logits, y)
        if self.teacher is not None and self.distill.alpha > 0:
            with torch.no_grad():
                teacher_logits = self.teacher.eval()(x)
            kd = distillation_loss(logits, teacher_logits, self.distill.temperature)
            self.log("train/kd", kd)
            loss = (1 - self.distill.alpha) * loss + self.distill.alpha * kd
        self.train_acc1.update(logits, y)  # not forward: it computes a batch value (logged per epoch only)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = self._images(batch[0]), batch[1]
        with observers_paused(self.net):
            logits = self.net(x)
        self.log(f"{stage}/loss", self.criterion(logits, y), sync_dist=True, prog_bar=stage == "val")
        for name in ("acc1", "acc5"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(logits, y)
            self.log(f"{stage}/{name}", metric, prog_bar=stage == "val" and name == "acc1")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the strategy wraps the net: DDP sizes its gradient buckets to these layouts
            self._set_memory_format(self.memory_format)

    def on_fit_end(self) -> None:
        self._set_memory_format(torch.contiguous_format)

    def _set_memory_format(self, memory_format: torch.memory_format) -> None:
        for net in (self.net, self.teacher):
            if net is not None:
                net.to(memory_format=memory_format)  # in place: the optimizer keeps its parameters

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if not self.trainer._logger_connector.should_update_logs:  # Lightning writes step values only then (its
            return  # LearningRateMonitor asks the same); a self.log call costs about a tenth of a tiny net's step
        for group in self.optimizers().param_groups:
            self.log(f"lr/{group.get('name', 'group')}", group["lr"], on_step=True, on_epoch=False)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.net, self.optimizer_settings)
        steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(steps // max(self.trainer.max_epochs or 1, 1), 1)
        scheduler = build_scheduler(optimizer, self.scheduler_settings, steps, steps_per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
