"""Each invertible layer: round trip, ladj against autograd, gradients, state, formats."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.flows.helpers import (
    assert_every_parameter_has_gradient,
    flat,
    jacobian_ladj,
    perturb,
)
from tzkcli.errors import UsageError
from tzkcli.flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowStep,
    Glow,
    GlowConfig,
    InvConv1x1,
    Split,
    Squeeze,
    Standardize,
)
from tzkcli.flows.layers import LOG_SCALE_FACTOR, LOG_SIGMA_BOUND, ZeroConv2d

SHAPE = (4, 4, 4)


def _initialised_actnorm() -> nn.Module:
    layer = ActNorm(4).double()
    layer.initialize(3.0 + 2.0 * torch.randn(16, *SHAPE, dtype=torch.float64))
    return layer


def _step(coupling: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        step = FlowStep(4, 8, coupling).double()
        step.actnorm.initialize(torch.randn(16, *SHAPE, dtype=torch.float64))
        return step

    return build


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "actnorm": _initialised_actnorm,
    "invconv": lambda: InvConv1x1(4).double(),
    "affine": lambda: AffineCoupling(4, 8).double(),
    "additive": lambda: AdditiveCoupling(4, 8).double(),
    "squeeze": lambda: Squeeze().double(),
    "split": lambda: Split(4).double(),
    "standardize": lambda: Standardize(SHAPE).double(),
    "step-affine": _step("affine"),
    "step-additive": _step("additive"),
}


@pytest.fixture(params=sorted(LAYERS))
def layer(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    module = LAYERS[request.param]()
    perturb(module)
    return module


def _input(batch: int = 3, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *SHAPE, generator=generator, dtype=torch.float64)


def test_inverse_of_forward_is_identity(layer: nn.Module) -> None:
    x = _input()
    y, ladj = layer(x)
    x_back, ladj_inverse = layer.inverse(y)

    assert ladj.shape == (3,)
    assert (x_back - x).abs().max() < 1e-10
    assert (ladj + ladj_inverse).abs().max() < 1e-10


def test_forward_of_inverse_is_identity(layer: nn.Module) -> None:
    y, _ = layer(_input())
    y_new = tuple(2.0 * part for part in y) if isinstance(y, tuple) else 2.0 * y
    y_back, _ = layer(layer.inverse(y_new)[0])

    assert (flat(y_back) - flat(y_new)).abs().max() < 1e-10


def test_ladj_equals_the_jacobian_log_determinant(layer: nn.Module) -> None:
    x = _input(batch=2)
    y, ladj = layer(x)
    _, ladj_inverse = layer.inverse(y)

    for b in range(2):
        expected = jacobian_ladj(lambda v: layer(v)[0], x[b : b + 1])
        assert abs(ladj[b] - expected) < 1e-9
        y_b = tuple(part[b : b + 1] for part in y) if isinstance(y, tuple) else y[b : b + 1]
        expected_inverse = jacobian_ladj(lambda v: layer.inverse(_unflat(v, y_b))[0], flat(y_b))
        assert abs(ladj_inverse[b] - expected_inverse) < 1e-9


def _unflat(v: Tensor, like: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    if isinstance(like, Tensor):
        return v.reshape(like.shape)
    parts, start = [], 0
    for part in like:
        parts.append(v[start : start + part.numel()].reshape(part.shape))
        start += part.numel()
    return tuple(parts)


def test_a_gradient_reaches_every_parameter(layer: nn.Module) -> None:
    if not list(layer.parameters()):
        pytest.skip("squeeze has no parameters")
    y, ladj = layer(_input())
    loss = 0.5 * flat(y).square().sum() - ladj.sum()
    loss.backward()
    assert_every_parameter_has_gradient(layer)


def test_channels_last_gives_the_same_results(layer: nn.Module) -> None:
    x = _input()
    fast = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)

    y, ladj = layer(x)
    y_last, ladj_last = fast(x_last)
    x_back, _ = fast.inverse(y_last)

    assert (flat(y_last) - flat(y)).abs().max() < 1e-12
    assert (ladj_last - ladj).abs().max() < 1e-12
    assert (x_back - x).abs().max() < 1e-10


def test_squeeze_keeps_channels_last_and_moves_blocks_into_channels() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    y, _ = Squeeze()(x.contiguous(memory_format=torch.channels_last))

    assert y.shape == (2, 12, 2, 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # channel 4c + 2i + j holds input channel c at offset (i, j) of each 2x2 block
    assert torch.equal(y[:, 4 * 1 + 2 * 1 + 0], x[:, 1, 1::2, 0::2])


def test_actnorm_initialisation_standardises_and_is_idempotent() -> None:
    layer = ActNorm(4).double()
    x = 3.0 + 2.0 * _input(batch=64)
    layer.initialize(x)
    y, _ = layer(x)

    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-10
    assert (y.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-10

    before = copy.deepcopy(layer.state_dict())
    layer.initialize(-5.0 + 0.1 * _input(batch=64, seed=7))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_actnorm_refuses_to_run_uninitialised() -> None:
    layer = ActNorm(4)
    with pytest.raises(UsageError, match="actnorm is not initialised"):
        layer(torch.zeros(1, *SHAPE))
    with pytest.raises(UsageError, match="actnorm is not initialised"):
        layer.inverse(torch.zeros(1, *SHAPE))


def test_actnorm_state_dict_carries_initialisation(tmp_path) -> None:
    layer = _initialised_actnorm()
    torch.save(layer.state_dict(), tmp_path / "actnorm.pt")

    loaded = ActNorm(4).double()
    loaded.load_state_dict(torch.load(tmp_path / "actnorm.pt", weights_only=True))
    assert loaded.is_initialised
    assert bool(loaded.initialised)

    x = _input()
    assert torch.equal(loaded(x)[0], layer(x)[0])
    loaded.initialize(_input(batch=64, seed=9))
    assert torch.equal(loaded(x)[0], layer(x)[0])


def test_invconv_weight_matches_its_lu_factors_and_inverse() -> None:
    torch.manual_seed(3)
    layer = InvConv1x1(5).double()
    perturb(layer)
    weight = layer.weight()

    assert abs(torch.linalg.slogdet(weight)[1] - layer.log_s.sum()) < 1e-12
    eye = torch.eye(5, dtype=torch.float64)
    assert (layer.inverse_weight() @ weight - eye).abs().max() < 1e-12


def test_new_couplings_and_priors_start_as_fixed_maps() -> None:
    x = _input()
    y, ladj = AdditiveCoupling(4, 8).double()(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(3, dtype=torch.float64))

    (h, r), ladj = Split(4).double()(x)
    assert torch.equal(torch.cat([h, r], dim=1), x) and not ladj.any()

    layer = AffineCoupling(4, 8).double()
    y, ladj = layer(x)
    floor = layer.scale_floor
    scale = floor + (1 - floor) * torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    assert (y[:, 2:] - x[:, 2:] * scale).abs().max() < 1e-14
    assert (ladj - 2 * 16 * scale.log()).abs().max() < 1e-12


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_flow_step_equals_the_composition_of_its_layers(coupling: str) -> None:
    torch.manual_seed(4)
    step = _step(coupling)()
    perturb(step)
    x = _input()

    y, ladj = step(x)
    expected, expected_ladj = x, torch.zeros(3, dtype=torch.float64)
    for layer in (step.actnorm, step.invconv, step.coupling):
        expected, part = layer(expected)
        expected_ladj = expected_ladj + part

    assert (y - expected).abs().max() < 1e-12
    assert (ladj - expected_ladj).abs().max() < 1e-10
    x_back, _ = step.inverse(y)
    for layer in (step.coupling, step.invconv, step.actnorm):
        expected, _ = layer.inverse(expected)
    assert (x_back - expected).abs().max() < 1e-12


@pytest.mark.parametrize("floor", [0.05, 0.5])
@pytest.mark.parametrize("raw", [-40.0, 40.0])
def test_affine_scale_is_bounded_in_both_directions(raw: float, floor: float) -> None:
    # A saturated scale network (raw -40: sigmoid ~ 4e-18) must neither blow up the latents
    # (dividing by sigmoid there trained in spikes) nor the samples (dividing on the way back):
    # towards the latents the scale is in (floor, 1), back it divides by at most 1 / floor.
    layer = AffineCoupling(4, 8, scale_floor=floor).double()
    with torch.no_grad():
        layer.net[-1].conv.bias[2:].fill_(raw)  # scale channels; the shift stays 0
    x = 1e3 * _input()

    y, ladj = layer(x)
    assert (y[:, 2:].abs() <= x[:, 2:].abs()).all()
    assert (y[:, 2:].abs() >= floor * x[:, 2:].abs() * (1 - 1e-12)).all()
    assert (ladj <= 0).all() and (ladj >= 2 * 16 * math.log(floor) - 1e-9).all()

    x_back, ladj_back = layer.inverse(x)
    assert torch.isfinite(x_back).all()
    assert (x_back[:, 2:].abs() <= x[:, 2:].abs() / floor * (1 + 1e-12)).all()
    assert (layer(x_back)[0] - x).abs().max() / 1e3 < 1e-12
    assert (ladj_back + layer(x_back)[1]).abs().max() < 1e-9
    if raw < 0:  # saturated: the floor itself
        assert (y[:, 2:] / x[:, 2:] - floor).abs().max() < 1e-12


def test_a_glow_builds_its_couplings_with_the_configs_floor() -> None:
    glow = Glow(GlowConfig(shape=(1, 8, 8), levels=2, steps=2, hidden=8, scale_floor=0.25))
    floors = {m.scale_floor for m in glow.modules() if isinstance(m, AffineCoupling)}
    assert floors == {0.25}
    assert GlowConfig().scale_floor == 0.05


@pytest.mark.parametrize("raw", [-40.0, 40.0])
def test_split_prior_sigma_is_bounded_in_both_directions(raw: float) -> None:
    # A saturated split prior (raw -40: sigma ~ 4e-18 unbounded) must neither blow up the
    # residuals on the way to the latents nor the samples on the way back.
    layer = Split(4).double()
    with torch.no_grad():
        layer.prior.bias[2:].fill_(raw)  # log sigma channels; the mean stays 0
    x = _input()

    (h, r), ladj = layer(x)
    bound = math.exp(LOG_SIGMA_BOUND)
    assert (r.abs() <= bound * x[:, 2:].abs() + 1e-12).all()
    assert (r.abs() >= x[:, 2:].abs() / bound - 1e-12).all()
    assert (ladj.abs() <= 2 * 16 * LOG_SIGMA_BOUND + 1e-9).all()

    x_back, ladj_back = layer.inverse((h, x[:, 2:]))
    assert torch.isfinite(x_back).all()
    assert (x_back[:, 2:].abs() <= bound * x[:, 2:].abs() + 1e-12).all()
    assert (layer(x_back)[0][1] - x[:, 2:]).abs().max() < 1e-12
    assert (ladj_back + layer(x_back)[1]).abs().max() < 1e-9



def test_actnorm_log_scale_is_stored_divided_by_the_factor_and_moves_faster() -> None:
    # Glow's parameterisation: a first Adam step moves every parameter by its learning rate,
    # so the effective log scale moves LOG_SCALE_FACTOR times as far.
    layer = ActNorm(SHAPE[0]).double()
    x = _input(batch=16)
    layer.initialize(x)
    std = x.std(dim=(0, 2, 3), keepdim=True, correction=0)
    assert torch.allclose(layer.log_scale, -torch.log(std))
    assert torch.allclose(LOG_SCALE_FACTOR * layer.raw_log_scale, layer.log_scale)

    before = layer.log_scale.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    y, ladj = layer(x)
    (y.square().sum() - ladj.sum()).backward()
    optimizer.step()
    moved = (layer.log_scale.detach() - before).abs()
    assert torch.allclose(moved, torch.full_like(moved, LOG_SCALE_FACTOR * 1e-3), rtol=1e-3)


def test_zero_conv_starts_at_zero_and_scales_its_output_by_its_gain() -> None:
    layer = ZeroConv2d(3, 2).double()
    x = _input()[:, :3]
    assert torch.equal(layer(x), torch.zeros(3, 2, *SHAPE[1:], dtype=torch.float64))

    with torch.no_grad():
        nn.init.normal_(layer.conv.weight)
        layer.raw_log_gain.fill_(math.log(2.0) / LOG_SCALE_FACTOR)
    assert torch.allclose(layer(x), 2 * layer.conv(x))
