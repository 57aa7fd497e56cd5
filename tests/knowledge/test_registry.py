"""The registry: open-ended kinds and conditions, specs, namespaces, domains, JSON."""

from __future__ import annotations

import json

import pytest
import torch

from tzkcli.errors import BadInputError
from tzkcli.knowledge import Registry, parse_condition


def omniglot_registry() -> Registry:
    registry = Registry()
    registry.add_kind("label")
    registry.add_kind("alphabet", form="bottleneck", rank=4)
    for name in ("mnist", "omniglot"):
        registry.add_condition("dataset", name)
    registry.add_condition("label", "mnist/3")
    registry.add_condition("alphabet", "omniglot/Greek")
    registry.add_condition("label", "mnist/7")
    return registry


def test_dataset_kind_comes_first_and_indices_never_move():
    registry = omniglot_registry()
    before = [c.spec for c in registry.conditions]

    registry.add_kind("stroke")
    registry.add_condition("stroke", "thick")

    assert registry.kinds == ["dataset", "label", "alphabet", "stroke"]
    assert [c.spec for c in registry.conditions][:len(before)] == before
    assert registry.index("stroke=thick") == len(before)
    assert registry.condition_indices("label") == [2, 4]
    assert registry.value_index("label", "mnist/7") == 1


def test_adding_a_known_condition_returns_its_index():
    registry = omniglot_registry()
    assert registry.add_condition("label", "mnist/3") == registry.index("label=mnist/3")
    assert len(registry) == 5


def test_parse_splits_at_the_first_equals_sign():
    assert parse_condition("label=mnist/3") == ("label", "mnist/3")
    assert parse_condition("note=a=b") == ("note", "a=b")
    for bad in ("label", "=mnist", "label=", " label=x"):
        with pytest.raises(BadInputError, match="expected 'kind=value'"):
            parse_condition(bad)


def test_unknown_names_suggest_the_nearest():
    registry = omniglot_registry()
    with pytest.raises(BadInputError, match="unknown kind 'lable', nearest: label"):
        registry.index("lable=mnist/3")
    with pytest.raises(BadInputError, match="nearest: label=mnist/3"):
        registry.index("label=mnist/33")
    with pytest.raises(BadInputError, match="kind 'alphabt': unknown, nearest: alphabet"):
        registry.kind("alphabt")


def test_kind_forms_are_checked():
    registry = Registry()
    with pytest.raises(BadInputError, match="form 'lowrank' unknown"):
        registry.add_kind("code", form="lowrank")
    with pytest.raises(BadInputError, match="bottleneck rank None"):
        registry.add_kind("code", form="bottleneck")
    with pytest.raises(BadInputError, match="rank 3 given"):
        registry.add_kind("code", rank=3)
    registry.add_kind("code", form="bottleneck", rank=3)
    with pytest.raises(BadInputError, match="already registered"):
        registry.add_kind("code", form="gaussian")


def test_namespace_implies_the_dataset():
    registry = omniglot_registry()
    assert registry.implied(registry.index("label=mnist/3")) == [registry.index("dataset=mnist")]
    assert registry.implied(registry.index("alphabet=omniglot/Greek")) == [1]
    assert registry.implied(registry.index("dataset=mnist")) == []

    registry.add_kind("stroke")
    registry.add_condition("stroke", "thick")
    registry.add_condition("stroke", "atlas/thin")
    assert registry.implied(registry.index("stroke=thick")) == []
    assert registry.implied(registry.index("stroke=atlas/thin")) == []


def test_default_domain_follows_namespaces():
    registry = omniglot_registry()
    registry.add_kind("stroke")
    registry.add_condition("stroke", "thick")

    assert registry.domain("dataset").tolist() == [[True, False], [False, True]]
    assert registry.domain("label").tolist() == [[True, True], [False, False]]
    assert registry.domain("alphabet").tolist() == [[False], [True]]
    assert registry.domain("stroke").tolist() == [[True], [True]]


def test_set_domain_overrides_the_named_datasets():
    registry = omniglot_registry()
    registry.set_domain("label", [[False, True]], datasets=["mnist"])

    assert registry.domain("label").tolist() == [[False, True], [False, False]]
    with pytest.raises(BadInputError, match=r"found shape \(1, 3\), expected \(2, 2\)"):
        registry.set_domain("label", torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(BadInputError, match="unknown"):
        registry.set_domain("label", [[True, True]], datasets=["cifar"])


def test_json_round_trip_is_exact():
    registry = omniglot_registry()
    registry.set_domain("label", [[True, False], [False, False]])

    text = json.dumps(registry.to_json())
    again = Registry.from_json(json.loads(text))

    assert again.to_json() == registry.to_json()
    assert again.kind("alphabet").rank == 4
    assert torch.equal(again.domain("label"), registry.domain("label"))


def test_json_errors_name_the_field():
    good = omniglot_registry().to_json()
    with pytest.raises(BadInputError, match="model.json:registry.format: found 'x'"):
        Registry.from_json({**good, "format": "x"}, source="model.json:registry")
    with pytest.raises(BadInputError, match="registry.version: found 9"):
        Registry.from_json({**good, "version": 9})
    with pytest.raises(BadInputError, match="registry.conditions: found str"):
        Registry.from_json({**good, "conditions": "label=mnist/3"})
    with pytest.raises(BadInputError, match=r"registry.conditions\[0\]: kind 'colour': unknown"):
        Registry.from_json({**good, "conditions": ["colour=red"]})
