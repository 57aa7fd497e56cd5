"""The multi-scale Glow: round trips, ladj against autograd, state, formats, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from tests.flows.helpers import (
    assert_every_parameter_has_gradient,
    flat,
    jacobian_ladj,
    perturb,
)
from tzkcli.errors import BadInputError, UsageError
from tzkcli.flows import Glow, GlowConfig


def _images(batch: int, shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *shape, generator=generator, dtype=torch.float64)


def _glow(config: GlowConfig, seed: int = 0) -> Glow:
    torch.manual_seed(seed)
    glow = Glow(config).double()
    glow.initialize(_images(32, config.shape, seed=100 + seed))
    perturb(glow, scale=0.05, seed=seed)
    return glow


CONFIGS = {
    "affine-2-levels": GlowConfig(shape=(1, 8, 8), levels=2, steps=2, hidden=8),
    "additive-3-levels": GlowConfig(shape=(1, 8, 8), levels=3, steps=2, hidden=8,
                                    coupling="additive"),
    "rgb-1-level": GlowConfig(shape=(3, 4, 4), levels=1, steps=3, hidden=6),
}


@pytest.fixture(params=sorted(CONFIGS))
def config(request: pytest.FixtureRequest) -> GlowConfig:
    return CONFIGS[request.param]


def _log_p0(r: list[Tensor], ladj: Tensor) -> Tensor:
    dims = sum(part[0].numel() for part in r)
    squares = sum(part.square().flatten(1).sum(dim=1) for part in r)
    return -0.5 * squares - 0.5 * dims * math.log(2 * math.pi) + ladj


def test_latent_shapes_follow_the_levels() -> None:
    glow = Glow(GlowConfig(shape=(1, 32, 32), levels=3, steps=1, hidden=4))
    assert glow.latent_shapes == [(2, 16, 16), (4, 8, 8), (16, 4, 4)]
    assert sum(c * h * w for c, h, w in glow.latent_shapes) == 32 * 32


def test_inverse_of_forward_is_identity(config: GlowConfig) -> None:
    glow = _glow(config)
    x = _images(4, config.shape, seed=1)
    r, ladj = glow(x)
    x_back, ladj_inverse = glow.inverse(r)

    assert [tuple(part.shape[1:]) for part in r] == glow.latent_shapes
    assert ladj.shape == (4,)
    assert (x_back - x).abs().max() < 1e-10
    assert (ladj + ladj_inverse).abs().max() < 1e-10


def test_inverse_works_from_any_residuals(config: GlowConfig) -> None:
    glow = _glow(config)
    generator = torch.Generator().manual_seed(5)
    r = [0.7 * torch.randn(3, *shape, generator=generator, dtype=torch.float64)
         for shape in glow.latent_shapes]
    x, _ = glow.inverse(r)
    r_back, _ = glow(x)

    assert torch.isfinite(x).all()
    assert (flat(r_back) - flat(r)).abs().max() < 1e-10


def test_ladj_equals_the_jacobian_log_determinant(config: GlowConfig) -> None:
    glow = _glow(config)
    x = _images(2, config.shape, seed=2)
    _, ladj = glow(x)

    for b in range(2):
        expected = jacobian_ladj(lambda v: glow(v)[0], x[b : b + 1])
        assert abs(ladj[b] - expected) < 1e-9


def test_ladj_is_not_trivial_and_includes_the_priors(config: GlowConfig) -> None:
    glow = _glow(config)
    x = _images(2, config.shape, seed=3)
    _, ladj = glow(x)
    with torch.no_grad():
        glow.top.log_sigma.add_(1.0)
    _, ladj_wider = glow(x)

    assert (ladj - ladj_wider - glow.top.log_sigma[0].numel()).abs().max() < 1e-9


def test_a_gradient_reaches_every_parameter(config: GlowConfig) -> None:
    glow = _glow(config)
    r, ladj = glow(_images(4, config.shape, seed=4))
    (-_log_p0(r, ladj).mean()).backward()
    assert_every_parameter_has_gradient(glow)


def test_initialize_standardises_the_first_actnorm_and_is_idempotent() -> None:
    config = CONFIGS["affine-2-levels"]
    glow = Glow(config).double()
    x = _images(64, config.shape)
    glow.initialize(x)
    first = glow.levels[0][0].actnorm
    y, _ = first(glow.squeeze(x - 0.5)[0])
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-10

    before = copy.deepcopy(glow.state_dict())
    glow.initialize(_images(64, config.shape, seed=9) * 0.1)
    for name, value in glow.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_forward_and_inverse_refuse_to_run_uninitialised() -> None:
    config = CONFIGS["affine-2-levels"]
    glow = Glow(config)
    with pytest.raises(UsageError, match=r"call glow.initialize\(x\)"):
        glow(torch.rand(2, *config.shape))
    with pytest.raises(UsageError, match="not initialised"):
        glow.inverse([torch.zeros(2, *shape) for shape in glow.latent_shapes])


def test_state_dict_round_trip_is_bit_for_bit_and_stays_initialised(
    config: GlowConfig, tmp_path
) -> None:
    glow = _glow(config)
    path = tmp_path / "glow.pt"
    torch.save(glow.state_dict(), path)

    loaded = Glow(config).double()
    assert not loaded.is_initialised
    loaded.load_state_dict(torch.load(path, weights_only=True))
    assert loaded.is_initialised
    loaded.initialize(_images(32, config.shape, seed=11))

    x = _images(3, config.shape, seed=12)
    r, ladj = glow(x)
    r_loaded, ladj_loaded = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(r, r_loaded))
    assert torch.equal(ladj, ladj_loaded)
    assert torch.equal(glow.inverse(r)[0], loaded.inverse(r)[0])


def test_channels_last_gives_the_same_results() -> None:
    config = CONFIGS["rgb-1-level"]
    glow = _glow(config)
    fast = copy.deepcopy(glow).to(memory_format=torch.channels_last)
    x = _images(3, config.shape, seed=13)

    r, ladj = glow(x)
    r_last, ladj_last = fast(x.contiguous(memory_format=torch.channels_last))
    x_back, _ = fast.inverse(r_last)

    assert (flat(r_last) - flat(r)).abs().max() < 1e-12
    assert (ladj_last - ladj).abs().max() < 1e-10
    assert (x_back - x).abs().max() < 1e-10


def test_a_channels_last_flow_runs_every_level_of_a_gray_image_in_channels_last() -> None:
    glow = Glow(GlowConfig(shape=(1, 16, 16), levels=2, steps=1, hidden=8))
    glow = glow.to(memory_format=torch.channels_last)
    assert glow.memory_format() == torch.channels_last
    layouts = []
    for steps in glow.levels:
        steps[0].register_forward_pre_hook(
            lambda _, inputs: layouts.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last)
                and not inputs[0].is_contiguous()))

    glow.initialize(torch.rand(8, 1, 16, 16))
    glow(torch.rand(8, 1, 16, 16))

    assert layouts == [True, True, True, True]  # initialise, then forward, at both levels
    assert Glow(glow.config).memory_format() == torch.contiguous_format


def test_float32_round_trip_on_the_benchmark_architecture() -> None:
    torch.manual_seed(0)
    glow = Glow(GlowConfig(shape=(1, 16, 16), levels=3, steps=2, hidden=16))
    x = torch.rand(8, 1, 16, 16)
    glow.initialize(x)
    r, ladj = glow(x)
    x_back, _ = glow.inverse(r)

    assert r[0].dtype == torch.float32
    assert (x_back - x).abs().max() < 1e-4


def test_wrong_input_shapes_raise_one_line_errors() -> None:
    glow = _glow(CONFIGS["affine-2-levels"])
    with pytest.raises(BadInputError, match=r"found shape \(2, 1, 16, 16\), expected \(-1, 1"):
        glow(torch.rand(2, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(BadInputError, match="found dtype torch.uint8"):
        glow(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(BadInputError, match="found 1 levels, expected a list of 2"):
        glow.inverse([torch.zeros(2, 2, 4, 4)])
    wrong_top = r"r\[1\]: found shape \(2, 4, 2, 2\), expected \(2, 8"
    with pytest.raises(BadInputError, match=wrong_top):
        glow.inverse([torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 2, 2)])
