"""An interrupted QAT run resumed from its checkpoint ends with exactly the state of an uninterrupted run."""
import lightning as L
import pytest
import torch
from app_helpers import compose_config, pretrained_overrides

from qat.train import run
from qat.train.resume import check_fits
from qat.train.settings import ConfigError

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


@pytest.fixture(scope="module")
def w8a8_checkpoint(tmp_path_factory):
    """The last checkpoint of a one-epoch W8A8 run (the COMMON settings)."""
    run_dir = tmp_path_factory.mktemp("w8a8")
    run(compose_config(run_dir, *COMMON, *pretrained_overrides(), "trainer.max_epochs=1"))
    return run_dir / "checkpoints" / "last.ckpt"


def test_a_damaged_checkpoint_stops_the_run_before_any_work(w8a8_checkpoint, tmp_path, monkeypatch):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(w8a8_checkpoint.read_bytes()[:1000])  # truncated
    monkeypatch.setattr("qat.train.pipeline.build_datamodule", lambda cfg: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=rf"ckpt_path='{damaged}' is not a readable checkpoint \(not a zip"):
        run(compose_config(tmp_path / "run", *COMMON, *pretrained_overrides(), f"ckpt_path={damaged}"))


@pytest.mark.parametrize("overrides, differences", [
    (("quant=w4a4_lsq",), r"\d+ missing \(.*\); \d+ unexpected \(.*\)"),
    (("model=resnet32", "model.pretrained=null"), r"\d+ missing \(net\.layer1\.3\."),
    (("distill.alpha=0.5",), r"\d+ missing \(teacher\."),
])
def test_a_checkpoint_of_another_network_names_what_differs(w8a8_checkpoint, tmp_path, overrides, differences):
    """Another preset, model or distillation setting: a ConfigError naming the run's settings and the keys, where
    load_state_dict raised a KeyError (another preset) or listed every key."""
    with pytest.raises(ConfigError, match=rf"ckpt_path='{w8a8_checkpoint}' does not fit this run's network "
                                          rf"\(model=.*, quant.preset=.*, distill.alpha=.*\): {differences}"):
        run(compose_config(tmp_path, *COMMON, *pretrained_overrides(), *overrides, f"ckpt_path={w8a8_checkpoint}"))


def test_a_quantizer_of_another_kind_is_named(w8a8_checkpoint):
    """Same keys, other extra-state fields (an LSQ quantizer's `initialized`): named as another quantizer kind."""
    state = torch.load(w8a8_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    key = next(k for k, v in state.items() if isinstance(v, dict))
    module = torch.nn.Module()
    module.state_dict = lambda: {**state, key: {**state[key], "initialized": True}}
    with pytest.raises(ConfigError, match=rf"1 of another quantizer kind \({key} \["):
        check_fits(state, module, w8a8_checkpoint)


def test_reading_a_checkpoint_refuses_damage_and_leaves_code_objects_to_lightning(tmp_path):
    """Random bytes or an empty file: a ConfigError naming the file. A checkpoint that needs code to unpickle (here
    a Path among its hyperparameters): None, no check, Lightning reads it itself."""
    from pathlib import Path

    from qat.train.resume import read_checkpoint_state

    for name, data in (("random.ckpt", b"not a checkpoint" * 64), ("empty.ckpt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=rf"ckpt_path='{tmp_path / name}' is not a readable checkpoint"):
            read_checkpoint_state(tmp_path / name)
    code_objects = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"root": Path("/data")}}
    torch.save(code_objects, tmp_path / "code.ckpt")
    assert read_checkpoint_state(tmp_path / "code.ckpt") is None
    torch.save({"weights": {"w": torch.ones(2)}}, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="holds no Lightning state_dict"):
        read_checkpoint_state(tmp_path / "plain.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert read_checkpoint_state(tmp_path / "ok.ckpt")["w"].equal(torch.ones(2))
