"""``--precision bf16``: only the coupling networks compute in bf16; the rest stays float32."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.training.conftest import TINY
from tzkcli.flows import Glow, GlowConfig
from tzkcli.flows.layers import CouplingNetwork, coupling_network
from tzkcli.training.metrics import read_metrics


def test_coupling_network_computes_in_bf16_and_returns_float32() -> None:
    torch.manual_seed(0)
    net = coupling_network(2, 8, 4)
    torch.nn.init.normal_(net[-1].conv.weight)
    x = torch.rand(3, 2, 4, 4)
    full = net(x)

    net.compute_dtype = torch.bfloat16
    half = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.nn.Sequential(*net)(x).float()

    assert half.dtype == torch.float32
    assert torch.equal(half, reference)
    assert not torch.equal(half, full)
    assert torch.allclose(half, full, atol=0.1 * float(full.detach().abs().max()))


def test_glow_ladj_and_residuals_stay_float32() -> None:
    torch.manual_seed(0)
    glow = Glow(GlowConfig(shape=(1, 8, 8), levels=2, steps=2, hidden=8))
    x = torch.rand(4, 1, 8, 8)
    glow.initialize(x)
    for module in glow.modules():
        if isinstance(module, CouplingNetwork):
            module.compute_dtype = torch.bfloat16
            torch.nn.init.normal_(module[-1].conv.weight, std=0.05)

    r, ladj = glow.forward(x)
    assert ladj.dtype == torch.float32 and all(level.dtype == torch.float32 for level in r)
    x_back, _ = glow.inverse(r)
    assert torch.allclose(x_back, x, atol=1e-4)


def test_train_with_bf16(tzk, small_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "bf16"
    result = tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "2",
                 "--precision", "bf16")

    assert result.code == 0, result.stderr
    train = [r for r in read_metrics(run) if r["type"] == "train"]
    assert len(train) == 2 and all(r["loss"] is not None for r in train)
