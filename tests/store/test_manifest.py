"""The manifest parser: the shipped manifests, each rule, and fuzzing."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.store.fixtures import MANIFESTS
from tzkcli.errors import BadInputError
from tzkcli.store import load_manifest, parse_manifest
from tzkcli.store.manifest import Manifest

VALID = (MANIFESTS / "omniglot.toml").read_text()


def test_shipped_manifests_parse():
    mnist = load_manifest(MANIFESTS / "mnist.toml")
    assert mnist.name == "mnist" and [p.split for p in mnist.parts] == ["train", "test"]
    assert mnist.kinds["label"].namespace == "mnist" and mnist.transform.pad == "center"
    omniglot = load_manifest(MANIFESTS / "omniglot.toml")
    assert omniglot.dedupe and omniglot.transform.polarity == "dark-on-bright"
    assert omniglot.transform.resize == (28, 28)
    assert omniglot.parts[0].kinds["character"].folders == (1, 2)
    assert omniglot.split.fraction == 0.2 and omniglot.split.held_out == "test"
    atlas = load_manifest(MANIFESTS / "omniglot-atlas.toml")
    assert atlas.kinds == {} and atlas.parts[0].tile == (28, 28)
    assert atlas.parts[0].count == 19_280


def test_fingerprint_ignores_layout_but_not_content():
    base = parse_manifest(VALID)
    relaid = parse_manifest("# a comment\n" + VALID.replace(" = ", "="))
    assert relaid.fingerprint == base.fingerprint
    other = parse_manifest(VALID.replace("seed = 20190205", "seed = 1"))
    assert other.fingerprint != base.fingerprint


RULES = {
    "version": (("tzk_manifest = 1", "tzk_manifest = 2"), "tzk_manifest: found int 2"),
    "name pattern": (('name = "omniglot"', 'name = "Omni Glot"'), "dataset.name"),
    "misspelt table": (("[transform]", "[transforms]"), "transform: missing"),
    "fraction range": (("fraction = 0.2", "fraction = 1.5"), "split.fraction: found float 1.5"),
    "undeclared kind": (("[kinds.character]\n", ""), "parts[0].kinds.character"),
    "wrong kind source": (("kinds.alphabet = { folders = [1] }",
                           'kinds.alphabet = { idx = "small1" }'),
                          "parts[0].kinds.alphabet.idx"),
    "unknown file key": (('images = "small1"', 'images = "small3"'), "parts[0].images"),
    "absolute path": (('path = "omniglot/images_background_small1.zip"', 'path = "/etc/x"'),
                      "files.small1.path"),
    "parent path": (('path = "omniglot/images_background_small1.zip"', 'path = "../x.zip"'),
                    "files.small1.path"),
    "sha256 form": (('sha256 = "f38e', 'sha256 = "F38E'), "files.small1.sha256"),
    "reserved kind": (("[kinds.alphabet]", "[kinds.dataset]"), "kinds.dataset"),
    "resize form": (("resize = [28, 28]", "resize = [28]"), "transform.resize"),
    "depth type": (("folders = [1]", 'folders = ["1"]'), "parts[0].kinds.alphabet.folders"),
    "bool as int": (("seed = 20190205", "seed = true"), "split.seed: found boolean true"),
    "same split names": (('rest = "train"', 'rest = "test"'), "split.rest"),
    "polarity": (('polarity = "dark-on-bright"', 'polarity = "dark"'), "transform.polarity"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_is_one_line_naming_the_field(rule: str):
    (old, new), needle = RULES[rule]
    assert old in VALID
    with pytest.raises(BadInputError) as raised:
        parse_manifest(VALID.replace(old, new, 1), origin="m.toml")
    message = str(raised.value)
    assert message.startswith("m.toml: ") and "\n" not in message
    assert needle in message, message


def test_parts_without_split_need_a_rule():
    text = VALID[: VALID.index("[split]")]
    with pytest.raises(BadInputError, match=r"parts\[0\]\.split: missing"):
        parse_manifest(text)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BadInputError, match="manifest not found"):
        load_manifest(tmp_path / "none.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BadInputError, match="not UTF-8"):
        load_manifest(tmp_path / "bin.toml")


# fuzzing --------------------------------------------------------------------------------------

toml_values = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(f), repr(f))),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
    st.booleans().map(lambda b: str(b).lower()),
    st.lists(st.integers(-3, 70), max_size=4).map(lambda xs: "[" + ", ".join(map(str, xs)) + "]"),
    st.just("{ a = 1 }"), st.just("[]"), st.just('["x", 2]'),
)


def _outcome(text: str) -> None:
    try:
        result = parse_manifest(text, origin="fuzz.toml")
    except BadInputError as error:
        message = str(error)
        assert message.startswith("fuzz.toml: ") and "\n" not in message
    else:
        assert isinstance(result, Manifest)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_manifests(data):
    lines = VALID.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["value", "delete", "duplicate", "key"]))
        if action == "delete":
            lines.pop(index)
        elif action == "duplicate":
            lines.insert(index, lines[index])
        elif "=" in lines[index]:
            key, _, value = lines[index].partition("=")
            if action == "value":
                lines[index] = f"{key}= {data.draw(toml_values)}"
            else:
                new_key = data.draw(st.from_regex(r"[a-z_]{1,8}", fullmatch=True))
                lines[index] = f"{new_key} ={value}"
        if not lines:
            lines = [""]
    _outcome("\n".join(lines))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text(text: str):
    _outcome(text)


def test_error_messages_never_span_lines():
    with pytest.raises(BadInputError) as raised:
        parse_manifest(VALID.replace('license = "MIT (Brenden Lake)"', 'license = """a\nb"""'
                                     ).replace("fraction = 0.2", 'fraction = "a\\nb"'))
    assert "\n" not in str(raised.value)
    assert re.search(r"split\.fraction", str(raised.value))


def test_the_documented_example_parses():
    text = (MANIFESTS.parent / "docs" / "manifests.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    manifest = parse_manifest(example, origin="docs/manifests.md")
    assert manifest.name == "mnist" and manifest.parts[0].kinds["label"].idx == "train-labels"
