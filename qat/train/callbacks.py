"""Lightning callbacks of a QAT run. They only toggle modes or merge statistics; the model they act on was
prepared before Trainer.fit and stays an ordinary module (checkpoints and DDP see nothing special).

- QATSchedule: from epoch k the observers stop updating; from epoch m BatchNorm statistics freeze. The
  modes follow from the epoch number alone, so a resumed run sets them exactly as the original did.
- RNGStateCheckpoint: checkpoints the random generators, so a resumed run shuffles and augments as the
  uninterrupted run would have.
- SyncQuantState: merges observer / BatchNorm statistics across DDP ranks before validation, at each
  epoch end and at the end of training, then checks that every rank holds the same quantization state.
"""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from qat.fx import enable_observer, freeze_bn_stats
from qat.train.sync import assert_ranks_agree, sync_quant_state


def _net(pl_module: L.LightningModule) -> torch.nn.Module:
    return pl_module.net


class QATSchedule(L.Callback):
    """Freeze observers from epoch `freeze_observer_epoch` and BatchNorm statistics from `freeze_bn_epoch`
    (None: never). Only ever switches off: a mode frozen before training (e.g. by calibration) stays off."""

    def __init__(self, freeze_observer_epoch: int | None = None, freeze_bn_epoch: int | None = None):
        self.freeze_observer_epoch, self.freeze_bn_epoch = freeze_observer_epoch, freeze_bn_epoch

    def apply(self, model: torch.nn.Module, epoch: int) -> None:
        if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch:
            enable_observer(model, False)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            freeze_bn_stats(model, True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(_net(pl_module), trainer.current_epoch)


class RNGStateCheckpoint(L.Callback):
    """Save the random generators' states (torch CPU and CUDA, NumPy, Python) with every checkpoint and restore
    them on resume, so the resumed run draws the same shuffles and augmentations as an uninterrupted one.

    States are saved as tensors and plain numbers (checkpoints stay loadable with weights_only=True). The
    state is that of the process saving the checkpoint (rank 0 under DDP). DataLoader workers are seeded
    from it when their iterator is created; persistent workers keep their own streams across epochs, so
    an exact replay needs num_workers=0 or non-persistent workers.
    """

    def state_dict(self) -> dict:
        version, mt_state, gauss = random.getstate()
        _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
            "numpy_pos": int(np_pos),
            "numpy_gauss": (int(np_has_gauss), float(np_gauss)),
            "python": (version, list(mt_state), gauss),
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        has_gauss, gauss = state["numpy_gauss"]
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, gauss))
        version, mt_state, python_gauss = state["python"]
        random.setstate((version, tuple(mt_state), python_gauss))


class SyncQuantState(L.Callback):
    """Merge quantization statistics across DDP ranks (see qat.train.sync); single-process runs skip it."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync_quant_state(_net(pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync_quant_state(_net(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync_quant_state(_net(pl_module))
        if assert_ranks_agree(_net(pl_module)):
            rank_zero_info(f"all {trainer.world_size} ranks hold the same quantization state")
