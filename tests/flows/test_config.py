"""GlowConfig validation and its plain-dict round trip."""

from __future__ import annotations

import dataclasses

import pytest

from tzkcli.errors import BadInputError
from tzkcli.flows import GlowConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"levels": 0}, "GlowConfig.levels: found 0, expected a positive integer"),
        ({"steps": 2.5}, "GlowConfig.steps: found 2.5, expected a positive integer"),
        ({"hidden": True}, "GlowConfig.hidden: found True, expected a positive integer"),
        ({"coupling": "spline"}, "GlowConfig.coupling: found 'spline', expected one of"),
        ({"scale_floor": 1.0}, "GlowConfig.scale_floor: found 1.0, expected a number in [0, 1)"),
        ({"scale_floor": -0.1}, "GlowConfig.scale_floor: found -0.1, expected a number in"),
        ({"scale_floor": "0.1"}, "GlowConfig.scale_floor: found '0.1', expected a number in"),
        ({"scale_floor": True}, "GlowConfig.scale_floor: found True, expected a number in"),
        ({"shape": (32, 32)}, "GlowConfig.shape: found (32, 32), expected a tuple (C, H, W)"),
        ({"shape": (1, 0, 32)}, "GlowConfig.shape: found (1, 0, 32), expected a tuple"),
        ({"shape": (1, 28, 28)}, "GlowConfig.shape: found (1, 28, 28), expected H and W "
                                 "divisible by 2**levels = 8"),
    ],
)
def test_invalid_fields_raise_one_line_errors(fields: dict, message: str) -> None:
    with pytest.raises(BadInputError) as caught:
        GlowConfig(**fields)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_config_is_frozen_and_round_trips_through_a_dict() -> None:
    config = GlowConfig(shape=(3, 16, 16), levels=2, steps=4, hidden=32, coupling="additive",
                        scale_floor=0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.levels = 5  # type: ignore[misc]

    values = config.to_dict()
    assert values["shape"] == [3, 16, 16]
    assert values["scale_floor"] == 0.25
    assert GlowConfig.from_dict(values) == config


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(BadInputError, match="GlowConfig: unknown field 'depth'"):
        GlowConfig.from_dict({"depth": 3})
