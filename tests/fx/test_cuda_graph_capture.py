"""A QAT training step (forward, backward, SGD) can be captured in one CUDA graph and replayed: it never
synchronises with the host and its Python-side switches stay fixed after calibration. Replays compute
what eager steps compute: losses, weights, observer ranges, qparams, BN running statistics."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat

pytestmark = pytest.mark.gpu


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.body(y) + y)
        return self.head(y.mean((2, 3)))


def _step(model, optimizer, x, target):
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("preset", ["w8a8", "w4a4_lsq"])
def test_captured_qat_step_replays_like_eager_steps(preset):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (32,), device="cuda")
    net = _Net().cuda().to(memory_format=torch.channels_last)
    prepared = qat.prepare(net, qat.QuantConfig.preset(preset), (x[:2],))
    qat.calibrate(prepared, [x], freeze=preset != "w8a8")  # w8a8: observers keep updating in every step
    eager, graphed = copy.deepcopy(prepared).train(), copy.deepcopy(prepared).train()
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_graphed = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, cuDNN picks algorithms) off the capture stream
        for _ in range(2):
            opt_graphed.zero_grad(set_to_none=True)
            _step(graphed, opt_graphed, x, target)
    torch.cuda.current_stream().wait_stream(side)
    opt_graphed.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_graphed, x, target)

    eager_losses, graphed_losses = [], []
    for step in range(5):  # 2 warm-up steps, then the 3 steps the replays take (capturing runs nothing)
        opt_eager.zero_grad(set_to_none=True)
        loss = _step(eager, opt_eager, x, target).item()
        eager_losses += [loss] if step >= 2 else []
    for _ in range(3):
        graph.replay()
        graphed_losses.append(static_loss.item())
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-4)
    assert graphed_losses[-1] != graphed_losses[0]  # replays train: the weights moved
    eager_state, graphed_state = eager.state_dict(), graphed.state_dict()
    for name, value in eager_state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(graphed_state[name], value, rtol=1e-3, atol=1e-4, msg=name)
