"""The typed configuration of a multi-scale Glow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tzkcli.errors import BadInputError

COUPLINGS = ("affine", "additive")
# The affine coupling's scale floor (GlowConfig.scale_floor). Models of format version 3 were
# built with 0.5; version 4 made it a field with this default: in the flow benchmark's 300
# steps, floors of 0.1 to 0.05 gave lower test bpd and smaller late spikes than 0.5, and 0.02
# no better (docs/benchmarks.md, session 5).
DEFAULT_SCALE_FLOOR = 0.05


@dataclass(frozen=True)
class GlowConfig:
    """The architecture of a multi-scale Glow (Kingma and Dhariwal 2018).

    Attributes:
        shape: ``(C, H, W)`` of the images the flow sees; ``H`` and ``W`` must be divisible
            by ``2 ** levels`` (each level squeezes 2x2 space into channels).
        levels: number of levels ``L``; every level but the last splits off half its channels.
        steps: flow steps ``K`` per level (actnorm, invertible 1x1 convolution, coupling).
        hidden: channels of the hidden layers of every coupling network.
        coupling: ``"affine"`` (scale ``f + (1 - f) * sigmoid(h + 2)`` in ``(f, 1)``) or
            ``"additive"``.
        scale_floor: the affine coupling's floor ``f``, in ``[0, 1)``: each coupling contracts
            by at most ``1 / f`` towards the latents, and its inverse expands by at most that
            (0 is Glow's unbounded ``sigmoid(h + 2)``). Unused by the additive coupling.

    Invalid values raise :class:`~tzkcli.errors.BadInputError` with one line naming the field,
    the value found and what was expected.
    """

    shape: tuple[int, int, int] = (1, 32, 32)
    levels: int = 3
    steps: int = 8
    hidden: int = 128
    coupling: str = "affine"
    scale_floor: float = DEFAULT_SCALE_FLOOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _check_shape(self.shape))
        for name in ("levels", "steps", "hidden"):
            _check_positive_int(name, getattr(self, name))
        if self.coupling not in COUPLINGS:
            raise BadInputError(
                f"GlowConfig.coupling: found {self.coupling!r}, expected one of {COUPLINGS}"
            )

        floor = self.scale_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) \
                or not 0.0 <= floor < 1.0:
            raise BadInputError(
                f"GlowConfig.scale_floor: found {floor!r}, expected a number in [0, 1)"
            )
        object.__setattr__(self, "scale_floor", float(floor))

        _, height, width = self.shape
        factor = 2**self.levels
        if height % factor or width % factor:
            raise BadInputError(
                f"GlowConfig.shape: found {self.shape}, expected H and W divisible by "
                f"2**levels = {factor}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values; :meth:`from_dict` reads them back."""
        values = asdict(self)
        values["shape"] = list(self.shape)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GlowConfig:
        """Build a config from :meth:`to_dict`'s output, rejecting unknown fields."""
        if not isinstance(values, dict):
            raise BadInputError(f"GlowConfig: found {type(values).__name__}, expected a mapping")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadInputError(
                f"GlowConfig: unknown field {unknown[0]!r}, expected one of {sorted(known)}"
            )
        shape = values.get("shape", cls.shape)
        if isinstance(shape, list):
            shape = tuple(shape)
        return cls(**{**values, "shape": shape})


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(f"GlowConfig.{name}: found {value!r}, expected a positive integer")


def _check_shape(shape: object) -> tuple[int, int, int]:
    valid = (
        isinstance(shape, tuple)
        and len(shape) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    )
    if not valid:
        raise BadInputError(
            f"GlowConfig.shape: found {shape!r}, expected a tuple (C, H, W) of positive integers"
        )
    return shape  # type: ignore[return-value]
