"""The training configuration: precedence, unknown keys, prior forms, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tzkcli.errors import BadInputError, UsageError
from tzkcli.training.config import (
    DEFAULT_STEPS,
    TrainConfig,
    parse_prior_flags,
    parse_prior_form,
    read_config_file,
    resolve,
    to_toml,
)


def test_flags_override_file_override_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nbatch_size = 32\n[prior]\nlabel = "bottleneck:4"\n')
    config = resolve(read_config_file(path), {"batch_size": 16, "seed": None}, str(path))

    assert config.lr == 0.01
    assert config.batch_size == 16
    assert config.seed == TrainConfig().seed
    assert config.priors() == {"label": ("bottleneck", 4)}


def test_default_budget_is_steps_only_when_no_budget_given() -> None:
    assert resolve({}, {}, "flags").steps == DEFAULT_STEPS
    config = resolve({}, {"time_budget": 5.0}, "flags")
    assert config.steps is None and config.time_budget == 5.0


def test_unknown_key_names_the_nearest_valid_key(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("batchsize = 32\n")
    with pytest.raises(BadInputError, match=r"unknown key 'batchsize'.*'batch_size'"):
        read_config_file(path)


def test_wrong_type_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('lr = "fast"\n')
    with pytest.raises(BadInputError, match=r"lr = 'fast' has the wrong type; expected float"):
        resolve(read_config_file(path), {}, str(path))


def test_not_toml_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("lr = = 1\n")
    with pytest.raises(BadInputError, match="not valid TOML"):
        read_config_file(path)


@pytest.mark.parametrize("text, expected", [
    ("gaussian", ("gaussian", None)), ("bottleneck:8", ("bottleneck", 8)),
])
def test_prior_forms(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_prior_form("label", text) == expected


@pytest.mark.parametrize("text, message", [
    ("gausian", "unknown prior form 'gausian'.*did you mean 'gaussian'"),
    ("bottleneck", "bottleneck rank '' is not a positive integer"),
    ("bottleneck:0", "bottleneck rank '0'"),
    ("gaussian:2", "gaussian takes no rank"),
])
def test_bad_prior_forms(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_prior_form("label", text)


def test_prior_flag_needs_kind_and_form() -> None:
    assert parse_prior_flags(["label=bottleneck:2"]) == {"label": "bottleneck:2"}
    with pytest.raises(UsageError, match="expected KIND=FORM"):
        parse_prior_flags(["bottleneck:2"])


@pytest.mark.parametrize("flags, message", [
    ({"optimizer": "sgd"}, "--optimizer sgd: expected one of adam, adamax"),
    ({"batch_size": 0}, "--batch-size 0: expected an integer >= 1"),
    ({"label_fraction": 1.5}, "--label-fraction 1.5"),
    ({"steps": 0}, "--steps 0"),
    ({"impute": "mean"}, "--impute mean"),
])
def test_out_of_range_flags(flags: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve({}, flags, "flags")


def test_the_scale_floor_default_is_the_flows(tmp_path: Path) -> None:
    from tzkcli.flows.config import DEFAULT_SCALE_FLOOR

    assert TrainConfig().scale_floor == DEFAULT_SCALE_FLOOR


def test_resolved_toml_reads_back_equal(tmp_path: Path) -> None:
    config = resolve({}, {"lr": 3e-4, "prior": {"label": "bottleneck:3"}, "epochs": 2.5},
                     "flags")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))

    assert resolve(read_config_file(path), {}, str(path)) == config
