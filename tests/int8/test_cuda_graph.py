"""capture_cuda_graph: replaying the captured int8 forward gives the eager int8 output, for new inputs too;
a mismatched input or a CPU example is refused with a clear error."""
import gc
import weakref

import pytest
import torch
import torchvision

from qat.fx import QuantConfig, calibrate, prepare
from qat.int8 import capture_cuda_graph, convert


def test_cpu_example_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA example input"):
        capture_cuda_graph(torch.nn.Identity(), torch.randn(1, 3))


@pytest.mark.gpu
def test_replay_equals_eager_int8():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    calibration = [torch.randn(8, 3, 64, 64, device="cuda")]
    prepared = prepare(model, QuantConfig.preset("w8a8"), (calibration[0],))
    calibrate(prepared, calibration)
    int8 = convert(prepared.eval(), backend="cuda")
    run = capture_cuda_graph(int8, torch.randn(1, 3, 64, 64, device="cuda"))
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 3, 64, 64, device="cuda")
            assert torch.equal(run(x), int8(x))
    with pytest.raises(ValueError, match="captured for inputs of shape"):
        run(torch.randn(2, 3, 64, 64, device="cuda"))


@pytest.mark.gpu
def test_replay_holds_the_module_it_reads():
    """The graph reads the module's weights at their addresses: the captured forward keeps the module alive
    after the caller lets go of it, and still computes its output once other tensors take freed memory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3)).cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = model(x)
    run = capture_cuda_graph(model, x)
    held = weakref.ref(model)
    del model
    gc.collect()
    assert held() is not None
    filler = [torch.full((4096,), float("nan"), device="cuda") for _ in range(256)]
    assert torch.equal(run(x), expected) and len(filler) == 256
