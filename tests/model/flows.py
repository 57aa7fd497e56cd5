"""Small real flows that satisfy the flow contract, for tests that need a known map.

They are genuine bijections with exact ladj, not mocks: the identity (``r = [x]``,
``ladj = 0``), the identity that counts its forward passes, and a two-level flow (squeeze,
per-channel affine with a data-dependent start, split) whose state must survive save/load.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class IdentityFlow(nn.Module):
    """``r = [x]``, ``ladj = 0``: ``p_0`` is a standard normal on the pixels themselves."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()

        self.shape = shape
        self.latent_shapes = [shape]

    def initialize(self, x: Tensor) -> None:
        return None

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        return [x], x.new_zeros(x.shape[0])

    def inverse(self, r: list[Tensor]) -> tuple[Tensor, Tensor]:
        return r[0], r[0].new_zeros(r[0].shape[0])


class CountingFlow(IdentityFlow):
    """The identity flow, counting its forward passes in ``calls``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__(shape)

        self.calls = 0

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        self.calls += 1
        return super().forward(x)


class TwoLevelFlow(nn.Module):
    """Squeeze 2x2, a per-channel affine map started from the data, split half the channels.

    ``x [B, C, H, W] -> h [B, 4C, H/2, W/2] -> (r_1, r_2)``, two levels of ``2C`` channels;
    ``ladj = (H/2)(W/2) sum(log_scale)``. ``initialised`` is a saved buffer.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()

        channels, height, width = shape
        self.shape = shape
        self.latent_shapes = [(2 * channels, height // 2, width // 2)] * 2
        self.log_scale = nn.Parameter(torch.zeros(4 * channels))
        self.bias = nn.Parameter(torch.zeros(4 * channels))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if bool(self.initialised):
            return
        h = squeeze(x)
        std = h.std(dim=(0, 2, 3)).clamp(min=1e-3)
        self.log_scale.copy_(-torch.log(std))
        self.bias.copy_(-h.mean(dim=(0, 2, 3)) / std)
        self.initialised.fill_(True)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        h = squeeze(x) * self.log_scale.exp()[:, None, None] + self.bias[:, None, None]
        half = h.shape[1] // 2
        ladj = math.prod(h.shape[2:]) * self.log_scale.sum()
        return [h[:, :half], h[:, half:]], ladj.expand(x.shape[0])

    def inverse(self, r: list[Tensor]) -> tuple[Tensor, Tensor]:
        h = torch.cat(r, dim=1)
        h = (h - self.bias[:, None, None]) * torch.exp(-self.log_scale)[:, None, None]
        ladj = -math.prod(h.shape[2:]) * self.log_scale.sum()
        return unsqueeze(h), ladj.expand(h.shape[0])


def squeeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(h: Tensor) -> Tensor:
    b, c4, h2, w2 = h.shape
    h = h.reshape(b, c4 // 4, 2, 2, h2, w2)
    return h.permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h2, 2 * w2)
