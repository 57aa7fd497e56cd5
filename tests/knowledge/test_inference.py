"""Rates, posteriors within a kind, existence, and composition of conditions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tzkcli.errors import BadInputError
from tzkcli.knowledge import (
    CompositionWarning,
    ConditionPriors,
    KnowledgeRates,
    Registry,
    compose,
    composition_log_prob,
    existence,
    posterior,
)


def two_datasets() -> Registry:
    registry = Registry()
    registry.add_kind("label")
    registry.add_condition("dataset", "mnist")
    registry.add_condition("dataset", "omniglot")
    for digit in range(3):
        registry.add_condition("label", f"mnist/{digit}")
    return registry


def test_rates_use_add_one_smoothing():
    registry = two_datasets()
    rates = KnowledgeRates(registry)
    rates.count(torch.tensor([[0, 0], [0, 0], [0, 2], [1, -1]]))

    log_pi = rates.log_categorical("label", torch.float64)
    torch.testing.assert_close(log_pi.exp(), torch.tensor([3, 1, 2], dtype=torch.float64) / 6)
    torch.testing.assert_close(
        rates.existence(torch.float64),
        torch.tensor([4, 2, 3, 1, 2], dtype=torch.float64) / 6,
    )


def test_rates_survive_new_conditions_and_json():
    registry = two_datasets()
    rates = KnowledgeRates(registry)
    rates.count(torch.tensor([[0, 1], [1, -1]]))
    registry.add_condition("label", "mnist/3")

    again = KnowledgeRates.from_json(rates.to_json(), registry)

    assert again.kind_counts("label") == [0, 1, 0, 0]
    assert again.total == 2
    with pytest.raises(BadInputError, match=r"codes\[:, 1\] \(label\): found 7"):
        rates.count(torch.tensor([[0, 7]]))
    with pytest.raises(BadInputError, match=r"expected \[N, 2\]"):
        rates.count(torch.tensor([[0, 1, 2]]))


def test_posterior_sums_to_one_over_admissible_values():
    generator = torch.Generator().manual_seed(0)
    log_prior = 50 * torch.randn(6, 4, generator=generator, dtype=torch.float64)
    log_rates = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    admissible = torch.tensor([[True, True, False, False]] * 3 + [[True] * 4] * 2
                              + [[False] * 4])

    probs = posterior(log_prior, log_rates, admissible)

    torch.testing.assert_close(probs[:5].sum(1), torch.ones(5, dtype=torch.float64))
    assert torch.all(probs[:3, 2:] == 0)
    assert torch.all(probs[5] == 0)
    expected = torch.softmax(log_prior[3] + log_rates, dim=0)
    torch.testing.assert_close(probs[3], expected, rtol=0, atol=1e-12)


def test_existence_is_the_logistic_of_the_log_ratio():
    log_prior = torch.tensor([[-10.0, -12.0]], dtype=torch.float64)
    log_base = torch.tensor([-11.0], dtype=torch.float64)
    rate = torch.tensor([0.25, 0.5], dtype=torch.float64)

    odds = existence(log_prior, log_base, rate)

    expected = [1 / (1 + 3 * math.exp(-1.0)), 1 / (1 + math.exp(1.0))]
    torch.testing.assert_close(odds[0], torch.tensor(expected, dtype=torch.float64))


def composable(shapes=((1, 1, 1), (1, 1, 1))) -> tuple[Registry, ConditionPriors]:
    """Two kinds on a 2-dimensional residual (one split cell, one top cell)."""
    registry = two_datasets()
    registry.add_kind("stroke")
    registry.add_kind("code", form="bottleneck", rank=1)
    registry.add_condition("stroke", "thick")
    registry.add_condition("code", "mnist/c")
    priors = ConditionPriors(list(shapes)).double()
    for condition in registry.conditions:
        kind = registry.kind(condition.kind)
        priors.add(kind.form, kind.rank, condition.spec)
    return registry, priors


def set_gaussian(priors, k, loc, log_scale):
    with torch.no_grad():
        priors.conditions[k].loc.copy_(torch.tensor(loc))
        priors.conditions[k].log_scale.copy_(torch.tensor(log_scale))


def test_composition_matches_a_numeric_product_of_densities():
    registry, priors = composable()
    label, stroke = registry.index("label=mnist/1"), registry.index("stroke=thick")
    set_gaussian(priors, label, [0.7, -1.0], [-0.3, -0.6])
    set_gaussian(priors, stroke, [-0.4, 0.5], [-0.5, 0.1])
    composition = compose([label, stroke], registry, priors, KnowledgeRates(registry))

    # The unnormalised product p_1 p_2 / p_0 on a fine grid, normalised numerically.
    axis = torch.linspace(-8, 8, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    r = [grid[:, :1, None, None], grid[:, 1:, None, None]]
    stats = priors.stats(r)
    log_product = (priors.log_prob(stats, [label, stroke]).sum(1)
                   - priors.base_log_prob(stats))
    cell = (axis[1] - axis[0]) ** 2
    log_norm = torch.logsumexp(log_product, dim=0) + torch.log(cell)

    assert composition.single is None and not composition.fallback
    torch.testing.assert_close(composition_log_prob(stats, composition, priors),
                               log_product - log_norm, rtol=0, atol=1e-8)


def test_implied_conditions_compose_to_the_more_specific():
    registry, priors = composable()
    label = registry.index("label=mnist/2")

    composition = compose([registry.index("dataset=mnist"), label], registry, priors,
                          KnowledgeRates(registry))

    assert composition.single == label
    assert composition.dropped == (registry.index("dataset=mnist"),)


def test_no_positive_precision_falls_back_to_the_most_specific():
    registry, priors = composable()
    rates = KnowledgeRates(registry)
    rates.count(torch.tensor([[0, 0, 0, -1]] * 9 + [[0, 1, 0, -1]]))
    label, stroke = registry.index("label=mnist/1"), registry.index("stroke=thick")
    set_gaussian(priors, label, [0.0, 0.0], [1.0, 0.0])     # precision exp(-2) on cell 0
    set_gaussian(priors, stroke, [0.0, 0.0], [1.0, 0.0])

    with pytest.warns(CompositionWarning, match="no density on 1 cells; using label=mnist/1"):
        composition = compose([stroke, label], registry, priors, rates)

    assert composition.fallback and composition.single == label


def test_bottleneck_takes_part_through_its_diagonal_marginal():
    registry, priors = composable()
    code, stroke = registry.index("code=mnist/c"), registry.index("stroke=thick")
    with torch.no_grad():
        priors.conditions[code].factor.fill_(0.5)
        priors.conditions[code].log_noise.fill_(math.log(0.5))

    with pytest.warns(CompositionWarning, match="code=mnist/c take part .* diagonal"):
        composition = compose([code, stroke], registry, priors, KnowledgeRates(registry))

    # Top cell: the marginal variance 0.25 + 0.25 gives precision 2; with p_0's removed, 2.
    assert composition.diagonal == (code,)
    torch.testing.assert_close(composition.log_scale[1], torch.tensor(-0.5 * math.log(2.0),
                               dtype=torch.float64))


def test_a_single_condition_composes_exactly_without_warning():
    registry, priors = composable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        composition = compose([registry.index("code=mnist/c")], registry, priors,
                              KnowledgeRates(registry))
    assert composition.single == registry.index("code=mnist/c")
    with pytest.raises(BadInputError, match="found none"):
        compose([], registry, priors, KnowledgeRates(registry))
