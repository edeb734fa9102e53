"""Train, calibrate, convert and export one model: the command-line entry point.

    python train.py +recipe=qat_resnet                                  W8A8 QAT of the pretrained ResNet-20
    python train.py +recipe=ptq_resnet quant.observer=mse               post-training quantization
    python train.py -m +recipe=qat_resnet quant=w8a8,w4a4_lsq optimizer.lr=0.01,0.005    a sweep
    python train.py +recipe=qat_resnet trainer.devices=2 trainer.strategy=ddp           DDP

Configs live in conf/ (one group per constructor), named recipes in recipes/. Every run writes
summary.json, summary.png, checkpoints and logs into its Hydra run directory (outputs/<name>/runs/...).
"""
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qat.train import register_recipes, run

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("QAT_REPO_ROOT", str(ROOT))
register_recipes(ROOT / "recipes")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
