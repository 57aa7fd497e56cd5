"""Checks shared by the flow tests: Jacobians, perturbation, flattening."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def flat(y: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """One image's output(s) as a vector, in a fixed order."""
    if isinstance(y, Tensor):
        return y.reshape(-1)
    return torch.cat([part.reshape(-1) for part in y])


def jacobian_ladj(function: Callable[[Tensor], object], x: Tensor) -> Tensor:
    """``log|det J|`` of ``function`` at one input ``x`` (batch of 1), by autograd."""
    jacobian = torch.autograd.functional.jacobian(lambda v: flat(function(v)), x)
    jacobian = jacobian.reshape(jacobian.shape[0], -1)
    sign, logabsdet = torch.linalg.slogdet(jacobian)
    assert sign != 0
    return logabsdet


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Move every parameter off its (often zero) initial value, so no layer is trivial."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        parameter.add_(scale * noise)


def assert_every_parameter_has_gradient(module: nn.Module) -> None:
    names = [name for name, p in module.named_parameters()]
    assert names, "module has no parameters"
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{name} received no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} received a zero gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
