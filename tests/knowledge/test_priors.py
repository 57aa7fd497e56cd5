"""Conditional priors on residuals: exact densities, vectorised scoring, extendable parameters."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from tzkcli.errors import BadInputError
from tzkcli.knowledge import ConditionPriors

SHAPES = [(2, 2, 2), (3, 1, 1), (2, 1, 2)]   # two split levels, a 4-dimensional top level


def randomised(priors: ConditionPriors, seed: int = 0) -> ConditionPriors:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in priors.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator,
                                               dtype=parameter.dtype))
    return priors


def residuals(batch: int = 5, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
            for shape in SHAPES]


def direct_gaussian(r, loc, log_scale) -> torch.Tensor:
    """log N(r; a, exp(b)^2) summed level by level with torch.distributions."""
    total = 0
    start = 0
    for level, (c, h, w) in enumerate(SHAPES):
        top = level == len(SHAPES) - 1
        size = c * h * w if top else c
        a, b = loc[start:start + size], log_scale[start:start + size]
        shape = (c, h, w) if top else (c, 1, 1)
        normal = Normal(a.reshape(shape), b.exp().reshape(shape))
        total = total + normal.log_prob(r[level]).sum(dim=(1, 2, 3))
        start += size
    return total


def noise_covariance(module) -> torch.Tensor:
    return module.log_noise.detach().exp() ** 2 * torch.eye(4, dtype=torch.float64)


def test_base_prior_is_the_standard_normal():
    priors = ConditionPriors(SHAPES).double()
    r = residuals()
    expected = sum(Normal(0.0, 1.0).log_prob(level).sum(dim=(1, 2, 3)) for level in r)
    torch.testing.assert_close(priors.base_log_prob(priors.stats(r)), expected,
                               rtol=0, atol=1e-12)


def test_gaussian_prior_matches_a_direct_sum():
    priors = ConditionPriors(SHAPES).double()
    for _ in range(3):
        priors.add("gaussian")
    randomised(priors)
    r = residuals()

    scored = priors.log_prob(priors.stats(r))

    for k, module in enumerate(priors.conditions):
        expected = direct_gaussian(r, module.loc.detach(), module.log_scale.detach())
        torch.testing.assert_close(scored[:, k], expected, rtol=0, atol=1e-10)


def test_bottleneck_matches_multivariate_normal_with_full_covariance():
    priors = ConditionPriors(SHAPES).double()
    priors.add("gaussian")
    priors.add("bottleneck", rank=2, name="code=a")
    priors.add("bottleneck", rank=2, name="code=b")
    randomised(priors)
    r = residuals()

    scored = priors.log_prob(priors.stats(r))

    top = r[-1].flatten(1)
    for k in (1, 2):
        module = priors.conditions[k]
        split_loc = torch.cat([module.loc.detach(), torch.zeros(4, dtype=torch.float64)])
        split_scale = torch.cat([module.log_scale.detach(), torch.zeros(4, dtype=torch.float64)])
        split = direct_gaussian(r, split_loc, split_scale) - Normal(0.0, 1.0).log_prob(top).sum(1)
        factor = module.factor.detach()
        covariance = factor @ factor.T + noise_covariance(module)
        full = MultivariateNormal(module.mean.detach(), covariance).log_prob(top)
        torch.testing.assert_close(scored[:, k], split + full, rtol=0, atol=1e-10)


def test_a_subset_of_conditions_scores_the_same_columns():
    priors = ConditionPriors(SHAPES).double()
    for form, rank in [("gaussian", None), ("bottleneck", 2), ("gaussian", None)]:
        priors.add(form, rank, name=str(len(priors)))
    randomised(priors)
    stats = priors.stats(residuals())

    everything = priors.log_prob(stats)
    torch.testing.assert_close(priors.log_prob(stats, [2, 1]), everything[:, [2, 1]],
                               rtol=0, atol=1e-12)


def test_adding_a_condition_changes_no_existing_parameter():
    priors = ConditionPriors(SHAPES).double()
    priors.add("gaussian")
    priors.add("bottleneck", rank=2, name="code=a")
    randomised(priors)
    before = {name: value.clone() for name, value in priors.state_dict().items()}
    scores_before = priors.log_prob(priors.stats(residuals()))

    priors.add("gaussian")
    priors.add("bottleneck", rank=3, name="code=b")

    after = priors.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert torch.equal(priors.log_prob(priors.stats(residuals()), [0, 1]), scores_before)
    assert priors.conditions[3].factor.dtype == torch.float64


def test_refining_trains_only_the_new_condition():
    priors = ConditionPriors(SHAPES).double()
    priors.add("gaussian")
    new = priors.add("gaussian")
    priors.requires_grad_(False)
    priors.conditions[new].requires_grad_(True)

    loss = -priors.log_prob(priors.stats(residuals())).sum()
    loss.backward()

    assert priors.conditions[0].loc.grad is None
    assert priors.conditions[new].loc.grad.abs().sum() > 0
    assert priors.conditions[new].log_scale.grad.abs().sum() > 0


def test_bottleneck_start_depends_on_its_name_only():
    first = ConditionPriors(SHAPES)
    first.add("gaussian")
    first.add("bottleneck", rank=2, name="code=a")
    second = ConditionPriors(SHAPES)
    second.add("bottleneck", rank=2, name="code=a")

    assert torch.equal(first.conditions[1].factor, second.conditions[0].factor)
    assert first.conditions[1].factor.abs().max() > 0


def test_code_is_the_posterior_mean():
    priors = ConditionPriors(SHAPES).double()
    priors.add("bottleneck", rank=2, name="code=a")
    randomised(priors)
    r = residuals()

    code = priors.code(priors.stats(r), 0)

    module = priors.conditions[0]
    factor, mean = module.factor.detach(), module.mean.detach()
    covariance = factor @ factor.T + noise_covariance(module)
    expected = (r[-1].flatten(1) - mean) @ torch.linalg.solve(covariance, factor)
    torch.testing.assert_close(code, expected, rtol=0, atol=1e-10)


def test_gradient_reaches_every_prior_parameter():
    priors = ConditionPriors(SHAPES).double()
    priors.add("gaussian")
    priors.add("bottleneck", rank=2, name="code=a")
    randomised(priors)

    priors.log_prob(priors.stats(residuals())).sum().backward()

    for name, parameter in priors.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bad_forms_and_ranks_are_refused():
    priors = ConditionPriors(SHAPES)
    with pytest.raises(BadInputError, match="bottleneck rank 5: expected at most"):
        priors.add("bottleneck", rank=5)
    with pytest.raises(BadInputError, match="prior form 'lowrank'"):
        priors.add("lowrank")
    with pytest.raises(BadInputError, match="expected a bottleneck"):
        priors.add("gaussian")
        priors.code(priors.stats(residuals()), 0)
