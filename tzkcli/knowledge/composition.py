"""Composition of several conditions into one prior on the residuals.

For conditions ``k_1 .. k_n`` (e.g. ``label=mnist/3`` and ``stroke=thick``) the composed prior is
the product of their Gaussian experts divided by ``p_0`` once per extra expert,
``q(r) ∝ prod_k p_k(r) / p_0(r)^(n-1)``. Each cell is Gaussian with

``precision = sum_k exp(-2 b_k) - (n - 1)``  and  ``mean = sum_k exp(-2 b_k) a_k / precision``

(``p_0`` is ``N(0, 1)`` on every cell, so it adds no mean). Steps, in order:

1. Conditions implied by another one's namespace are dropped (``label=mnist/3`` and
   ``dataset=mnist`` compose to ``label=mnist/3``), as are repeats.
2. One condition left: it is used exactly, bottleneck included.
3. Otherwise a ``bottleneck`` condition takes part through its diagonal marginal (its top
   level's per-dimension variance ``sum_j W_dj^2 + s^2``), and the result says so.
4. Where the precision of any cell would not be positive, the product has no density: the
   composition falls back to the most specific condition (lowest existence rate, then the
   deepest namespace, then the first given) and says so.

Both facts are returned in :class:`Composition` and raised as a :class:`CompositionWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tzkcli.errors import BadInputError
from tzkcli.knowledge.priors import LOG_2PI, ConditionPriors, ResidualStats, gaussian_log_prob
from tzkcli.knowledge.rates import KnowledgeRates
from tzkcli.knowledge.registry import Registry


class CompositionWarning(UserWarning):
    """A composition used a bottleneck's diagonal marginal or fell back to one condition."""


@dataclass
class Composition:
    """A prior on the residuals made of one or several conditions.

    Attributes:
        conditions: the conditions that take part, after dropping implied ones.
        single: the one condition used exactly (with its full form), or None.
        loc, log_scale: ``[F]`` per-cell ``a`` and ``b`` of the composed diagonal Gaussian
            (None when ``single`` is set).
        fallback: True when the product had no density and ``single`` is the fallback.
        diagonal: bottleneck conditions that took part through their diagonal marginal.
        dropped: conditions dropped because another one implies them.
    """

    conditions: tuple[int, ...]
    single: int | None = None
    loc: Tensor | None = None
    log_scale: Tensor | None = None
    fallback: bool = False
    diagonal: tuple[int, ...] = ()
    dropped: tuple[int, ...] = field(default=())


def compose(
    conditions: Sequence[int],
    registry: Registry,
    priors: ConditionPriors,
    rates: KnowledgeRates,
) -> Composition:
    """Compose conditions (global indices) as described in the module docstring."""
    unique = list(dict.fromkeys(int(k) for k in conditions))
    if not unique:
        raise BadInputError("conditions to compose: found none, expected at least one")
    implied = {j for k in unique for j in registry.implied(k)}
    kept = [k for k in unique if k not in implied]
    dropped = tuple(k for k in unique if k in implied)
    if len(kept) == 1:
        return Composition(tuple(kept), single=kept[0], dropped=dropped)

    locs, log_scales, diagonal = [], [], []
    for k in kept:
        loc, log_scale, marginal = priors.diagonal(k)
        locs.append(loc)
        log_scales.append(log_scale)
        if marginal:
            diagonal.append(k)

    experts = torch.exp(-2 * torch.stack(log_scales))
    precision = experts.sum(dim=0) - (len(kept) - 1)
    if bool((precision <= 0).any()):
        chosen = most_specific(kept, registry, rates)
        _warn(f"the product of {_specs(kept, registry)} has no density on "
              f"{int((precision <= 0).sum())} cells; using {registry.condition(chosen).spec}")
        return Composition(tuple(kept), single=chosen, fallback=True, dropped=dropped)

    if diagonal:
        _warn(f"bottleneck conditions {_specs(diagonal, registry)} take part in the "
              "composition through their diagonal marginals")
    loc = (experts * torch.stack(locs)).sum(dim=0) / precision
    return Composition(tuple(kept), loc=loc, log_scale=-0.5 * torch.log(precision),
                       diagonal=tuple(diagonal), dropped=dropped)


def composition_log_prob(
    stats: ResidualStats, composition: Composition, priors: ConditionPriors
) -> Tensor:
    """``log q(r)`` of a composition, ``[B]`` (the flow's ladj is added by the caller)."""
    if composition.single is not None:
        return priors.log_prob(stats, [composition.single])[:, 0]

    counts = priors.layout.counts.to(stats.s1)
    log_prob = gaussian_log_prob(
        stats.s1, stats.s2, counts, composition.loc[None], composition.log_scale[None]
    )
    return log_prob[:, 0] - 0.5 * priors.layout.dims * LOG_2PI


def most_specific(conditions: Sequence[int], registry: Registry, rates: KnowledgeRates) -> int:
    """The condition of the fewest images: lowest existence rate, deepest namespace, first."""
    existence = rates.existence(torch.float64)

    def key(position: int) -> tuple[float, int, int]:
        k = conditions[position]
        depth = registry.condition(k).value.count("/")
        return float(existence[k]), -depth, position

    return conditions[min(range(len(conditions)), key=key)]


def _specs(conditions: Sequence[int], registry: Registry) -> str:
    return ", ".join(registry.condition(k).spec for k in conditions)


def _warn(message: str) -> None:
    warnings.warn(message, CompositionWarning, stacklevel=3)
