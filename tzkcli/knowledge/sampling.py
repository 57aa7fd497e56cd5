"""Sampling standardised residuals from ``p_0``, a condition, a composition, or a mixture.

At temperature ``tau`` every standard deviation is scaled by ``tau``: a cell of a diagonal
Gaussian gives ``r = a + tau exp(b) eps``, a bottleneck's top level gives
``r_L = m + tau (W c + s eps)`` with ``c ~ N(0, I_q)``. ``tau = 0`` returns the prior's mean.
A mixture over a kind first draws each sample's condition ``k ~ pi``, then ``r ~ p_k``.

Draws come from ``generator`` in a fixed order (the ``eps`` of every level, then the codes),
so a seeded generator on the priors' device reproduces the samples exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tzkcli.errors import BadInputError
from tzkcli.knowledge.composition import Composition
from tzkcli.knowledge.priors import ConditionPriors


@dataclass
class Mixture:
    """A mixture of a kind's conditions: ``conditions`` (global indices) drawn with ``probs``."""

    conditions: Sequence[int]
    probs: Tensor


Source = None | int | Composition | Mixture


def sample_residuals(
    priors: ConditionPriors,
    n: int,
    source: Source = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Draw ``n`` residuals, one ``[n, C_i, H_i, W_i]`` tensor per level, top level last."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadInputError(f"number of samples: found {n!r}, expected a positive integer")
    if not temperature >= 0:
        raise BadInputError(f"temperature: found {temperature!r}, expected a number >= 0")

    layout = priors.layout
    like = {"device": priors.anchor.device, "dtype": priors.dtype}
    eps = [torch.randn((n, *shape), generator=generator, **like)
           for shape in layout.latent_shapes]
    chosen = _chosen(priors, n, source, generator)

    if chosen is None:
        loc, log_scale = _diagonal_source(priors, n, source, like)
        return _gaussian_levels(layout.to_levels(loc), layout.to_levels(log_scale), eps,
                                temperature)

    modules = [priors.conditions[k] for k in chosen]
    if modules[0].form == "gaussian":
        loc = torch.stack([m.loc for m in modules])
        log_scale = torch.stack([m.log_scale for m in modules])
        return _gaussian_levels(layout.to_levels(loc), layout.to_levels(log_scale), eps,
                                temperature)
    return _bottleneck_levels(priors, modules, eps, temperature, generator)


def _chosen(
    priors: ConditionPriors, n: int, source: Source, generator: torch.Generator | None
) -> list[int] | None:
    """Each sample's condition, or None for a diagonal source (``p_0`` or a composition)."""
    if source is None:
        return None
    if isinstance(source, Composition):
        return None if source.single is None else [source.single] * n
    if isinstance(source, Mixture):
        probs = source.probs.to(device=priors.anchor.device, dtype=torch.float64)
        draws = torch.multinomial(probs, n, replacement=True, generator=generator)
        candidates = list(source.conditions)
        forms = {priors.conditions[k].form for k in candidates}
        if len(forms) != 1:
            raise BadInputError(f"mixture conditions: found forms {sorted(forms)}, expected one")
        return [candidates[j] for j in draws.tolist()]
    priors._module(int(source))
    return [int(source)] * n


def _diagonal_source(
    priors: ConditionPriors, n: int, source: None | Composition, like: dict
) -> tuple[Tensor, Tensor]:
    cells = priors.layout.n_cells
    if source is None:
        zero = torch.zeros(n, cells, **like)
        return zero, zero
    return source.loc.expand(n, cells), source.log_scale.expand(n, cells)


def _gaussian_levels(
    loc: list[Tensor], log_scale: list[Tensor], eps: list[Tensor], temperature: float
) -> list[Tensor]:
    return [a + temperature * torch.exp(b) * e for a, b, e in zip(loc, log_scale, eps)]


def _bottleneck_levels(
    priors: ConditionPriors,
    modules: list,
    eps: list[Tensor],
    temperature: float,
    generator: torch.Generator | None,
) -> list[Tensor]:
    layout = priors.layout
    split_loc = torch.stack([m.loc for m in modules])
    split_log_scale = torch.stack([m.log_scale for m in modules])
    top_pad = split_loc.new_zeros(len(modules), layout.n_top)
    loc = layout.to_levels(torch.cat([split_loc, top_pad], dim=1))[:-1]
    log_scale = layout.to_levels(torch.cat([split_log_scale, top_pad], dim=1))[:-1]
    levels = _gaussian_levels(loc, log_scale, eps[:-1], temperature)

    mean = torch.stack([m.mean for m in modules])
    factor = torch.stack([m.factor for m in modules])
    noise = torch.exp(torch.stack([m.log_noise for m in modules]))
    code = torch.randn(factor.shape[0], factor.shape[2], generator=generator,
                       device=factor.device, dtype=factor.dtype)
    spread = torch.einsum("ndq,nq->nd", factor, code) + noise[:, None] * eps[-1].flatten(1)
    levels.append(layout.top_to_level(mean + temperature * spread))
    return levels
