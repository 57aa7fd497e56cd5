"""The coupling network's CPU fast path computes the plain network's function and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.flows.helpers import perturb
from tzkcli.flows import Glow, GlowConfig, kernels
from tzkcli.flows.layers import LOG_SCALE_FACTOR, CouplingNetwork, coupling_network

CHANNELS_LAST = torch.channels_last


def _network(channels_in: int, hidden: int, channels_out: int,
             dtype: torch.dtype = torch.float32) -> CouplingNetwork:
    torch.manual_seed(0)
    network = coupling_network(channels_in, hidden, channels_out).to(dtype)
    perturb(network, scale=0.1)
    return network


def _plain(network: CouplingNetwork, x: Tensor) -> Tensor:
    return nn.Sequential.forward(network, x)


def _outputs_and_gradients(function, network: nn.Module, x: Tensor, grad_y: Tensor
                           ) -> list[Tensor]:
    x = x.detach().requires_grad_()
    y = function(x)
    return [y, *torch.autograd.grad(y, [x, *network.parameters()], grad_y)]


def _assert_close(fast: list[Tensor], plain: list[Tensor]) -> None:
    names = ["output", "grad x", "w1", "b1", "w2", "b2", "gain", "w3", "b3"]
    for name, a, b in zip(names, fast, plain, strict=True):
        assert a.shape == b.shape, name
        error = (a - b).abs().max() / b.abs().max()
        assert error < 1e-5, f"{name}: relative error {float(error):.2e}"


@pytest.mark.parametrize("block_rows", [kernels.BLOCK_ROWS, 7])
def test_the_backward_is_the_derivative_of_the_forward_in_float64(
        block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 60 pixels: one block, or eight blocks of 7 and a last one of 4.
    monkeypatch.setattr(kernels, "BLOCK_ROWS", block_rows)
    network = _network(3, 7, 4, torch.float64)
    first, _, middle, _, last = network
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64).to(memory_format=CHANNELS_LAST)
    inputs = (x.requires_grad_(), first.weight, first.bias, middle.weight, middle.bias,
              last.conv.weight, last.conv.bias, last.raw_log_gain)

    assert torch.autograd.gradcheck(
        lambda *a: kernels.FusedCouplingNetwork.apply(*a, LOG_SCALE_FACTOR), inputs
    )


@pytest.mark.parametrize("layout", ["channel slice of channels_last", "contiguous"])
def test_the_fast_path_equals_the_plain_network_in_float32(layout: str) -> None:
    network = _network(2, 64, 4).to(memory_format=CHANNELS_LAST)
    whole = torch.randn(32, 4, 16, 16)
    x = whole.to(memory_format=CHANNELS_LAST)[:, :2] if "slice" in layout else whole[:, :2]
    grad_y = torch.randn(32, 4, 16, 16)
    assert kernels.applies(x, 64)

    fast = _outputs_and_gradients(network, network, x, grad_y)
    plain = _outputs_and_gradients(lambda v: _plain(network, v), network, x, grad_y)

    _assert_close(fast, plain)
    assert fast[0].is_contiguous(memory_format=CHANNELS_LAST)


@pytest.mark.parametrize("block_rows", [1000, 4096, 100_000])
def test_the_blocked_backward_is_the_same_for_any_block(
        block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 4,096 pixels: five blocks of 1,000 (the last of 96), one block, or one partial block.
    monkeypatch.setattr(kernels, "BLOCK_ROWS", block_rows)
    network = _network(4, 128, 8).to(memory_format=CHANNELS_LAST)
    x = torch.randn(64, 4, 8, 8).to(memory_format=CHANNELS_LAST)
    grad_y = torch.randn(64, 8, 8, 8)
    assert kernels.applies(x, 128)  # a second level's network

    fast = _outputs_and_gradients(network, network, x, grad_y)
    plain = _outputs_and_gradients(lambda v: _plain(network, v), network, x, grad_y)

    _assert_close(fast, plain)


def test_the_fast_path_serves_only_thin_float32_cpu_inputs_with_big_products() -> None:
    assert kernels.applies(torch.zeros(16, 2, 16, 16), 128)  # 4,096 pixels x 128 channels
    assert kernels.applies(torch.zeros(64, 2, 16, 16), 48)  # 16,384 x 48
    assert kernels.applies(torch.zeros(64, 4, 8, 8), 128)  # a second level: 4,096 x 128
    assert not kernels.applies(torch.zeros(64, 4, 8, 8), 48)  # 4,096 x 48: too little
    assert not kernels.applies(torch.zeros(8, 2, 16, 16), 128)  # 2,048 x 128: too little
    assert not kernels.applies(torch.zeros(256, 2, 16, 16), 32)  # a narrow network
    assert not kernels.applies(torch.zeros(64, 6, 16, 16), 128)  # too many channels
    assert not kernels.applies(torch.zeros(16, 2, 16, 16, dtype=torch.float64), 128)
    assert not kernels.applies(torch.zeros(16, 2, 16, 16, dtype=torch.bfloat16), 128)


def test_a_network_runs_its_plain_path_when_told_or_under_another_precision() -> None:
    network = _network(2, 64, 4)
    x = torch.randn(32, 2, 16, 16)
    calls = []
    network.register_forward_hook(lambda *_: calls.append(1))
    network[0].register_forward_hook(lambda *_: calls.append("plain"))

    network(x)
    assert calls == [1]  # one autograd node: the first convolution module never ran

    network.fast_path = False
    network(x)
    assert calls[1:] == ["plain", 1]

    network.fast_path, network.compute_dtype = True, torch.bfloat16
    network(x)
    assert calls[3:] == ["plain", 1]


def test_a_glow_trains_the_same_with_and_without_the_fast_path() -> None:
    torch.manual_seed(0)
    glow = Glow(GlowConfig(shape=(1, 32, 32), levels=2, steps=2, hidden=64))
    glow = glow.to(memory_format=CHANNELS_LAST)
    x = torch.rand(32, 1, 32, 32)
    assert kernels.applies(torch.zeros(32, 2, 16, 16), 64)  # the first level's networks
    glow.initialize(x)
    perturb(glow, scale=0.05)

    results = []
    for fast in (True, False):
        for module in glow.modules():
            if isinstance(module, CouplingNetwork):
                module.fast_path = fast
        glow.zero_grad()
        r, ladj = glow(x)
        loss = sum(part.square().sum() for part in r) - ladj.sum()
        loss.backward()
        results.append([loss.detach(), *[p.grad.clone() for p in glow.parameters()]])

    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
