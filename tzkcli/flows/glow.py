"""The multi-scale Glow, ending in Glow's learned prior as a standardisation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tzkcli.errors import BadInputError, UsageError
from tzkcli.flows.config import GlowConfig
from tzkcli.flows.layers import FlowStep, Split, Squeeze, Standardize, is_channels_last


class Glow(nn.Module):
    """A multi-scale Glow ``x -> r`` whose outputs are standardised residuals.

    Level ``i`` squeezes 2x2 space into channels and runs ``steps`` flow steps; every level
    but the last then splits off half its channels as ``z_i`` and standardises it by the split
    prior of the half it keeps, ``r_i = (z_i - mu_i(h_i)) / sigma_i(h_i)``; the last level
    standardises all of ``z_L`` by the learned top prior ``N(mu_0, sigma_0)``. Every
    ``-sum(log sigma_i)`` is part of ``ladj``, so the base prior's log-density is
    ``log p_0(x) = log N(r; 0, I) + ladj``, and any other prior is a density on ``r``.

    Inputs are float images ``[B, C, H, W]`` in ``[0, 1)`` (dequantised); the flow centres
    them at 0 first (a shift, no ladj). Call :meth:`initialize` on a first batch before
    training: ``forward`` and ``inverse`` raise :class:`~tzkcli.errors.UsageError` until
    actnorm is initialised, and a ``state_dict`` saved after initialisation loads initialised.

    Speed: on CPU, ``glow.to(memory_format=torch.channels_last)`` makes the coupling
    networks' convolutions take oneDNN's channels_last kernels, which train this flow 1.1x to
    1.5x faster than NCHW (``benchmarks/flow``); the results are the same to rounding error.
    Coupling networks with thin inputs and big products (a gray image's first two levels)
    take :mod:`tzkcli.flows.kernels`' fast path, in either layout.

    Warning:
        Values outside ``[0, 1)`` are not rejected (checking would cost a pass over the
        batch); they are mapped like any other input.
    """

    def __init__(self, config: GlowConfig) -> None:
        super().__init__()

        if not isinstance(config, GlowConfig):
            raise BadInputError(
                f"Glow config: found {type(config).__name__}, expected a GlowConfig"
            )
        self.config = config
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()

        channels, height, width = config.shape
        shapes = []
        for level in range(config.levels):
            channels, height, width = 4 * channels, height // 2, width // 2
            steps = [FlowStep(channels, config.hidden, config.coupling, config.scale_floor)
                     for _ in range(config.steps)]
            self.levels.append(nn.ModuleList(steps))
            if level < config.levels - 1:
                split = Split(channels)
                self.splits.append(split)
                shapes.append((channels - split.kept, height, width))
                channels = split.kept
        shapes.append((channels, height, width))

        self.top = Standardize((channels, height, width))
        self._latent_shapes = shapes

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """``(C_i, H_i, W_i)`` of ``r_i`` for each level, the top level last."""
        return list(self._latent_shapes)

    @property
    def is_initialised(self) -> bool:
        return all(step.actnorm.is_initialised for steps in self.levels for step in steps)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent actnorm initialisation on the batch ``x``; does nothing once done.

        Each actnorm is set, in flow order, so that its output on ``x`` has zero mean and unit
        variance per channel. Use a batch large enough for stable statistics (e.g. 64+).
        """
        self._check_images(x)
        if self.is_initialised:
            return

        h = x - 0.5
        layout = self.memory_format()
        for level, steps in enumerate(self.levels):
            h, _ = self.squeeze(h)
            h = h.contiguous(memory_format=layout)
            for step in steps:
                step.actnorm.initialize(h)
                h, _ = step(h)
            if level < len(self.splits):
                (h, _), _ = self.splits[level](h)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """``x`` float ``[B, C, H, W]`` in ``[0, 1)`` -> (``r``, one tensor per level, top
        last; ``ladj`` ``[B]``), ladj including every standardisation."""
        self._check_images(x)
        self._check_initialised()

        h = x - 0.5
        ladj = x.new_zeros(x.shape[0])
        r = []
        layout = self.memory_format()
        for level, steps in enumerate(self.levels):
            h, _ = self.squeeze(h)
            h = h.contiguous(memory_format=layout)
            for step in steps:
                h, ladj_step = step(h)
                ladj = ladj + ladj_step
            if level < len(self.splits):
                (h, r_level), ladj_split = self.splits[level](h)
                r.append(r_level)
                ladj = ladj + ladj_split

        r_top, ladj_top = self.top(h)
        r.append(r_top)
        return r, ladj + ladj_top

    def inverse(self, r: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Residuals ``r`` (any values: scaled by a temperature, drawn from any prior) ->
        (images ``x`` ``[B, C, H, W]``, ladj ``[B]`` of this inverse map)."""
        self._check_residuals(r)
        self._check_initialised()

        h, ladj = self.top.inverse(r[-1])
        for level in reversed(range(len(self.levels))):
            if level < len(self.splits):
                h, ladj_split = self.splits[level].inverse((h, r[level]))
                ladj = ladj + ladj_split
            for step in reversed(self.levels[level]):
                h, ladj_step = step.inverse(h)
                ladj = ladj + ladj_step
            h, _ = self.squeeze.inverse(h)

        return h + 0.5, ladj

    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` after ``glow.to(memory_format=torch.channels_last)``, else
        ``torch.contiguous_format``: the layout every level runs in. (A one-channel image is
        both, so the flow sets it after the first squeeze.)"""
        if is_channels_last(self.levels[0][0].coupling.net[0].weight):
            return torch.channels_last
        return torch.contiguous_format

    def _check_initialised(self) -> None:
        if not self.is_initialised:
            raise UsageError(
                "Glow is not initialised: call glow.initialize(x) on a first batch, "
                "or load a state_dict saved after initialisation"
            )

    def _check_images(self, x: Tensor) -> None:
        expected = (-1, *self.config.shape)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.config.shape:
            found = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise BadInputError(f"Glow input x: found shape {found}, expected {expected}")
        if not x.is_floating_point():
            raise BadInputError(
                f"Glow input x: found dtype {x.dtype}, expected floating point in [0, 1)"
            )

    def _check_residuals(self, r: list[Tensor]) -> None:
        if not isinstance(r, (list, tuple)) or len(r) != len(self._latent_shapes):
            found = len(r) if isinstance(r, (list, tuple)) else type(r).__name__
            raise BadInputError(
                f"Glow.inverse r: found {found} levels, expected a list of "
                f"{len(self._latent_shapes)} tensors"
            )
        batch = r[0].shape[0] if isinstance(r[0], Tensor) else None
        for level, (r_level, shape) in enumerate(zip(r, self._latent_shapes)):
            if not isinstance(r_level, Tensor) or tuple(r_level.shape) != (batch, *shape):
                found = tuple(r_level.shape) if isinstance(r_level, Tensor) else r_level
                raise BadInputError(
                    f"Glow.inverse r[{level}]: found shape {found}, expected {(batch, *shape)}"
                )
