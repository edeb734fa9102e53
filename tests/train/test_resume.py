"""An interrupted QAT run resumed from its checkpoint ends with exactly the state of an uninterrupted run."""
import lightning as L
import pytest
import torch
from app_helpers import compose_config, pretrained_overrides

from qat.train import run

COMMON = (
    "+recipe=qat_resnet",
    "data=synthetic",
    "data.num_train=24",
    "data.num_val=8",
    "data.batch_size=8",
    "data.augment=true",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=3",
    "trainer.num_sanity_val_steps=0",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "quant.calibration_batches=1",
    "quant.freeze_bn_epoch=1",
    "evaluate.limit_batches=1",
    "evaluate.latency_iters=1",
    "evaluate.latency_batch_size=2",
    "export.artifact=false",
    "export.onnx=false",
)

# EMA observers live until epoch 2 (the resumed part freezes them); LSQ ranges learned from the start.
QUANT = {"w8a8": ("quant.freeze_observer_epoch=2",), "w8a8_lsq": ("quant=w8a8_lsq", "quant.observer=minmax")}

pytestmark = pytest.mark.usefixtures("one_thread")


class StopAfterEpochs(L.Callback):
    """Interrupt fit after `epochs` epochs (the checkpoint of the last one is written)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def final_checkpoint(run_dir):
    """The run's last checkpoint, read without unpickling code (it holds only tensors and plain data)."""
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("quant", QUANT)
def test_resumed_run_equals_uninterrupted_run(quant, tmp_path):
    overrides = (*COMMON, *QUANT[quant], *pretrained_overrides())
    run(compose_config(tmp_path / "full", *overrides))
    run(compose_config(tmp_path / "part", *overrides), callbacks=[StopAfterEpochs(2)])
    part = final_checkpoint(tmp_path / "part")
    assert part["epoch"] == 2  # completed epochs
    run(compose_config(tmp_path / "resumed", *overrides, f"ckpt_path={tmp_path / 'part/checkpoints/last.ckpt'}"))
    full, resumed = final_checkpoint(tmp_path / "full"), final_checkpoint(tmp_path / "resumed")
    assert full["epoch"] == resumed["epoch"] == 3 and full["global_step"] == resumed["global_step"]
    full_state, resumed_state = full["state_dict"], resumed["state_dict"]
    assert full_state.keys() == resumed_state.keys()
    differing = [k for k in full_state if not _same(full_state[k], resumed_state[k])]
    assert differing == []
    assert not _same(full_state, part["state_dict"])  # the last epoch did change the model


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b
