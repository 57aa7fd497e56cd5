"""Property-based tests (Hypothesis) of the parsers that read what users type or send:
condition specs (``--condition``, ``--class``, ``--prior``), the HDF5 store reader under
arbitrary replacement of any key, and the training configuration loader.

The manifest parser has its own Hypothesis tests in tests/store/test_manifest.py (mutated
manifests, arbitrary text) and the source readers in tests/store/test_readers.py; they are
counted in docs/reliability.md and not repeated here.

The property everywhere: the input is accepted and then holds its invariants, or it is
refused with a :class:`~tzkcli.errors.TzkError` whose message is one printable line; nothing
else escapes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import LEDGER
from tzkcli.errors import TzkError

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def one_line(error: TzkError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message


def registry_of_run(run: Path):
    import json

    from tzkcli.knowledge.registry import Registry

    latest = json.loads((run / "run.json").read_text())["latest"]
    model = json.loads((run / "checkpoints" / latest / "model" / "model.json").read_text())
    return Registry.from_json(model["registry"])


SPEC_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["dataset", "label", "", " label",
                                                         "alphabet", "dataset "]),
              st.one_of(st.sampled_from(["mnist", "mnist/3", "omniglot-atlas", "3", "",
                                         "mnist/3/", "../mnist"]), st.text(max_size=12))),
)


@pytest.fixture(scope="module")
def registry(trained_run: Path):
    reg = registry_of_run(trained_run)
    reg.add_kind("label")
    for digit in range(10):
        reg.add_condition("label", f"mnist/{digit}")
    return reg


@SETTINGS
@given(spec=SPEC_TEXT)
def test_condition_specs(spec: str, registry) -> None:
    from tzkcli.evaluation.samples import resolve_class
    from tzkcli.knowledge.registry import parse_condition

    outcomes = []
    try:
        kind, value = parse_condition(spec)
        assert f"{kind}={value}" == spec and kind and value and "=" not in kind
        outcomes.append("parsed")
    except TzkError as error:
        one_line(error)
        outcomes.append("refused")
    try:
        index = registry.index(spec)
        assert registry.condition(index).spec == spec
    except TzkError as error:
        one_line(error)
    try:
        resolved = resolve_class(registry, spec)
        assert registry.index(resolved) >= 0
    except TzkError as error:
        one_line(error)
    LEDGER.tried("arbitrary condition spec (Hypothesis)", "--condition, --class",
                 "parsed or refused in one line", None)


@SETTINGS
@given(values=st.lists(st.text(max_size=30), max_size=4))
def test_prior_flags(values: list[str]) -> None:
    from tzkcli.training.config import parse_prior_flags

    try:
        parsed = parse_prior_flags(values)
        assert all(form.split(":")[0] in ("gaussian", "bottleneck") for form in parsed.values())
    except TzkError as error:
        one_line(error)
    LEDGER.tried("arbitrary --prior flags (Hypothesis)", "train, extend",
                 "parsed or refused in one line", None)


# -- the store reader ----------------------------------------------------------------------

KEYS = ["/images", "/kinds/dataset/values", "/kinds/dataset/codes", "/kinds/dataset/domain",
        "/splits/names", "/splits/codes", "/sources/names", "/sources/rows",
        "/sources/files", "/sources/manifests"]
ATTRS = ["format", "format_version", "shape", "kinds", "digest"]

# HDF5 strings are UTF-8 without NUL: no NUL, and no lone surrogates (they have no UTF-8).
NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
ARRAYS = st.one_of(
    st.sampled_from(["int8", "int32", "int64", "uint8", "float32", "float64"]).flatmap(
        lambda dtype: st.builds(
            lambda shape, fill: np.full(shape, fill).astype(dtype),
            st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
            st.integers(-3, 300))),
    st.lists(st.text(NO_NUL, max_size=8), max_size=4).map(lambda v: np.array(v, dtype=object)),
)
ATTR_VALUES = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                        st.text(NO_NUL, max_size=70), ARRAYS)


@pytest.fixture(scope="module")
def base_store(weak_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("properties") / "base.h5"
    shutil.copyfile(weak_store, copy)
    return copy


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_store_reader_under_replaced_keys(data, base_store: Path, tmp_path: Path) -> None:
    from tzkcli.store import open_store

    path = tmp_path / f"mutant-{data.draw(st.integers(0, 10**9))}.h5"
    shutil.copyfile(base_store, path)
    with h5py.File(path, "r+") as file:
        for _ in range(data.draw(st.integers(1, 2))):
            if data.draw(st.booleans()):
                key = data.draw(st.sampled_from(KEYS))
                value = data.draw(ARRAYS)
                del file[key]
                if value.dtype == object:
                    file.create_dataset(key, data=value, dtype=h5py.string_dtype())
                else:
                    file.create_dataset(key, data=value)
            else:
                name = data.draw(st.sampled_from(ATTRS))
                value = data.draw(ATTR_VALUES)
                if isinstance(value, np.ndarray) and value.dtype == object:
                    file.attrs.create(name, value, dtype=h5py.string_dtype())
                else:
                    file.attrs[name] = value
    try:
        with open_store(path) as store:
            n = len(store)
            for kind in store.kinds:
                codes = store.codes(kind)
                assert codes.shape == (n,)
                assert codes.size == 0 or codes.max() < len(store.values(kind))
            store.images(np.arange(min(n, 40)))
            store.compute_digest()
        outcome = "accepted; invariants hold"
    except TzkError as error:
        one_line(error)
        outcome = "refused in one line"
    path.unlink()
    LEDGER.tried("store with an HDF5 key or attribute replaced by arbitrary data "
                 "(Hypothesis)", "store reader", outcome, None)


# -- the training configuration loader -------------------------------------------------------

def toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    return json.dumps(value)


FIELDS = ["steps", "epochs", "time_budget", "levels", "flow_steps", "hidden", "coupling",
          "n_bits", "beta", "impute", "optimizer", "lr", "warmup", "grad_clip", "batch_size",
          "balance", "label_fraction", "seed", "val_images", "device", "precision",
          "keep_last", "prior", "stepz", "learning_rate"]
VALUES = st.one_of(st.integers(-10**12, 10**12), st.floats(), st.booleans(),
                   st.text(max_size=12),
                   st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=14),
                                                                  st.integers()),
                                   max_size=2))


@SETTINGS
@given(entries=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5),
       noise=st.one_of(st.just(""), st.text(max_size=20)))
def test_config_loader(entries: dict, noise: str, tmp_path: Path) -> None:
    from tzkcli.training.config import read_config_file, resolve

    path = tmp_path / "config.toml"
    text = "".join(f"{key} = {toml_value(value)}\n" for key, value in entries.items()) + noise
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = resolve(read_config_file(path), {}, str(path))
        assert config.steps or config.epochs or config.time_budget
        assert config.batch_size >= 1 and config.lr > 0
        outcome = "accepted; a valid configuration"
    except TzkError as error:
        one_line(error)
        outcome = "refused in one line"
    LEDGER.tried("arbitrary training config TOML (Hypothesis)", "train --config", outcome,
                 None)
