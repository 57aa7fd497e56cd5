"""The typed training configuration: defaults < TOML file (``--config``) < flags.

Every field of :class:`TrainConfig` is a flag of ``tzk train`` with the same name
(``batch_size`` is ``--batch-size``) and a key of the TOML file, written flat at its top level::

    batch_size = 64
    lr = 1e-3
    levels = 2

    [prior]
    label = "bottleneck:8"

The resolved configuration is saved in the run directory as ``config.toml`` and is the first
record of ``metrics.jsonl``; a resumed run reads it back and only the budget
(``steps``, ``epochs``, ``time_budget``) and the reporting fields may change.

Prior forms (``--prior KIND=FORM``, repeatable; ``[prior]`` in the file): ``gaussian``, or
``bottleneck:Q`` with rank ``Q >= 1``. A kind not named gets ``gaussian``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tzkcli.errors import BadInputError, UsageError

DEFAULT_STEPS = 1000  # the budget when none of steps, epochs, time_budget is given
PRIOR_FORMS = ("gaussian", "bottleneck")
OPTIMIZERS = ("adam", "adamax")
IMPUTE = ("posterior", "prior", "none")
BALANCE = ("none", "dataset")
PRECISIONS = ("float32", "bf16")
COUPLINGS = ("affine", "additive")

# Fields that a resumed run may change; everything else must match the saved configuration.
RESUMABLE = frozenset({
    "steps", "epochs", "time_budget", "log_every", "val_every", "checkpoint_every",
    "keep_last", "quiet", "workers", "device",
})


@dataclass
class TrainConfig:
    """Everything that decides a training run; see docs/training.md for each field."""

    # budget: the first of steps / epochs / time_budget that is reached stops the run
    steps: int | None = None
    epochs: float | None = None
    time_budget: float | None = None

    # model
    levels: int = 3
    flow_steps: int = 8
    hidden: int = 128
    coupling: str = "affine"
    scale_floor: float = 0.05  # tzkcli.flows.config.DEFAULT_SCALE_FLOOR (no torch import here)
    n_bits: int = 8
    prior: dict[str, str] = field(default_factory=dict)

    # objective
    beta: float = 0.01
    impute: str = "posterior"

    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    warmup: int = 200
    grad_clip: float = 50.0
    batch_size: int = 64
    weight_decay: float = 0.0

    # data
    kinds: str = ""  # comma-separated kinds to learn besides dataset; empty: every kind
    balance: str = "none"
    label_fraction: float = 1.0
    seed: int = 0
    train_split: str = "train"
    val_split: str = "test"
    val_images: int = 2000
    workers: int = 0

    # non-finite losses
    max_bad_steps: int = 3
    bad_lr_factor: float = 0.1
    max_recoveries: int = 1

    # hardware
    device: str = "auto"
    precision: str = "float32"

    # reporting and checkpoints
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 3
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (JSON and TOML friendly)."""
        return dataclasses.asdict(self)

    def kind_names(self) -> list[str] | None:
        """The kinds named by :attr:`kinds` (``dataset`` always among them), or ``None``: all."""
        if not self.kinds.strip():
            return None
        names = [name.strip() for name in self.kinds.split(",") if name.strip()]
        return ["dataset"] + [name for name in dict.fromkeys(names) if name != "dataset"]

    def priors(self) -> dict[str, tuple[str, int | None]]:
        """``{kind: (form, rank)}`` parsed from :attr:`prior`; rank is ``None`` for gaussian."""
        return {kind: parse_prior_form(kind, text) for kind, text in self.prior.items()}


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def nearest(name: str, choices: tuple[str, ...] | list[str]) -> str:
    """The valid name closest to ``name`` (for "did you mean" messages)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return close[0] if close else choices[0]


def parse_prior_form(kind: str, text: str) -> tuple[str, int | None]:
    """Parse ``gaussian`` or ``bottleneck:Q`` for ``kind``.

    Raises:
        UsageError: an unknown form or a rank that is not a positive integer.
    """
    if not (kind + text).isprintable():  # keeps the error below on one printable line
        raise UsageError(f"--prior {kind!r}={text!r}: not printable; expected KIND=FORM, "
                         "e.g. label=bottleneck:8")
    form, _, rank_text = text.strip().partition(":")
    if form not in PRIOR_FORMS:
        raise UsageError(
            f"--prior {kind}={text}: unknown prior form {form!r}; expected one of "
            f"gaussian, bottleneck:Q (did you mean {nearest(form, PRIOR_FORMS)!r}?)"
        )
    if form == "gaussian":
        if rank_text:
            raise UsageError(f"--prior {kind}={text}: gaussian takes no rank; expected gaussian")
        return form, None
    if not rank_text.isdigit() or int(rank_text) < 1:
        raise UsageError(
            f"--prior {kind}={text}: bottleneck rank {rank_text!r} is not a positive integer; "
            "expected bottleneck:Q with Q >= 1"
        )
    return form, int(rank_text)


def parse_prior_flags(values: list[str]) -> dict[str, str]:
    """``["label=bottleneck:8", ...]`` → ``{"label": "bottleneck:8"}`` (forms validated)."""
    parsed: dict[str, str] = {}
    for value in values:
        kind, sep, form = value.partition("=")
        if not sep or not kind or not form:
            raise UsageError(f"--prior {value!r}: expected KIND=FORM, e.g. label=bottleneck:8")
        parse_prior_form(kind, form)
        parsed[kind] = form
    return parsed


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into flat overrides.

    Raises:
        BadInputError: the file is missing or not TOML, or a key is unknown (the message names
            the nearest valid key).
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"--config {path}: file not found; expected a TOML file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        line = " ".join(str(error).split())
        raise BadInputError(f"--config {path}: not valid TOML ({line})") from None

    for key in data:
        if key not in FIELD_NAMES:
            raise BadInputError(
                f"{path}: unknown key {key!r}; expected a training field "
                f"(did you mean {nearest(key, FIELD_NAMES)!r}?)"
            )
    return data


def resolve(file_values: dict[str, Any], flag_values: dict[str, Any], source: str) -> TrainConfig:
    """Merge defaults < ``file_values`` < ``flag_values`` (``None`` flags are not given).

    ``prior`` tables merge per kind. ``source`` names the file in error messages.

    Raises:
        BadInputError: a file value of the wrong type or out of range.
        UsageError: a flag value out of range.
    """
    merged = TrainConfig().to_dict()
    for key, value in file_values.items():
        merged[key] = _typed(key, value, source)
    for key, value in flag_values.items():
        if value is None:
            continue
        if key == "prior":
            merged["prior"] = {**merged["prior"], **value}
        else:
            merged[key] = value

    if all(merged[key] is None for key in ("steps", "epochs", "time_budget")):
        merged["steps"] = DEFAULT_STEPS
    config = TrainConfig(**merged)
    validate(config)
    return config


def _typed(key: str, value: Any, source: str) -> Any:
    """Check that a TOML value has the field's type; ints are accepted for floats."""
    default = getattr(TrainConfig(), key)
    if key == "prior":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise BadInputError(f"{source}: [prior] must map kinds to forms, found {value!r}")
        for kind, form in value.items():
            parse_prior_form(kind, form)
        return dict(value)

    kind = _field_type(key)
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok:
        raise BadInputError(
            f"{source}: {key} = {value!r} has the wrong type; expected {kind.__name__} "
            f"(default {default!r})"
        )
    return float(value) if kind is float else value


def _field_type(key: str) -> type:
    annotation = next(f.type for f in fields(TrainConfig) if f.name == key)
    text = str(annotation)
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    raise KeyError(key)


def validate(config: TrainConfig) -> None:
    """Check ranges and choices; flags and file values are named by their field name.

    Raises:
        UsageError: a value outside its range or choices.
    """
    choices = {
        "coupling": COUPLINGS, "impute": IMPUTE, "optimizer": OPTIMIZERS,
        "balance": BALANCE, "precision": PRECISIONS,
    }
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            raise UsageError(
                f"--{_flag(key)} {value}: expected one of {', '.join(allowed)} "
                f"(did you mean {nearest(str(value), allowed)!r}?)"
            )

    if config.steps is not None and config.steps < 1:
        raise UsageError(f"--steps {config.steps}: expected an integer >= 1")
    positive = ("levels", "flow_steps", "hidden", "batch_size", "log_every",
                "val_every", "checkpoint_every", "keep_last", "max_bad_steps")
    for key in positive:
        if getattr(config, key) < 1:
            raise UsageError(f"--{_flag(key)} {getattr(config, key)}: expected an integer >= 1")
    for key in ("epochs", "time_budget"):
        value = getattr(config, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{_flag(key)} {value}: expected a number > 0")
    checks = [
        ("n_bits", 1 <= config.n_bits <= 8, "an integer in 1..8"),
        ("scale_floor", 0.0 <= config.scale_floor < 1.0, "a number in [0, 1)"),
        ("label_fraction", 0.0 <= config.label_fraction <= 1.0, "a fraction in [0, 1]"),
        ("lr", math.isfinite(config.lr) and config.lr > 0, "a number > 0"),
        ("beta", math.isfinite(config.beta) and config.beta >= 0, "a number >= 0"),
        ("warmup", config.warmup >= 0, "an integer >= 0"),
        ("grad_clip", config.grad_clip >= 0, "a number >= 0 (0: no clipping)"),
        ("weight_decay", config.weight_decay >= 0, "a number >= 0"),
        ("val_images", config.val_images >= 0, "an integer >= 0 (0: no validation)"),
        ("workers", config.workers >= 0, "an integer >= 0"),
        ("bad_lr_factor", 0 < config.bad_lr_factor < 1, "a factor in (0, 1)"),
        ("max_recoveries", config.max_recoveries >= 0, "an integer >= 0"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise UsageError(f"--{_flag(key)} {getattr(config, key)}: expected {expected}")
    config.priors()
    for name in config.kind_names() or []:
        if not name.isprintable() or "=" in name:
            raise UsageError(f"--kinds {config.kinds!r}: kind {name!r} is not a kind name; "
                             "expected comma-separated names such as dataset,label")


def _flag(key: str) -> str:
    return key.replace("_", "-")


def to_toml(config: TrainConfig) -> str:
    """The configuration as a TOML file that :func:`read_config_file` reads back."""
    lines = ["# tzk train: the resolved configuration of this run"]
    data = config.to_dict()
    for key in FIELD_NAMES:
        value = data[key]
        if key == "prior" or value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    lines.append("")
    lines.append("[prior]")
    for kind, form in sorted(data["prior"].items()):
        lines.append(f"{_toml_value(kind)} = {_toml_value(form)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
