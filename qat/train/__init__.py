"""The training app (the only layer that imports Lightning and Hydra): `python train.py +recipe=NAME`.

    run(cfg)                   one run from a composed Hydra config (see qat.train.pipeline)
    register_recipes(folder)   make recipes/*.yaml the options of the `recipe` config group
    LitClassifier              the LightningModule; QATSchedule, RNGStateCheckpoint, SyncQuantState its callbacks
"""
from qat.train.callbacks import QATSchedule, RNGStateCheckpoint, SyncQuantState
from qat.train.module import LitClassifier, observers_paused
from qat.train.pipeline import run
from qat.train.recipes import register_recipes
from qat.train.settings import ConfigError, RunSettings
from qat.train.sync import assert_ranks_agree, sync_quant_state

__all__ = [
    "ConfigError",
    "LitClassifier",
    "QATSchedule",
    "RNGStateCheckpoint",
    "RunSettings",
    "SyncQuantState",
    "assert_ranks_agree",
    "observers_paused",
    "register_recipes",
    "run",
    "sync_quant_state",
]
