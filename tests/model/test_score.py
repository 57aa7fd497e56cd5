"""bits/dim as MODEL.md defines it, its parts, and one flow pass for any number of conditions."""

from __future__ import annotations

import math

import pytest
import torch

from tests.model.flows import CountingFlow, IdentityFlow, TwoLevelFlow
from tzkcli.errors import BadInputError
from tzkcli.knowledge import Registry
from tzkcli.model import ModelConfig, TzK

LOG_2PI = math.log(2 * math.pi)


def digits_registry(labels: int = 3) -> Registry:
    registry = Registry()
    registry.add_kind("label")
    registry.add_condition("dataset", "mnist")
    for digit in range(labels):
        registry.add_condition("label", f"mnist/{digit}")
    return registry


def identity_model(shape=(1, 1, 2), n_bits: int = 8, flow=None, labels: int = 3) -> TzK:
    flow = IdentityFlow(shape) if flow is None else flow
    return TzK(ModelConfig(n_bits=n_bits), digits_registry(labels), flow=flow).double()


def noise(shape, seed: int) -> torch.Tensor:
    """The dequantisation noise the model draws from a generator seeded with ``seed``."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n_bits", [8, 3])
def test_bpd_of_a_hand_computed_case(n_bits):
    model = identity_model(n_bits=n_bits)
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)

    scores = model.score(x, ["label=mnist/1"], generator=torch.Generator().manual_seed(0))

    # By hand: pixels 0 and 255 keep 0 and 2^n - 1 levels; x~ = (level + u) / 2^n, D = 2.
    u = noise((1, 1, 1, 2), 0).flatten().tolist()
    levels = [0, 2**n_bits - 1]
    xt = [(v + e) / 2**n_bits for v, e in zip(levels, u)]
    nats_base = sum(t * t / 2 + LOG_2PI / 2 for t in xt)
    expected_base = nats_base / (2 * math.log(2)) + n_bits
    assert scores.bpd_base.item() == pytest.approx(expected_base, abs=1e-12)
    assert scores.parts.dequantisation == n_bits
    assert scores.parts.ladj.item() == 0
    assert scores.dims == 2

    # The gaussian prior of label=mnist/1 at its start is p_0 itself.
    assert scores.bpd[0, 0].item() == pytest.approx(expected_base, abs=1e-12)


def test_bpd_of_a_shifted_scaled_condition():
    model = identity_model()
    k = model.registry.index("label=mnist/2")
    with torch.no_grad():
        model.priors.conditions[k].loc.fill_(0.5)
        model.priors.conditions[k].log_scale.fill_(math.log(2.0))
    x = torch.tensor([[[[10, 200]]]], dtype=torch.uint8)

    scores = model.score(x, [k], generator=torch.Generator().manual_seed(3))

    u = noise((1, 1, 1, 2), 3).flatten().tolist()
    xt = [(10 + u[0]) / 256, (200 + u[1]) / 256]
    nats = sum((t - 0.5) ** 2 / 8 + math.log(2.0) + LOG_2PI / 2 for t in xt)
    assert scores.bpd[0, 0].item() == pytest.approx(nats / (2 * math.log(2)) + 8, abs=1e-12)


def test_parts_add_up_to_bpd_with_a_non_zero_ladj():
    flow = TwoLevelFlow((1, 4, 4))
    model = identity_model(shape=(1, 4, 4), flow=flow)
    x = torch.randint(0, 256, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    model.initialize(x, torch.Generator().manual_seed(1))

    scores = model.score(x, generator=torch.Generator().manual_seed(2))

    parts = scores.parts
    assert torch.all(parts.ladj != 0)
    torch.testing.assert_close(scores.bpd_base, parts.prior_base + parts.ladj + 8.0,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(scores.bpd, parts.prior + (parts.ladj + 8.0)[:, None],
                               rtol=0, atol=1e-12)
    r, ladj = flow(model.dequantise(x, torch.Generator().manual_seed(2)))
    log_base = sum((-0.5 * level**2 - LOG_2PI / 2).sum(dim=(1, 2, 3)) for level in r)
    expected = -(log_base + ladj - 16 * 8 * math.log(2)) / (16 * math.log(2))
    torch.testing.assert_close(scores.bpd_base, expected, rtol=0, atol=1e-12)


def test_the_flow_runs_once_for_one_or_a_hundred_conditions():
    flow = CountingFlow((1, 2, 2))
    model = identity_model(shape=(1, 2, 2), flow=flow, labels=99)
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    assert len(model.registry) == 100

    one = model.score(x, [5])
    assert flow.calls == 1
    hundred = model.score(x, list(range(100)))
    assert flow.calls == 2

    assert hundred.bpd.shape == (4, 100) and one.bpd.shape == (4, 1)
    model.posterior(x, "label")
    model.objective(x, torch.tensor([[0, 3]] * 4))
    assert flow.calls == 4


def test_scores_accept_specs_and_reject_bad_images():
    model = identity_model()
    x = torch.zeros(2, 1, 1, 2, dtype=torch.uint8)
    assert model.score(x, ["label=mnist/0", 0]).conditions == [1, 0]
    with pytest.raises(BadInputError, match="images x: found torch.float32"):
        model.score(x.float())
    with pytest.raises(BadInputError, match=r"expected C\*H\*W = 2"):
        model.score(torch.zeros(2, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(BadInputError, match="nearest: label=mnist/1"):
        model.score(x, ["label=mnist/11"])


def test_priors_stay_float32_when_the_flow_returns_bfloat16():
    class HalfFlow(IdentityFlow):
        def forward(self, x):
            return [x.to(torch.bfloat16)], x.new_zeros(x.shape[0]).to(torch.bfloat16)

    model = TzK(ModelConfig(), digits_registry(), flow=HalfFlow((1, 1, 2)))
    scores = model.score(torch.zeros(2, 1, 1, 2, dtype=torch.uint8))
    assert scores.bpd.dtype == torch.float32 and scores.log_prior_base.dtype == torch.float32


def test_a_composition_is_scored_from_its_closed_form():
    model = identity_model()
    model.registry.add_kind("stroke")
    model.add_condition("stroke", "thick")
    with torch.no_grad():
        model.priors.conditions[2].loc.fill_(0.3)
        model.priors.conditions[4].log_scale.fill_(-0.2)
    x = torch.tensor([[[[40, 90]]]], dtype=torch.uint8)

    bpd, composition = model.score_composition(
        x, ["label=mnist/1", "stroke=thick", "dataset=mnist"], torch.Generator().manual_seed(0))

    # precision exp(0) + exp(0.4) - 1, mean 0.3 / precision, per pixel
    precision = math.exp(0.4)
    mean = 0.3 / precision
    u = noise((1, 1, 1, 2), 0).flatten().tolist()
    xt = [(40 + u[0]) / 256, (90 + u[1]) / 256]
    nats = sum(precision * (t - mean) ** 2 / 2 - 0.5 * math.log(precision) + LOG_2PI / 2
               for t in xt)
    assert composition.dropped == (0,) and composition.conditions == (2, 4)
    assert bpd.item() == pytest.approx(nats / (2 * math.log(2)) + 8, abs=1e-12)


def test_a_callers_bf16_autocast_does_not_lower_the_priors():
    model = TzK(ModelConfig(), digits_registry(), flow=IdentityFlow((1, 4, 4)))
    with torch.no_grad():
        for parameter in model.priors.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)

    plain = model.score(x, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.score(x, generator=torch.Generator().manual_seed(1))

    assert mixed.bpd.dtype == torch.float32
    assert torch.equal(mixed.bpd, plain.bpd)
