"""Observer and BatchNorm statistics merge across ranks (two gloo processes on CPU), and DDP runs end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from app_helpers import REPO

from qat.fx import QuantConfig, calibrate, prepare
from qat.models import build_model
from qat.quant.histogram import HistogramObserver
from qat.quant.observers import MinMaxObserver
from qat.train.sync import assert_ranks_agree, state_digest, sync_quant_state

PRESETS = ("w8a8", "w8a8_ptq")  # EMA activations + min-max weights; histogram activations

pytestmark = pytest.mark.usefixtures("one_thread")


def _rank_model(preset: str, rank: int) -> torch.nn.Module:
    """The same prepared ResNet-20 on every rank, observing rank-specific data in training mode."""
    torch.manual_seed(0)
    model = build_model("resnet20").train()
    prepared = prepare(model, QuantConfig.preset(preset), example_inputs=(torch.randn(2, 3, 32, 32),))
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randn(4, 3, 32, 32, generator=generator) * (1 + rank) for _ in range(2)]
    calibrate(prepared, batches, freeze=False)
    prepared.train()(batches[0])  # BatchNorm running statistics move with this rank's batch
    return prepared


def _worker(rank: int, world: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for preset in PRESETS:
            model = _rank_model(preset, rank)
            before = state_digest(model)
            local = {n: (m.min_val.clone(), m.max_val.clone()) for n, m in model.named_modules()
                     if isinstance(m, (MinMaxObserver, HistogramObserver))}
            assert sync_quant_state(model)
            assert sync_quant_state(model)  # idempotent
            assert assert_ranks_agree(model)
            merged = {n: (m.min_val, m.max_val) for n, m in model.named_modules() if n in local}
            results[(preset, rank)] = (before, state_digest(model), local, merged)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_merge_to_the_same_quantization_state(tmp_path):
    """Every rank observed different data; after the merge all state entries agree, min/max are global."""
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True, start_method="fork")
    for preset in PRESETS:
        before0, after0, local0, merged0 = results[(preset, 0)]
        before1, after1, local1, _ = results[(preset, 1)]
        assert before0 != before1 and after0 == after1, preset
        assert local0, preset
        for name, (lo0, hi0) in local0.items():
            lo1, hi1 = local1[name]
            assert torch.equal(merged0[name][0], torch.minimum(lo0, lo1)), (preset, name)
            assert torch.equal(merged0[name][1], torch.maximum(hi0, hi1)), (preset, name)


def test_single_process_sync_is_a_no_op():
    model = _rank_model("w8a8", 0)
    before = state_digest(model)
    assert not sync_quant_state(model) and not assert_ranks_agree(model)
    assert state_digest(model) == before


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("compile=true",), ("memory_format=channels_last",)],
                         ids=["eager", "compiled", "channels_last"])
def test_ddp_on_cpu_runs_and_ranks_agree(tmp_path, extra):
    """python train.py ... trainer.devices=2 trainer.strategy=ddp on CPU (gloo): two ranks, one summary; also
    with compiled training steps, and in channels_last (laid out before DDP sizes its gradient buckets, so the
    reducer copies no gradient: no stride-mismatch warning)."""
    command = [
        sys.executable, "train.py", "+recipe=qat_resnet", "data=synthetic", "data.num_train=64", "data.num_val=16",
        "data.batch_size=8", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "quant.calibration_batches=1", "quant.freeze_observer_epoch=1",
        "evaluate.limit_batches=1", "evaluate.latency_iters=1", "export.onnx=false", f"hydra.run.dir={tmp_path}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 ranks hold the same quantization state" in result.stdout + result.stderr
    assert "Grad strides do not match bucket view strides" not in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_trained"] == 2
    assert [v["name"] for v in summary["variants"]][-1] == "int8"
