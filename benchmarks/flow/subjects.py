"""The two Glows the benchmark compares, each with its training loss in bits/dim."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tzkcli.flows import Glow, GlowConfig
from tzkcli.flows.layers import CouplingNetwork

SHAPE = (1, 32, 32)
DIMS = math.prod(SHAPE)
CLASSES = 10


def bpd(log_density: Tensor, n_bits: int = 8) -> Tensor:
    """Bits per dimension of a dequantised image from its continuous log-density."""
    return -(log_density - DIMS * math.log(2**n_bits)) / (DIMS * math.log(2))


def standard_normal_log_density(r: list[Tensor]) -> Tensor:
    squares = sum(part.square().flatten(1).sum(dim=1) for part in r)
    return -0.5 * squares - 0.5 * DIMS * math.log(2 * math.pi)


class TzkSubject:
    """tzk's Glow trained on bpd under its base prior ``p_0``."""

    def __init__(self, levels: int, steps: int, hidden: int, channels_last: bool,
                 bf16_networks: bool = False, fast_path: bool = True) -> None:
        self.name = "tzk channels_last" if channels_last else "tzk NCHW"
        self.model = Glow(GlowConfig(shape=SHAPE, levels=levels, steps=steps, hidden=hidden))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        networks = [m for m in self.model.modules() if isinstance(m, CouplingNetwork)]
        if bf16_networks:
            # What `tzk train --precision bf16` does: coupling networks under bf16 autocast.
            self.name += " + bf16 nets"
            for network in networks:
                network.compute_dtype = torch.bfloat16
        if not fast_path:
            # The coupling networks as plain oneDNN convolutions (tzkcli.flows.kernels).
            self.name += ", no fast path"
            for network in networks:
                network.fast_path = False

    def initialize(self, x: Tensor, y: Tensor) -> None:
        self.model.initialize(x)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        r, ladj = self.model(x)
        return bpd(standard_normal_log_density(r) + ladj).mean()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


class NormflowsSubject:
    """normflows 1.7.3's multi-scale Glow with a class-conditional diagonal Gaussian base."""

    name = "normflows"

    def __init__(self, levels: int, steps: int, hidden: int) -> None:
        import normflows as nf

        channels = SHAPE[0]
        q0, flows, merges = [], [], []
        for i in range(levels):
            level = [nf.flows.GlowBlock(channels * 2 ** (levels + 1 - i), hidden,
                                        split_mode="channel", scale=True)
                     for _ in range(steps)]
            flows.append(level + [nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                factor = 2 ** (levels - i)
                latent = (channels * factor, SHAPE[1] // factor, SHAPE[2] // factor)
            else:
                factor = 2**levels
                latent = (channels * 2 * factor, SHAPE[1] // factor, SHAPE[2] // factor)
            q0.append(nf.distributions.ClassCondDiagGaussian(latent, CLASSES))
        self.model = nf.MultiscaleFlow(q0, flows, merges)

    def initialize(self, x: Tensor, y: Tensor) -> None:
        # normflows initialises actnorm on the first batch it sees.
        with torch.no_grad():
            self.model.log_prob(x, y)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return bpd(self.model.log_prob(x, y)).mean()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())
