"""Conditional priors on the standardised residuals ``r``, vectorised over conditions.

The flow returns residuals ``r = (r_1, ..., r_L)`` that are standard normal under the base
prior ``p_0``, and ``log p_0(x) = log N(r; 0, I) + ladj``. Every conditional prior ``p_k`` is a
density on ``r`` too, so ``log p_k(x) - log p_0(x) = log p_k(r) - log N(r; 0, I)``: one flow
pass scores an image under any number of conditions.

Cells: a *cell* is one channel of a split level (its ``H_i * W_i`` positions share one mean
and one log standard deviation) or one dimension of the top level. ``F`` cells in all, split
cells first. A diagonal Gaussian with per-cell ``a`` (``loc``) and ``b`` (``log_scale``) has

``log p(r) = sum_cells [ -exp(-2b) S2 / 2 + a exp(-2b) S1 - n (a^2 exp(-2b) / 2 + b) ]
             - D log(2 pi) / 2``

with ``S1``, ``S2`` the sums of ``r`` and ``r^2`` over a cell's ``n`` positions. So the
statistics are computed once per image and ``K`` conditions cost two ``[B, F] x [F, K]``
matrix products (:class:`ResidualStats`, :meth:`ConditionPriors.log_prob`).

Forms (per kind, see MODEL.md; this design is a reconstruction from the TzK paper's stated
claims, not the paper's own equations):

- ``gaussian``: ``r_i ~ N(a_{k,i}, exp(b_{k,i})^2)``, per channel at split levels and per
  dimension at the top level.
- ``bottleneck``: split levels as ``gaussian``; the top level ``r_L ~ N(m_k, W_k W_k^T +
  s_k^2 I)`` with ``W_k`` of rank ``q``, scored exactly through the Woodbury identity and the
  matrix determinant lemma, with the code ``c ~ N(0, I_q)``, ``r_L = m_k + W_k c + s_k eps``.

Parameters: each condition owns one small module (:class:`GaussianPrior` or
:class:`BottleneckPrior`) in a ``ModuleList``, stacked at compute time. Adding a condition
appends a module and leaves every existing parameter bit-for-bit unchanged, and refining a new
condition trains only its own module's parameters (``priors.conditions[k].parameters()``).
Stacking costs one copy of ``K * F`` numbers per call, negligible next to the flow.

Initialisation: a gaussian condition starts as ``p_0`` (``a = 0``, ``b = 0``). A bottleneck
starts at ``m = 0``, ``s = 1`` and a small ``W`` drawn from a generator seeded by the
condition's name (``W = 0`` is a saddle point that gradients never leave), so its start is
reproducible and independent of the order conditions are added in.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tzkcli.errors import BadInputError

LOG_2PI = math.log(2 * math.pi)
BOTTLENECK_INIT_SCALE = 0.01


class CellLayout:
    """How the residual levels map to cells: split channels first, then top dimensions.

    Args:
        latent_shapes: ``(C_i, H_i, W_i)`` per level, the top level last (``glow.latent_shapes``).
    """

    def __init__(self, latent_shapes: Sequence[tuple[int, int, int]]) -> None:
        self.latent_shapes = [tuple(int(n) for n in shape) for shape in latent_shapes]
        if not self.latent_shapes or any(len(s) != 3 for s in self.latent_shapes):
            raise BadInputError(
                f"latent_shapes: found {latent_shapes!r}, expected a list of (C, H, W)"
            )

        *splits, top = self.latent_shapes
        self.n_split = sum(c for c, _, _ in splits)
        self.n_top = math.prod(top)
        self.n_cells = self.n_split + self.n_top
        self.dims = sum(math.prod(shape) for shape in self.latent_shapes)
        counts = [h * w for c, h, w in splits for _ in range(c)] + [1] * self.n_top
        self.counts = torch.tensor(counts, dtype=torch.float64)

    def stats(self, r: Sequence[Tensor], dtype: torch.dtype) -> ResidualStats:
        """Sufficient statistics of residuals ``r`` (one ``[B, C_i, H_i, W_i]`` per level)."""
        if len(r) != len(self.latent_shapes):
            raise BadInputError(
                f"residuals r: found {len(r)} levels, expected {len(self.latent_shapes)}"
            )
        r = [level.to(dtype) for level in r]

        top = r[-1].flatten(1)
        s1 = [level.sum(dim=(2, 3)) for level in r[:-1]] + [top]
        s2 = [level.square().sum(dim=(2, 3)) for level in r[:-1]] + [top.square()]
        return ResidualStats(torch.cat(s1, dim=1), torch.cat(s2, dim=1), top)

    def to_levels(self, cells: Tensor) -> list[Tensor]:
        """Per-cell values ``[n, F]`` -> one ``[n, C_i, H_i, W_i]`` per level (broadcast)."""
        levels = []
        start = 0
        for c, h, w in self.latent_shapes[:-1]:
            block = cells[:, start:start + c]
            levels.append(block[:, :, None, None].expand(-1, c, h, w))
            start += c
        levels.append(cells[:, start:].reshape(-1, *self.latent_shapes[-1]))
        return levels

    def top_to_level(self, top: Tensor) -> Tensor:
        """A flat top-level tensor ``[n, D_top]`` -> ``[n, C_L, H_L, W_L]``."""
        return top.reshape(-1, *self.latent_shapes[-1])


@dataclass
class ResidualStats:
    """Per-image statistics of the residuals, enough for every prior's log-density.

    Attributes:
        s1: ``[B, F]`` sum of ``r`` over each cell's positions.
        s2: ``[B, F]`` sum of ``r^2`` over each cell's positions.
        top: ``[B, D_top]`` the flat top-level residual (for bottleneck priors and codes).
    """

    s1: Tensor
    s2: Tensor
    top: Tensor

    def base_log_prob(self) -> Tensor:
        """``log N(r; 0, I)`` per image, ``[B]``."""
        return -0.5 * self.s2.sum(dim=1)


def gaussian_log_prob(
    s1: Tensor, s2: Tensor, counts: Tensor, loc: Tensor, log_scale: Tensor
) -> Tensor:
    """Diagonal-Gaussian log-density from statistics, without the ``-D log(2 pi)/2`` constant.

    Args:
        s1, s2: ``[B, F]`` statistics of ``F`` cells.
        counts: ``[F]`` positions per cell.
        loc, log_scale: ``[K, F]`` ``a`` and ``b`` of ``K`` priors.

    Returns:
        ``[B, K]``.
    """
    precision = torch.exp(-2 * log_scale)
    linear = s1 @ (loc * precision).T - 0.5 * (s2 @ precision.T)
    constant = (counts * (0.5 * loc.square() * precision + log_scale)).sum(dim=1)
    return linear - constant


def lowrank_log_prob(top: Tensor, mean: Tensor, factor: Tensor, log_noise: Tensor) -> Tensor:
    """``log N(r; m, W W^T + s^2 I)`` without the ``-D log(2 pi)/2`` constant.

    Uses ``M = s^2 I_q + W^T W`` and ``M = L L^T``: ``d^T C^-1 d = (|d|^2 - |L^-1 W^T d|^2) / s^2``
    (Woodbury) and ``log|C| = (D - q) log s^2 + log|M|`` (matrix determinant lemma).

    Args:
        top: ``[B, D]`` residuals; mean ``[K, D]``; factor ``[K, D, q]``; log_noise ``[K]``.

    Returns:
        ``[B, K]``.
    """
    dims, rank = factor.shape[1], factor.shape[2]
    noise = torch.exp(2 * log_noise)
    chol = lowrank_cholesky(factor, noise)

    squared = top.square().sum(dim=1, keepdim=True) - 2 * top @ mean.T + mean.square().sum(1)
    projected = torch.einsum("bd,kdq->bkq", top, factor) - torch.einsum("kd,kdq->kq", mean, factor)
    # [K, q, B]: one triangular solve per condition for the whole batch.
    whitened = torch.linalg.solve_triangular(chol, projected.permute(1, 2, 0), upper=False)
    quadratic = (squared - whitened.square().sum(dim=1).T) / noise

    logdet = (dims - rank) * 2 * log_noise + 2 * torch.log(
        torch.diagonal(chol, dim1=-2, dim2=-1)
    ).sum(-1)
    return -0.5 * (quadratic + logdet)


def lowrank_cholesky(factor: Tensor, noise: Tensor) -> Tensor:
    """Lower Cholesky factor ``[K, q, q]`` of ``M = s^2 I_q + W^T W``."""
    rank = factor.shape[2]
    eye = torch.eye(rank, dtype=factor.dtype, device=factor.device)
    gram = factor.transpose(1, 2) @ factor + noise[:, None, None] * eye
    return torch.linalg.cholesky(gram)


class GaussianPrior(nn.Module):
    """One condition's ``gaussian`` prior: ``loc`` (``a``) and ``log_scale`` (``b``), ``[F]``."""

    form = "gaussian"

    def __init__(self, layout: CellLayout) -> None:
        super().__init__()

        self.loc = nn.Parameter(torch.zeros(layout.n_cells))
        self.log_scale = nn.Parameter(torch.zeros(layout.n_cells))


class BottleneckPrior(nn.Module):
    """One condition's ``bottleneck`` prior.

    Parameters: ``loc``/``log_scale`` ``[F_split]`` for the split cells; ``mean`` ``[D_top]``,
    ``factor`` ``[D_top, q]`` and ``log_noise`` ``[]`` (``log s``) for the top level.
    """

    form = "bottleneck"

    def __init__(self, layout: CellLayout, rank: int, seed: int) -> None:
        super().__init__()

        if rank > layout.n_top:
            raise BadInputError(
                f"bottleneck rank {rank}: expected at most the top level's {layout.n_top} "
                "dimensions"
            )
        generator = torch.Generator().manual_seed(seed)
        factor = BOTTLENECK_INIT_SCALE * torch.randn(layout.n_top, rank, generator=generator)
        self.loc = nn.Parameter(torch.zeros(layout.n_split))
        self.log_scale = nn.Parameter(torch.zeros(layout.n_split))
        self.mean = nn.Parameter(torch.zeros(layout.n_top))
        self.factor = nn.Parameter(factor)
        self.log_noise = nn.Parameter(torch.zeros(()))

    def marginal_log_scale(self) -> Tensor:
        """``b`` of the diagonal marginal of the top level: ``log sqrt(sum_j W_dj^2 + s^2)``."""
        variance = self.factor.square().sum(dim=1) + torch.exp(2 * self.log_noise)
        return 0.5 * torch.log(variance)


class ConditionPriors(nn.Module):
    """The conditional priors of every registered condition, scored together.

    ``conditions[k]`` is condition ``k``'s module (global registry index). The buffer
    ``anchor`` (empty, not saved) carries the device and dtype that conditions added later
    are created with.
    """

    def __init__(self, latent_shapes: Sequence[tuple[int, int, int]]) -> None:
        super().__init__()

        self.layout = CellLayout(latent_shapes)
        self.conditions = nn.ModuleList()
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def __len__(self) -> int:
        return len(self.conditions)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def add(self, form: str, rank: int | None = None, name: str = "") -> int:
        """Append one condition's prior (``name`` seeds a bottleneck's start); return its index."""
        if form == "gaussian":
            prior: nn.Module = GaussianPrior(self.layout)
        elif form == "bottleneck":
            prior = BottleneckPrior(self.layout, int(rank or 0), zlib.crc32(name.encode()))
        else:
            raise BadInputError(f"prior form {form!r}: expected 'gaussian' or 'bottleneck'")

        self.conditions.append(prior.to(device=self.anchor.device, dtype=self.anchor.dtype))
        return len(self.conditions) - 1

    def stats(self, r: Sequence[Tensor]) -> ResidualStats:
        """Sufficient statistics of ``r`` in this module's dtype (float32 or wider)."""
        with _full_precision(self.anchor):
            return self.layout.stats(r, self.dtype)

    def base_log_prob(self, stats: ResidualStats) -> Tensor:
        """``log p_0(r) = log N(r; 0, I)``, ``[B]``."""
        return stats.base_log_prob() - 0.5 * self.layout.dims * LOG_2PI

    def log_prob(self, stats: ResidualStats, conditions: Sequence[int] | None = None) -> Tensor:
        """``log p_k(r)`` for each condition ``k`` (default all), ``[B, K]``, in that order.

        Computed with autocast off, so a caller's bf16 autocast never lowers the priors.
        """
        modules = self._select(conditions)
        if not modules:
            return stats.s1.new_zeros(stats.s1.shape[0], 0)
        with _full_precision(self.anchor):
            return self._log_prob(stats, modules)

    def _log_prob(self, stats: ResidualStats, modules: list[nn.Module]) -> Tensor:

        gaussian = [j for j, m in enumerate(modules) if m.form == "gaussian"]
        bottleneck = [j for j, m in enumerate(modules) if m.form == "bottleneck"]
        parts = []
        if gaussian:
            parts.append(self._gaussian_log_prob(stats, [modules[j] for j in gaussian]))
        if bottleneck:
            parts.append(self._bottleneck_log_prob(stats, [modules[j] for j in bottleneck]))
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if gaussian and bottleneck:
            order = torch.tensor(gaussian + bottleneck, device=out.device).argsort()
            out = out[:, order]
        return out - 0.5 * self.layout.dims * LOG_2PI

    def _gaussian_log_prob(self, stats: ResidualStats, modules: list[nn.Module]) -> Tensor:
        loc = torch.stack([m.loc for m in modules])
        log_scale = torch.stack([m.log_scale for m in modules])
        counts = self.layout.counts.to(stats.s1)
        return gaussian_log_prob(stats.s1, stats.s2, counts, loc, log_scale)

    def _bottleneck_log_prob(self, stats: ResidualStats, modules: list[nn.Module]) -> Tensor:
        split = self.layout.n_split
        counts = self.layout.counts.to(stats.s1)[:split]
        loc = torch.stack([m.loc for m in modules])
        log_scale = torch.stack([m.log_scale for m in modules])
        out = gaussian_log_prob(stats.s1[:, :split], stats.s2[:, :split], counts, loc, log_scale)
        return out + lowrank_log_prob(
            stats.top,
            torch.stack([m.mean for m in modules]),
            torch.stack([m.factor for m in modules]),
            torch.stack([m.log_noise for m in modules]),
        )

    def _select(self, conditions: Sequence[int] | None) -> list[nn.Module]:
        """The modules of ``conditions`` (default all), indexing a plain list: ModuleList
        indexing costs microseconds per call, which adds up over hundreds of conditions."""
        modules = list(self.conditions)
        if conditions is None:
            return modules
        indices = [int(k) for k in conditions]
        if indices and not 0 <= min(indices) <= max(indices) < len(modules):
            bad = next(k for k in indices if not 0 <= k < len(modules))
            self._module(bad)
        return [modules[k] for k in indices]

    def diagonal(self, condition: int) -> tuple[Tensor, Tensor, bool]:
        """Per-cell ``(a, b)`` ``[F]`` of a condition's diagonal Gaussian, and whether it is
        a bottleneck's diagonal marginal (an approximation) rather than the prior itself."""
        module = self._module(condition)
        if module.form == "gaussian":
            return module.loc, module.log_scale, False
        loc = torch.cat([module.loc, module.mean])
        log_scale = torch.cat([module.log_scale, module.marginal_log_scale()])
        return loc, log_scale, True

    def code(self, stats: ResidualStats, condition: int) -> Tensor:
        """Posterior mean of a bottleneck condition's code, ``E[c | r] = M^-1 W^T (r_L - m)``.

        Returns:
            ``[B, q]``, the low-dimensional representation of each image under the condition.
        """
        module = self._module(condition)
        with _full_precision(self.anchor):
            return self._code(stats, module, condition)

    def _code(self, stats: ResidualStats, module: nn.Module, condition: int) -> Tensor:
        if module.form != "bottleneck":
            raise BadInputError(
                f"condition {condition}: has a {module.form!r} prior, expected a bottleneck "
                "(only bottleneck kinds have codes)"
            )
        noise = torch.exp(2 * module.log_noise)
        chol = lowrank_cholesky(module.factor[None], noise[None])[0]
        projected = (stats.top - module.mean) @ module.factor
        return torch.cholesky_solve(projected.T, chol).T

    def _module(self, condition: int) -> nn.Module:
        if not 0 <= condition < len(self.conditions):
            raise BadInputError(
                f"condition index {condition}: out of range, expected 0..{len(self) - 1}"
            )
        return self.conditions[condition]


def _full_precision(like: Tensor) -> torch.autocast:
    """A context with autocast off on ``like``'s device type."""
    return torch.autocast(like.device.type, enabled=False)
