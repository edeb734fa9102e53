"""Helpers for the training-app tests: compose the real conf/ + recipes/ with Hydra's compose API."""
import os
from pathlib import Path

from hydra import compose, initialize_config_dir

from qat.train.recipes import recipe_files, register_recipes

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
RECIPES_DIR = REPO / "recipes"
RECIPES = tuple(recipe_files(RECIPES_DIR))
SHARED_DATA = Path(os.environ.get("QAT_SHARED_DATA", REPO.parent / "shared" / "data"))

# A run in seconds: synthetic data, one batch of everything, CPU, no loggers / progress bar / ONNX.
FAST = (
    "data=synthetic",
    "data.num_train=16",
    "data.num_val=8",
    "data.batch_size=8",
    "trainer.accelerator=cpu",
    "trainer.fast_dev_run=true",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "quant.calibration_batches=1",
    "evaluate.limit_batches=1",
    "evaluate.latency_batch_size=2",
    "evaluate.latency_iters=1",
    "export.onnx=false",
)


def compose_config(output_dir: Path, *overrides: str):
    """conf/train.yaml + overrides, with recipes registered and paths pointing at this checkout."""
    register_recipes(RECIPES_DIR)
    data_root = [] if "QAT_DATA_ROOT" in os.environ else [f"paths.data_root={SHARED_DATA}"]
    base = [f"paths.root_dir={REPO}", f"paths.output_dir={output_dir}", *data_root]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


def pretrained_overrides() -> list[str]:
    """Keep the recipe's pretrained checkpoint when the shared data is here, else start from scratch."""
    return [] if (SHARED_DATA / "pretrained").is_dir() else ["model.pretrained=null"]

