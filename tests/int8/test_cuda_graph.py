"""capture_cuda_graph: replaying the captured int8 forward gives the eager int8 output, for new inputs too;
a mismatched input or a CPU example is refused with a clear error."""
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
