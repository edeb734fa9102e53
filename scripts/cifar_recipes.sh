#!/usr/bin/env bash
# The CIFAR-10 comparison of the training issue: every ResNet-20 recipe from the pretrained checkpoint with
# the same budget (the recipes' 15 epochs), one job per GPU (round-robin when there are fewer GPUs), then
# one table. PTQ runs quantize the float fine-tune's weights, once per activation observer.
#
#   scripts/cifar_recipes.sh RUNS_DIR [override ...]     e.g. scripts/cifar_recipes.sh runs/cifar data.num_workers=6
#
# Writes RUNS_DIR/<recipe>/ (Hydra run directories: summary.json, logs, checkpoints, artifacts),
# RUNS_DIR/<recipe>.log and RUNS_DIR/table.md + table.csv (scripts/gather_sweep.py).
set -uo pipefail
runs=${1:?usage: scripts/cifar_recipes.sh RUNS_DIR [override ...]}
shift
mkdir -p "$runs"
gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
common=(trainer.enable_progress_bar=false "$@")

train() {  # train GPU NAME RECIPE [override ...]: one run, logged to RUNS_DIR/NAME.log
    local gpu=$1 name=$2 recipe=$3
    shift 3
    CUDA_VISIBLE_DEVICES=$gpu python train.py "+recipe=$recipe" "hydra.run.dir=$runs/$name" "${common[@]}" "$@" \
        >"$runs/$name.log" 2>&1 && echo "done: $name" || echo "FAILED: $name (see $runs/$name.log)"
}

float_then_ptq() {  # the float fine-tune, then PTQ of its weights with each observer
    local gpu=$1
    train "$gpu" fp32_resnet fp32_resnet || return
    for observer in minmax percentile mse entropy; do
        train "$gpu" "ptq_resnet_$observer" ptq_resnet "quant.observer=$observer" \
            "model.pretrained=$runs/fp32_resnet/model_float.pt"
    done
}

float_then_ptq 0 &
train $((1 % gpus)) qat_resnet qat_resnet &
train $((2 % gpus)) qat_resnet_w4a4 qat_resnet_w4a4 &
train $((3 % gpus)) qat_resnet_w2a2 qat_resnet_w2a2 &
wait
python scripts/gather_sweep.py "$runs" --out "$runs/table"
