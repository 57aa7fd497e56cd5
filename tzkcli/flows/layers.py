"""Invertible layers of Glow, each a bijection with ``forward`` and ``inverse``.

Every layer maps a batch ``[B, C, H, W]`` and returns ``(output, ladj)`` in both directions,
where ``ladj`` of shape ``[B]`` is the log absolute determinant of that direction's Jacobian
(so ``inverse``'s ladj is minus ``forward``'s at the matching point). Layers keep the memory
format of their input where it is unambiguous, so a model moved to ``channels_last`` stays in it.

References: Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018;
Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP", 2017.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tzkcli.errors import UsageError
from tzkcli.flows import kernels
from tzkcli.flows.config import DEFAULT_SCALE_FLOOR

# The affine coupling scale is s = f + (1 - f) * sigmoid(raw + SCALE_OFFSET) in (f, 1), with
# f = GlowConfig.scale_floor; near 0.89 at initialisation for f = 0.05.
SCALE_OFFSET = 2.0
# The split prior's log standard deviation is LOG_SIGMA_BOUND * tanh(raw / LOG_SIGMA_BOUND):
# sigma in (e^-3, e^3) = (0.05, 20), the identity near 0 where it starts.
LOG_SIGMA_BOUND = 3.0
# Glow's parameterisation (Kingma and Dhariwal's code, ``logscale_factor``): actnorm's log
# scale and the log output gain of each coupling network are stored divided by this factor.
# Adam moves every parameter by about its learning rate per step, so these two move 3x as fast
# as the raw parameters would.
LOG_SCALE_FACTOR = 3.0


def _constant_ladj(value: Tensor, batch: int) -> Tensor:
    return value.expand(batch)


def is_channels_last(x: Tensor) -> bool:
    """Whether the 4-d ``x`` is channels_last and not also contiguous (a tensor with one
    channel, or 1x1 pixels, is both, so its layout says nothing)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def _like_format(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s memory format when ``x`` is unambiguously channels_last."""
    if is_channels_last(x):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _pointwise_affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``weight @ x[b, :, i, j] + bias`` at every pixel: a 1x1 convolution with a ``[C, C]``
    weight. On a channels_last ``x`` it runs as one matrix multiply over the pixels' rows, 1.2x
    to 2x as fast as oneDNN's 1x1 convolution at Glow's few channels (docs/benchmarks.md)."""
    batch, channels, height, width = x.shape
    if not is_channels_last(x):
        return F.conv2d(x, weight[:, :, None, None], bias)
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
    y = torch.addmm(bias, rows, weight.T)
    return y.view(batch, height, width, -1).permute(0, 3, 1, 2)


class ActNorm(nn.Module):
    """Per-channel affine normalisation ``y = x * exp(log_scale) + bias``.

    ``initialize(x)`` sets ``log_scale`` and ``bias`` so that ``y`` has zero mean and unit
    variance per channel on the batch ``x`` (data-dependent initialisation). Its state is the
    buffer ``initialised``, saved in the ``state_dict``: loading a saved state never
    re-initialises, and ``initialize`` on an initialised layer does nothing.

    The parameter is ``raw_log_scale = log_scale / LOG_SCALE_FACTOR`` (Glow's
    parameterisation; ``log_scale`` is a property), so Adam moves the log scale
    ``LOG_SCALE_FACTOR`` times as fast; docs/benchmarks.md has what that bought.

    ladj: ``H * W * sum(log_scale)`` per image.

    Raises:
        UsageError: ``forward`` or ``inverse`` before ``initialize`` (or loading an initialised
            state): an uninitialised actnorm is the identity and would train from a bad start.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        self.raw_log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialised", torch.tensor(False))
        # A Python mirror of the buffer, so the check costs no device synchronisation.
        self._ready = False

    @property
    def is_initialised(self) -> bool:
        return self._ready

    @property
    def log_scale(self) -> Tensor:
        return LOG_SCALE_FACTOR * self.raw_log_scale

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters from the per-channel mean and deviation of ``x`` (once)."""
        if self._ready:
            return

        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, correction=0)
        # A constant channel has no scale to learn from; keep it finite.
        log_scale = -torch.log(std.clamp_min(1e-6))
        self.raw_log_scale.copy_(log_scale / LOG_SCALE_FACTOR)
        self.bias.copy_(-mean * log_scale.exp())

        self.initialised.fill_(True)
        self._ready = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_initialised()
        y = x * self.log_scale.exp() + self.bias
        ladj = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, _constant_ladj(ladj, x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self.check_initialised()
        x = (y - self.bias) * torch.exp(-self.log_scale)
        ladj = -y.shape[2] * y.shape[3] * self.log_scale.sum()
        return x, _constant_ladj(ladj, y.shape[0])

    def check_initialised(self) -> None:
        if not self._ready:
            raise UsageError(
                "actnorm is not initialised: call initialize(x) on a first batch, "
                "or load a state_dict saved after initialisation"
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialised)


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution ``y = W x`` with ``W = P L (U + diag(sign * exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular
    (the LU parameterisation of Glow), initialised from a random rotation. ``sign`` is fixed,
    so ``W`` stays invertible for every value of the parameters.

    ladj: ``H * W * sum(log_s)`` per image.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        rotation = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)

        self.register_buffer("permutation", permutation.float())
        self.register_buffer("sign", torch.sign(diagonal).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(diagonal.abs().log().float())

    def factors(self) -> tuple[Tensor, Tensor]:
        """The triangular factors ``(L, U)`` with their diagonals in place."""
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """``W`` as a ``[C, C]`` matrix."""
        lower, upper = self.factors()
        return self.permutation @ (lower @ upper)

    def inverse_weight(self) -> Tensor:
        """``W^-1 = U^-1 L^-1 P^T`` by triangular solves, not a general inverse."""
        lower, upper = self.factors()
        eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return upper_inv @ lower_inv @ self.permutation.T

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])
        ladj = x.shape[2] * x.shape[3] * self.log_s.sum()
        return y, _constant_ladj(ladj, x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = F.conv2d(y, self.inverse_weight()[:, :, None, None])
        ladj = -y.shape[2] * y.shape[3] * self.log_s.sum()
        return x, _constant_ladj(ladj, y.shape[0])


class CouplingNetwork(nn.Sequential):
    """The network inside a coupling, the five layers of :func:`coupling_network`.

    With ``compute_dtype`` set (e.g. ``torch.bfloat16``, by ``tzk train --precision bf16``) the
    network runs under ``torch.autocast`` in that dtype and its output is cast back to the
    input's dtype, so the coupling's transform, its ladj and everything after it stay in the
    input's precision. ``None`` (the default) runs it in the input's dtype.

    In float32 on the CPU, inputs with few channels and big products (a Glow's first two
    levels on small gray images) take :mod:`tzkcli.flows.kernels`' fast path: the same function
    and gradients from other kernels. ``fast_path = False`` turns it off (to compare).
    """

    compute_dtype: torch.dtype | None = None
    fast_path: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if self.fast_path and self.compute_dtype is None and kernels.applies(
                x, self[0].out_channels):
            return self._fused(x)
        if self.compute_dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            h = super().forward(x)
        return h.to(x.dtype)

    def _fused(self, x: Tensor) -> Tensor:
        first, _, middle, _, last = self
        return kernels.FusedCouplingNetwork.apply(
            x, first.weight, first.bias, middle.weight, middle.bias, last.conv.weight,
            last.conv.bias, last.raw_log_gain, LOG_SCALE_FACTOR,
        )


class ZeroConv2d(nn.Module):
    """A 3x3 convolution that starts at zero, with a learned output gain per channel:
    ``conv(x) * exp(LOG_SCALE_FACTOR * raw_log_gain)`` (Glow's ``conv2d_zeros``). Weights,
    bias and ``raw_log_gain`` all start at zero, so the output does."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.raw_log_gain = nn.Parameter(torch.zeros(1, channels_out, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(LOG_SCALE_FACTOR * self.raw_log_gain)


def coupling_network(channels_in: int, hidden: int, channels_out: int) -> CouplingNetwork:
    """3x3 conv, ReLU, 1x1 conv, ReLU, zero-started 3x3 conv with an output gain
    (:class:`ZeroConv2d`), so a new coupling is the identity (additive) or a fixed scale."""
    return CouplingNetwork(
        nn.Conv2d(channels_in, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        ZeroConv2d(hidden, channels_out),
    )


class AffineCoupling(nn.Module):
    """Affine coupling with a scale bounded on both sides.

    The input splits by channel into ``(x_a, x_b)``, ``x_a`` the first ``C // 2`` channels.
    ``(t, h) = net(x_a)``, ``s = f + (1 - f) * sigmoid(h + 2)`` in ``(f, 1)`` with the floor
    ``f = scale_floor`` in ``[0, 1)``, and ``y = (x_a, (x_b - t) * s)``. ladj: ``sum(log s)``
    per image. The network's last convolution starts at zero, so a new coupling is a fixed scale
    ``f + (1 - f) * sigmoid(2)``.

    Towards the latents the scale multiplies (Glow's and normflows' direction), so ``r`` and
    the loss depend on ``h`` through the bounded ``s``, never through ``1 / s``: dividing
    there makes ``r`` grow like ``exp(-h)`` and trains in spikes (to NaN with a flat prior).
    The inverse ``x_b = y_b / s + t`` divides by at most ``1 / f``, where the unfloored
    ``1 / sigmoid(h + 2)`` overflows for large negative ``h`` (non-finite samples). Nothing
    is clamped in either direction. A floor near 1 leaves each coupling little contraction
    (at most ``1 / f``); the rest must come from actnorm and the 1x1 convolutions, which treat
    every pixel alike.
    """

    def __init__(self, channels: int, hidden: int,
                 scale_floor: float = DEFAULT_SCALE_FLOOR) -> None:
        super().__init__()

        self.kept = channels // 2
        self.scale_floor = scale_floor
        self.net = coupling_network(self.kept, hidden, 2 * (channels - self.kept))

    def _shift_and_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(x_a).chunk(2, dim=1)
        floor = self.scale_floor
        return shift, floor + (1.0 - floor) * torch.sigmoid(raw + SCALE_OFFSET)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.kept], x[:, self.kept :]
        shift, scale = self._shift_and_scale(x_a)
        y_b = (x_b - shift) * scale
        return torch.cat([x_a, y_b], dim=1), scale.log().sum(dim=(1, 2, 3))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b = y[:, : self.kept], y[:, self.kept :]
        shift, scale = self._shift_and_scale(y_a)
        x_b = y_b / scale + shift
        return torch.cat([y_a, x_b], dim=1), -scale.log().sum(dim=(1, 2, 3))


class AdditiveCoupling(nn.Module):
    """Additive coupling ``y = (x_a, x_b + net(x_a))``: volume preserving, ladj 0."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()

        self.kept = channels // 2
        self.net = coupling_network(self.kept, hidden, channels - self.kept)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.kept], x[:, self.kept :]
        y = torch.cat([x_a, x_b + self.net(x_a)], dim=1)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b = y[:, : self.kept], y[:, self.kept :]
        x = torch.cat([y_a, y_b - self.net(y_a)], dim=1)
        return x, y.new_zeros(y.shape[0])


class Squeeze(nn.Module):
    """Space to channels: ``[B, C, H, W] -> [B, 4C, H/2, W/2]``; a permutation, ladj 0.

    Output channel ``4c + 2i + j`` holds input channel ``c`` at offset ``(i, j)`` of each 2x2
    block.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, C, H/2, i, W/2, j]
        y = y.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return _like_format(y, x), x.new_zeros(b)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = y.shape
        x = y.reshape(b, c // 4, 2, 2, h, w)  # [B, C, i, j, H/2, W/2]
        x = x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
        return _like_format(x, y), y.new_zeros(b)


class Split(nn.Module):
    """Split off half the channels as a latent, standardised by Glow's learned split prior.

    ``x = (h, z)`` by channel, ``h`` the first ``C // 2`` channels (kept for the next level).
    The split prior ``p_0(z | h) = N(mu(h), sigma(h)^2)`` comes from a zero-initialised 3x3
    convolution of ``h``, ``(mu, u) = conv(h)``, with ``log sigma = B tanh(u / B)`` bounded
    by ``B = LOG_SIGMA_BOUND = 3``; the output is ``(h, r)`` with the standardised residual
    ``r = (z - mu) / sigma``, standard normal under ``p_0``. ladj: ``-sum(log sigma)``.

    The bound is for training: ``sigma`` is a function of the data, and an unbounded
    ``1 / sigma(h)`` lets one batch's ``h`` blow ``r`` and the gradients up (Adam at 1e-3
    then spikes). It also bounds the inverse: ``z = mu + r sigma`` scales ``r`` by at most
    ``e^3``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        self.kept = channels // 2
        self.prior = nn.Conv2d(self.kept, 2 * (channels - self.kept), 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def _mean_and_log_sigma(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.prior(h).chunk(2, dim=1)
        return mean, LOG_SIGMA_BOUND * torch.tanh(raw / LOG_SIGMA_BOUND)

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        h, z = x[:, : self.kept], x[:, self.kept :]
        mean, log_sigma = self._mean_and_log_sigma(h)
        r = (z - mean) * torch.exp(-log_sigma)
        return (h, r), -log_sigma.sum(dim=(1, 2, 3))

    def inverse(self, y: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, r = y
        mean, log_sigma = self._mean_and_log_sigma(h)
        z = mean + r * log_sigma.exp()
        return torch.cat([h, z], dim=1), log_sigma.sum(dim=(1, 2, 3))


class Standardize(nn.Module):
    """Glow's learned top prior ``N(mu, sigma^2)`` per dimension, as ``r = (z - mu) / sigma``.

    ``mu`` and ``log sigma`` have shape ``[1, C, H, W]`` and start at zero. ladj:
    ``-sum(log sigma)``.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()

        self.mean = nn.Parameter(torch.zeros(1, *shape))
        self.log_sigma = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r = (z - self.mean) * torch.exp(-self.log_sigma)
        return r, _constant_ladj(-self.log_sigma.sum(), z.shape[0])

    def inverse(self, r: Tensor) -> tuple[Tensor, Tensor]:
        z = self.mean + r * self.log_sigma.exp()
        return _like_format(z, r), _constant_ladj(self.log_sigma.sum(), r.shape[0])


class FlowStep(nn.Module):
    """One step of Glow: actnorm, invertible 1x1 convolution, coupling.

    The actnorm and the 1x1 convolution are both affine per pixel, so the step runs them as
    one convolution ``W (s * x + b) = (W diag(s)) x + W b``, with ``W`` assembled from its LU
    factors once per call; the layers stay the parameterisation (and the state_dict), so the
    step equals their composition to rounding error. ladj: the sum of the three layers'.
    """

    def __init__(self, channels: int, hidden: int, coupling: str,
                 scale_floor: float = DEFAULT_SCALE_FLOOR) -> None:
        super().__init__()

        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        if coupling == "affine":
            self.coupling: nn.Module = AffineCoupling(channels, hidden, scale_floor)
        else:
            self.coupling = AdditiveCoupling(channels, hidden)

    def _constant_ladj(self, pixels: int) -> Tensor:
        return pixels * (self.actnorm.log_scale.sum() + self.invconv.log_s.sum())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.actnorm.check_initialised()
        weight = self.invconv.weight()
        scale = self.actnorm.log_scale.exp().flatten()
        bias = weight @ self.actnorm.bias.flatten()
        y = _pointwise_affine(x, weight * scale, bias)

        y, ladj_coupling = self.coupling(y)
        return y, ladj_coupling + self._constant_ladj(x.shape[2] * x.shape[3])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self.actnorm.check_initialised()
        x, ladj_coupling = self.coupling.inverse(y)

        # x = diag(1/s) (W^-1 x - b)
        inverse_scale = torch.exp(-self.actnorm.log_scale).flatten()
        weight = self.invconv.inverse_weight() * inverse_scale[:, None]
        bias = -self.actnorm.bias.flatten() * inverse_scale
        x = _pointwise_affine(x, weight, bias)
        return x, ladj_coupling - self._constant_ladj(y.shape[2] * y.shape[3])
