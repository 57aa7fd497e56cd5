"""Saving and loading a whole model: bit-for-bit likelihoods, hashes, no arbitrary unpickling."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from tests.model.flows import TwoLevelFlow
from tzkcli.errors import BadInputError
from tzkcli.flows import GlowConfig
from tzkcli.knowledge import Registry
from tzkcli.model import ModelConfig, TzK


def trained_like() -> tuple[TzK, torch.Tensor, torch.Tensor]:
    """A tiny float64 Glow model, initialised, with every prior moved off its start."""
    torch.manual_seed(0)
    registry = Registry()
    registry.add_kind("label")
    registry.add_kind("code", form="bottleneck", rank=2)
    registry.add_condition("dataset", "mnist")
    registry.add_condition("label", "mnist/3")
    registry.add_condition("code", "mnist/c")
    config = ModelConfig(flow=GlowConfig(shape=(1, 8, 8), levels=2, steps=2, hidden=8),
                         n_bits=5)
    model = TzK(config, registry).double()
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model.initialize(x)
    with torch.no_grad():
        for parameter in model.priors.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    codes = torch.tensor([[0, 0, -1]] * 16)
    model.rates.count(codes)
    return model, x, codes


def scores_of(model: TzK, x: torch.Tensor):
    return model.score(x, generator=torch.Generator().manual_seed(7))


def test_save_then_load_reproduces_every_log_likelihood_bit_for_bit(tmp_path):
    model, x, codes = trained_like()
    before = scores_of(model, x)

    model.save(tmp_path / "model")
    loaded = TzK.load(tmp_path / "model")

    after = scores_of(loaded, x)
    assert loaded.flow.is_initialised
    assert torch.equal(after.bpd_base, before.bpd_base)
    assert torch.equal(after.bpd, before.bpd)
    assert torch.equal(after.ladj, before.ladj)
    assert loaded.registry.to_json() == model.registry.to_json()
    assert loaded.rates.to_json() == model.rates.to_json()
    assert loaded.config == model.config
    assert torch.equal(loaded.code(x, "code=mnist/c", torch.Generator().manual_seed(1)),
                       model.code(x, "code=mnist/c", torch.Generator().manual_seed(1)))


def test_placing_on_the_cpu_puts_the_flow_in_channels_last_and_keeps_the_scores(tmp_path):
    model, x, _ = trained_like()
    before = scores_of(model, x)
    model.save(tmp_path / "model")

    placed = TzK.load(tmp_path / "model").place("cpu")

    weights = [p for p in placed.flow.parameters() if p.dim() == 4 and p.shape[-1] == 3]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last)
                           and not w.is_contiguous() for w in weights)
    after = scores_of(placed, x)
    assert torch.allclose(after.bpd, before.bpd, rtol=0, atol=1e-12)
    placed.save(tmp_path / "again")
    assert torch.equal(scores_of(TzK.load(tmp_path / "again"), x).bpd, after.bpd)


def test_loaded_actnorm_is_not_initialised_again(tmp_path):
    model, x, _ = trained_like()
    model.save(tmp_path / "model")
    loaded = TzK.load(tmp_path / "model")
    before = {k: v.clone() for k, v in loaded.state_dict().items()}

    loaded.initialize(torch.full_like(x, 255))

    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())


def test_saving_again_replaces_the_weights(tmp_path):
    model, x, _ = trained_like()
    model.save(tmp_path)
    model.add_condition("label", "mnist/4")
    model.save(tmp_path)

    weights = sorted(p.name for p in tmp_path.glob("weights-*.pt"))
    assert len(weights) == 1
    assert json.loads((tmp_path / "model.json").read_text())["weights"]["file"] == weights[0]
    assert len(TzK.load(tmp_path).registry) == 4
    assert not list(tmp_path.glob(".tmp-*"))


def weights_file(directory) -> str:
    return json.loads((directory / "model.json").read_text())["weights"]["file"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_weights_file_is_named_and_not_loaded(tmp_path, damage):
    model, _, _ = trained_like()
    model.save(tmp_path)
    path = tmp_path / weights_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))

    with pytest.raises(BadInputError, match=f"{path.name}: sha256 .*corrupt or truncated"):
        TzK.load(tmp_path)


class Payload:
    """Unpickling this would run code that leaves a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    model, _, _ = trained_like()
    model.save(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / weights_file(tmp_path)
    state = dict(model.state_dict())
    state["priors.conditions.0.loc"] = Payload(str(marker))
    torch.save(state, path)
    manifest = json.loads((tmp_path / "model.json").read_text())
    manifest["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(manifest))

    with pytest.raises(BadInputError, match=f"{path.name}: refused .* plain tensors only"):
        TzK.load(tmp_path)
    assert not marker.exists()


def test_manifest_problems_are_named(tmp_path):
    with pytest.raises(BadInputError, match="model.json: not found"):
        TzK.load(tmp_path)
    (tmp_path / "model.json").write_text("{")
    with pytest.raises(BadInputError, match="model.json: unreadable"):
        TzK.load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "tzk-run", "version": 1}))
    with pytest.raises(BadInputError, match="format 'tzk-run', expected 'tzk-model'"):
        TzK.load(tmp_path)


def test_a_model_of_an_older_version_is_refused(tmp_path):
    registry = Registry()
    registry.add_condition("dataset", "mnist")
    model = TzK(ModelConfig(flow=GlowConfig(shape=(1, 4, 4), levels=1, steps=1, hidden=4)),
                registry)
    model.initialize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    model.save(tmp_path)
    manifest = json.loads((tmp_path / "model.json").read_text())
    manifest["version"] = 1
    (tmp_path / "model.json").write_text(json.dumps(manifest))

    with pytest.raises(BadInputError, match=r"version 1, expected one of \(3, 4\) .*retrain"):
        TzK.load(tmp_path)


def test_a_version_3_model_loads_with_the_floor_it_was_built_with(tmp_path):
    # Version 3 had no scale_floor in its config and built every affine coupling with 0.5.
    registry = Registry()
    registry.add_condition("dataset", "mnist")
    config = GlowConfig(shape=(1, 8, 8), levels=2, steps=2, hidden=8, scale_floor=0.5)
    model = TzK(ModelConfig(flow=config), registry).double()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    model.initialize(images)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    model.save(tmp_path)
    manifest = json.loads((tmp_path / "model.json").read_text())
    manifest["version"] = 3
    del manifest["config"]["flow"]["scale_floor"]
    (tmp_path / "model.json").write_text(json.dumps(manifest))

    loaded = TzK.load(tmp_path)

    assert loaded.config.flow.scale_floor == 0.5
    conditions = model.registry.resolve(["dataset=mnist"])
    expected = model.score(images, conditions, generator=torch.Generator().manual_seed(0))
    found = loaded.score(images, conditions, generator=torch.Generator().manual_seed(0))
    assert torch.equal(found.bpd, expected.bpd)


def test_a_model_with_its_own_flow_needs_it_to_load(tmp_path):
    registry = Registry()
    registry.add_condition("dataset", "mnist")
    flow = TwoLevelFlow((1, 4, 4))
    model = TzK(ModelConfig(), registry, flow=flow)
    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    model.initialize(x)
    model.save(tmp_path)

    with pytest.raises(BadInputError, match="config.flow is null"):
        TzK.load(tmp_path)
    loaded = TzK.load(tmp_path, flow=TwoLevelFlow((1, 4, 4)))
    assert bool(loaded.flow.initialised)
    assert torch.equal(scores_of(loaded, x).bpd, scores_of(model, x).bpd)


def test_extending_keeps_every_existing_parameter(tmp_path):
    model, x, _ = trained_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    new = model.add_condition("label", "mnist/4")
    parameters = model.condition_parameters([new])

    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {id(p) for p in parameters} == {id(p) for p in model.priors.conditions[new]
                                           .parameters()}
    assert model.score(x, [new]).bpd.shape == (16, 1)
