"""Sampling images: temperature 0 is the prior's mean, seeds reproduce, pixels are quantised."""

from __future__ import annotations

import math

import pytest
import torch

from tests.model.flows import IdentityFlow, TwoLevelFlow
from tzkcli.errors import BadInputError
from tzkcli.knowledge import Registry
from tzkcli.model import ModelConfig, TzK


def model_with(flow, n_bits: int = 8) -> TzK:
    registry = Registry()
    registry.add_kind("label")
    registry.add_kind("stroke")
    registry.add_condition("dataset", "mnist")
    registry.add_condition("label", "mnist/0")
    registry.add_condition("label", "mnist/1")
    registry.add_condition("stroke", "thick")
    return TzK(ModelConfig(n_bits=n_bits), registry, flow=flow).double()


def set_prior(model: TzK, spec: str, loc, log_scale=0.0) -> None:
    with torch.no_grad():
        module = model.priors.conditions[model.registry.index(spec)]
        module.loc.copy_(torch.as_tensor(loc, dtype=torch.float64))
        module.log_scale.fill_(log_scale)


def test_zero_temperature_samples_the_prior_mean():
    model = model_with(IdentityFlow((1, 1, 3)))
    set_prior(model, "label=mnist/1", [0.1, 0.5, 0.9])

    x = model.sample(2, "label=mnist/1", temperature=0.0)

    # f is the identity: the image of the mean is floor(a * 256).
    assert x.dtype == torch.uint8
    assert x.tolist() == [[[[25, 128, 230]]]] * 2


def test_zero_temperature_through_a_real_inverse():
    flow = TwoLevelFlow((1, 4, 4))
    model = model_with(flow)
    x0 = torch.randint(0, 256, (16, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                       dtype=torch.uint8)
    model.initialize(x0)
    set_prior(model, "label=mnist/0", torch.linspace(-1, 1, 2 + 8))  # 2 split cells, 8 top

    x = model.sample(3, "label=mnist/0", temperature=0.0)

    module = model.priors.conditions[model.registry.index("label=mnist/0")]
    r = model.priors.layout.to_levels(module.loc.detach()[None])
    mean, _ = flow.inverse(r)
    assert torch.equal(x, model.quantise(mean).expand(3, -1, -1, -1))


def test_a_fixed_seed_gives_the_same_images():
    model = model_with(IdentityFlow((1, 4, 4)))
    set_prior(model, "label=mnist/0", 0.5, math.log(0.1))

    def draw(seed, **options):
        return model.sample(5, temperature=0.8, generator=torch.Generator().manual_seed(seed),
                            **options)

    for options in ({"conditions": "label=mnist/0"}, {"mixture": "label"},
                    {"conditions": ["label=mnist/0", "stroke=thick"]}):
        assert torch.equal(draw(1, **options), draw(1, **options))
        assert not torch.equal(draw(1, **options), draw(2, **options))


def test_samples_keep_n_bits_levels_in_the_8_bit_range():
    model = model_with(IdentityFlow((1, 8, 8)), n_bits=3)
    set_prior(model, "stroke=thick", 0.5, math.log(0.3))

    x = model.sample(20, "stroke=thick", generator=torch.Generator().manual_seed(0))

    assert torch.all(x % 32 == 0)
    assert x.min() == 0 and x.max() == 224          # clamped to the lowest and highest level
    assert len(x.unique()) > 3


def test_a_composition_samples_its_product():
    model = model_with(IdentityFlow((1, 1, 1)))
    set_prior(model, "label=mnist/1", [0.2])
    set_prior(model, "stroke=thick", [0.6], -0.5 * math.log(3.0))

    x = model.sample(1, ["label=mnist/1", "stroke=thick", "dataset=mnist"], temperature=0)

    # dataset=mnist is implied by label=mnist/1; precision 1 + 3 - 1 = 3, mean 2.0 / 3.
    assert x.item() == math.floor(256 * (0.2 + 3 * 0.6) / 3)


def test_non_finite_pixels_are_reported():
    model = model_with(IdentityFlow((1, 1, 2)))
    with pytest.warns(RuntimeWarning, match="1 non-finite sample pixels"):
        x = model.quantise(torch.tensor([[[[float("nan"), 0.5]]]]))
    assert x.tolist() == [[[[0, 128]]]]
    with pytest.raises(BadInputError, match="both conditions and mixture"):
        model.sample(1, "label=mnist/0", mixture="label")
