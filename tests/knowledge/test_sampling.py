"""Sampling residuals: temperature, means, seeds, mixtures."""

from __future__ import annotations

import math

import pytest
import torch

from tzkcli.errors import BadInputError
from tzkcli.knowledge import (
    ConditionPriors,
    KnowledgeRates,
    Mixture,
    Registry,
    compose,
    sample_residuals,
)

SHAPES = [(2, 2, 2), (2, 1, 2)]


def priors_with_values() -> ConditionPriors:
    priors = ConditionPriors(SHAPES).double()
    priors.add("gaussian")
    priors.add("gaussian")
    priors.add("bottleneck", rank=2, name="code=a")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in priors.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator,
                                               dtype=torch.float64))
    return priors


def test_zero_temperature_gives_the_mean():
    priors = priors_with_values()
    gaussian, bottleneck = priors.conditions[0], priors.conditions[2]

    base = sample_residuals(priors, 3, None, temperature=0.0)
    first = sample_residuals(priors, 3, 0, temperature=0.0)
    code = sample_residuals(priors, 3, 2, temperature=0.0)

    assert all(torch.all(level == 0) for level in base)
    assert torch.equal(first[0][1, :, 1, 0], gaussian.loc[:2].detach())
    assert torch.equal(first[1][2].flatten(), gaussian.loc[2:].detach())
    assert torch.equal(code[0][0, :, 0, 1], bottleneck.loc.detach())
    assert torch.equal(code[1][0].flatten(), bottleneck.mean.detach())


def test_a_fixed_seed_gives_the_same_samples():
    priors = priors_with_values()
    for source in (None, 1, 2):
        first = sample_residuals(priors, 4, source, 0.7, torch.Generator().manual_seed(5))
        again = sample_residuals(priors, 4, source, 0.7, torch.Generator().manual_seed(5))
        other = sample_residuals(priors, 4, source, 0.7, torch.Generator().manual_seed(6))
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not torch.equal(first[-1], other[-1])


def test_temperature_scales_the_spread():
    priors = priors_with_values()
    module = priors.conditions[1]
    generator = torch.Generator().manual_seed(0)

    r = sample_residuals(priors, 20000, 1, temperature=0.5, generator=generator)

    top = r[-1].flatten(1)
    expected = 0.5 * module.log_scale[2:].detach().exp()
    torch.testing.assert_close(top.std(0), expected, rtol=0.03, atol=0)
    torch.testing.assert_close(top.mean(0), module.loc[2:].detach(), rtol=0, atol=0.02)


def test_bottleneck_samples_have_the_low_rank_covariance():
    priors = priors_with_values()
    module = priors.conditions[2]

    r = sample_residuals(priors, 40000, 2, 1.0, torch.Generator().manual_seed(1))

    factor = module.factor.detach()
    covariance = factor @ factor.T + module.log_noise.detach().exp() ** 2 * torch.eye(
        4, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(r[-1].flatten(1).T), covariance, rtol=0, atol=0.03)


def test_a_mixture_draws_conditions_by_their_rates():
    priors = ConditionPriors(SHAPES).double()
    for loc in (-5.0, 5.0):
        with torch.no_grad():
            priors.conditions[priors.add("gaussian")].loc.fill_(loc)
    mixture = Mixture([0, 1], torch.tensor([0.8, 0.2]))

    r = sample_residuals(priors, 2000, mixture, 0.1, torch.Generator().manual_seed(2))

    share = (r[-1].flatten(1).mean(1) > 0).double().mean()
    assert abs(float(share) - 0.2) < 0.03


def test_a_composition_samples_its_closed_form():
    registry = Registry()
    registry.add_kind("a")
    registry.add_kind("b")
    registry.add_condition("a", "x")
    registry.add_condition("b", "y")
    priors = ConditionPriors(SHAPES).double()
    for _ in range(2):
        priors.add("gaussian")
    with torch.no_grad():
        priors.conditions[0].loc.fill_(1.0)
        priors.conditions[1].loc.fill_(2.0)
        priors.conditions[1].log_scale.fill_(-0.5 * math.log(2.0))
    composition = compose([0, 1], registry, priors, KnowledgeRates(registry))

    mean = sample_residuals(priors, 2, composition, 0.0)

    # precision 1 + 2 - 1 = 2, mean (1 * 1 + 2 * 2) / 2 = 2.5
    assert torch.allclose(mean[-1], torch.full((2, 2, 1, 2), 2.5, dtype=torch.float64))


def test_bad_requests_are_refused():
    priors = priors_with_values()
    with pytest.raises(BadInputError, match="number of samples: found 0"):
        sample_residuals(priors, 0)
    with pytest.raises(BadInputError, match="temperature: found -1"):
        sample_residuals(priors, 2, temperature=-1)
    with pytest.raises(BadInputError, match="condition index 9"):
        sample_residuals(priors, 2, 9)
