"""``tzk extend`` as a user runs it: frozen knowledge, closed-form fits, new datasets, output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.evaluation.conftest import snapshot
from tzkcli import fsio


def _model(run: Path, name: str | None = None):
    from tzkcli.evaluation import open_run

    return open_run(run, name or "latest").model


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}/{key}"))
        return out
    return {prefix: data}


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def label_run(weak_run: Path, full_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """``tzk extend weak_run --condition label --store full_store --out ...`` and its output."""
    from tests.conftest import Result
    from tzkcli.cli import main

    out = tmp_path_factory.mktemp("extended") / "label"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["extend", str(weak_run), "--condition", "label", "--store",
                     str(full_store), "--out", str(out), "--device", "cpu"])
    result = Result(code, stdout.getvalue(), stderr.getvalue())
    assert code == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def eval_before(weak_run: Path, weak_store: Path) -> dict:
    from tzkcli.evaluation import EvalOptions, evaluate

    return evaluate(_model(weak_run), weak_store, EvalOptions(samples=2))


def test_extend_prints_each_condition_and_writes_a_verified_checkpoint(
        label_run, full_store: Path) -> None:
    from tzkcli.store import open_store
    from tzkcli.training import checkpoint as ckpt

    out, result = label_run
    assert "frozen: the flow, p_0 and the 2 old conditions are unchanged" in result.stdout
    with open_store(full_store) as store:
        train = store.indices(split="train")
        labels = np.asarray(store.codes("label"))[train]
        threes = int((labels == store.values("label").index("mnist/3")).sum())
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("label=mnist/3:"))
    assert f"label=mnist/3: {threes} images, bpd " in line and "vs p_0 " in line

    record = json.loads((out / "run.json").read_text())
    assert record["latest"] == "step-00000004-extend-1"
    checkpoint = out / "checkpoints" / record["latest"]
    meta = ckpt.verify(ckpt.Checkpoint(checkpoint, 4))
    assert "extension.json" in meta["files"]
    extension = json.loads((checkpoint / "extension.json").read_text())
    assert [c["spec"] for c in extension["conditions"]] == [f"label=mnist/{d}" for d in range(10)]


def test_extend_keeps_old_parameters_bit_for_bit(weak_run: Path, label_run) -> None:
    before = _model(weak_run).state_dict()
    after = _model(label_run[0]).state_dict()
    assert set(before) < set(after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    new = [key for key in after if key not in before]
    assert len(new) == 20  # loc and log_scale of ten label conditions


def test_extend_leaves_every_old_eval_figure_unchanged(label_run, weak_store: Path,
                                                       eval_before: dict) -> None:
    from tzkcli.evaluation import EvalOptions, evaluate

    after = _flat(evaluate(_model(label_run[0]), weak_store, EvalOptions(samples=2)))
    before = _flat(eval_before)
    assert before and all(after[key] == value for key, value in before.items()
                          if key not in ("/store",))


def test_fitted_prior_is_the_mean_and_log_std_of_its_residuals(label_run,
                                                               full_store: Path) -> None:
    from tzkcli.evaluation.evaluate import seeded
    from tzkcli.store import open_store

    model = _model(label_run[0])
    with open_store(full_store) as store:
        train = store.indices(split="train")
        rows = train[(np.asarray(store.codes("label"))[train] != -1)]
        x = torch.from_numpy(store.images(rows))
        threes = np.asarray(store.codes("label"))[rows] == store.values("label").index("mnist/3")
    # the extension's one flow pass: the same rows, batch and seeded noise
    with torch.no_grad():
        r, _ = model.residuals(x, seeded(0, 0, torch.device("cpu")))
    r = [level[torch.from_numpy(threes)].double() for level in r]
    split, top = r[0], r[1].flatten(1)
    mean = torch.cat([split.mean(dim=(0, 2, 3)), top.mean(dim=0)])
    std = torch.cat([split.transpose(0, 1).flatten(1).std(dim=1, unbiased=False),
                     top.std(dim=0, unbiased=False)])

    prior = model.priors.conditions[model.registry.index("label=mnist/3")]
    assert torch.allclose(prior.loc.double(), mean, atol=1e-4)
    floor = 0.5 * math.log(1e-3)
    assert torch.allclose(prior.log_scale.double(), torch.log(std).clamp(min=floor), atol=1e-3)


def test_new_dataset_bottleneck_and_refinement(tzk, weak_run: Path, full_store: Path,
                                               weak_store: Path, tmp_path: Path,
                                               eval_before: dict) -> None:
    out = tmp_path / "alphabet"
    result = tzk("extend", weak_run, "--condition", "alphabet", "--store", full_store,
                 "--prior", "alphabet=bottleneck:2", "--refine-steps", "3", "--out", out,
                 "--device", "cpu")
    assert result.code == 0, result.stderr
    assert "dataset=omniglot (new dataset of alphabet=omniglot/" in result.stdout

    model = _model(out)
    assert model.rates.counts["dataset=omniglot"] == 144
    assert model.registry.kind("alphabet").form == "bottleneck"
    before = _model(weak_run).state_dict()
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)

    from tzkcli.evaluation import EvalOptions, evaluate

    report = evaluate(model, weak_store, EvalOptions(samples=0))
    for key in ("joint", "parts", "by_condition"):
        assert report["bpd"][key] == eval_before["bpd"][key]

    codes = tmp_path / "codes.h5"
    encoded = tzk("encode", out, "--store", full_store, "--condition",
                  "alphabet=omniglot/Greek", "--out", codes, "--device", "cpu")
    assert encoded.code == 0, encoded.stderr
    import h5py

    with h5py.File(codes) as file:
        assert file["codes"].shape == (len(file["rows"]), 2) and len(file["rows"]) > 0
        assert file.attrs["condition"] == "alphabet=omniglot/Greek"

    gaussian = tzk("encode", out, "--store", full_store, "--condition", "dataset=mnist",
                   "--out", tmp_path / "no.npy")
    assert gaussian.code == 3 and "expected a bottleneck kind" in _error_line(gaussian)
    assert not (tmp_path / "no.npy").exists()


def test_refinement_moves_only_the_new_condition(tzk, weak_run: Path, full_store: Path,
                                                 label_run, tmp_path: Path) -> None:
    out = tmp_path / "refined"
    result = tzk("extend", weak_run, "--condition", "label=mnist/3", "--store", full_store,
                 "--refine-steps", "5", "--out", out, "--device", "cpu")
    assert result.code == 0, result.stderr
    refined, fitted = _model(out), _model(label_run[0])
    index = refined.registry.index("label=mnist/3")
    assert not torch.equal(refined.priors.conditions[index].loc,
                           fitted.priors.conditions[fitted.registry.index("label=mnist/3")].loc)
    before = _model(weak_run).state_dict()
    assert all(torch.equal(before[k], refined.state_dict()[k]) for k in before)


def test_finetune_says_so_and_trains_the_flow(tzk, weak_run: Path, full_store: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    result = tzk("extend", weak_run, "--condition", "label=mnist/1", "--store", full_store,
                 "--finetune", "--refine-steps", "1", "--batch-size", "8", "--out", out,
                 "--device", "cpu")
    assert result.code == 0, result.stderr
    assert "fine-tuned: the flow, p_0 and the old conditions were trained too" in result.stdout
    before, after = _model(weak_run).state_dict(), _model(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("flow."))


def test_a_diverging_finetune_exits_5_and_writes_nothing(tzk, run_copy: Path,
                                                         full_store: Path) -> None:
    before = snapshot(run_copy)
    result = tzk("extend", run_copy, "--condition", "label=mnist/1", "--store", full_store,
                 "--finetune", "--refine-steps", "4", "--batch-size", "8", "--lr", "1e30",
                 "--device", "cpu")
    assert result.code == 5, result.stderr
    assert "--finetune: non-finite loss at step" in _error_line(result)
    assert snapshot(run_copy) == before


def test_extend_in_place_adds_a_checkpoint_and_keeps_the_old_one(
        tzk, run_copy: Path, full_store: Path, label_run) -> None:
    old = snapshot(run_copy / "checkpoints" / "step-00000004")
    result = tzk("extend", run_copy, "--condition", "label", "--store", full_store,
                 "--device", "cpu")
    assert result.code == 0, result.stderr
    assert snapshot(run_copy / "checkpoints" / "step-00000004") == old
    record = json.loads((run_copy / "run.json").read_text())
    assert record["latest"] == "step-00000004-extend-1"
    assert record["extended_from"] == "step-00000004"
    again, other = _model(run_copy).state_dict(), _model(label_run[0]).state_dict()
    assert all(torch.equal(again[k], other[k]) for k in other)

    second = tzk("extend", run_copy, "--condition", "dataset", "--store", full_store,
                 "--device", "cpu")
    assert second.code == 0, second.stderr
    assert json.loads((run_copy / "run.json").read_text())["latest"] == "step-00000004-extend-2"


def test_extend_waits_for_nobody(tzk, run_copy: Path, full_store: Path) -> None:
    before = snapshot(run_copy)
    with fsio.exclusive_lock(run_copy, "run directory"):
        result = tzk("extend", run_copy, "--condition", "label", "--store", full_store)
    assert result.code == 4 and "in use by another tzk process" in _error_line(result)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--condition", "dataset=mnist"], 3, "the model already has this condition"),
    (["--condition", "lable"], 3, "has no kind 'lable'; nearest: label"),
    (["--condition", "label=mnist/33"], 3, "no such condition in the store"),
    (["--condition", "label", "--finetune"], 2, "--finetune: needs --refine-steps"),
    (["--condition", "label", "--prior", "label=bottle:2"], 2, "unknown prior form"),
    (["--condition", "label", "--refine-steps", "-1"], 2, "--refine-steps -1"),
])
def test_extend_bad_input_is_one_line_and_writes_nothing(
        tzk, run_copy: Path, full_store: Path, args: list[str], code: int,
        message: str) -> None:
    before = snapshot(run_copy)
    result = tzk("extend", run_copy, "--store", full_store, *args)
    assert result.code == code, result.stderr
    assert message in _error_line(result)
    assert snapshot(run_copy) == before


def test_extend_refuses_what_is_not_a_run(tzk, tmp_path: Path, full_store: Path,
                                          small_shape_store: Path, run_copy: Path) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    result = tzk("extend", stranger, "--condition", "label", "--store", full_store)
    assert result.code == 3 and "not a tzk run" in _error_line(result)
    assert list(stranger.iterdir()) == []

    before = snapshot(run_copy)
    shape = tzk("extend", run_copy, "--condition", "dataset", "--store", small_shape_store)
    assert shape.code == 3 and "images of shape 1x64x64, expected 1x32x32" in _error_line(shape)
    assert snapshot(run_copy) == before

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    taken = tzk("extend", run_copy, "--condition", "label", "--store", full_store,
                "--out", busy)
    assert taken.code == 3 and "exists and is not empty" in _error_line(taken)


def test_calibrate_refits_the_old_conditions_in_closed_form_and_freezes_the_flow(
        tzk, weak_run: Path, weak_store: Path, tmp_path: Path) -> None:
    from tzkcli.evaluation.evaluate import seeded
    from tzkcli.store import open_store

    out = tmp_path / "calibrated"
    # N beyond the split: the sample is every training image, so the fit is checkable
    result = tzk("extend", weak_run, "--calibrate", "100000", "--out", out, "--device", "cpu",
                 "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [c["spec"] for c in report["calibrated"]] == ["dataset=mnist",
                                                         "dataset=omniglot-atlas"]
    assert report["conditions"] == [] and report["frozen_conditions"] == 0
    # a maximum-likelihood refit cannot score its own images worse
    assert all(c["bpd"] <= c["bpd_before"] and c["gain"] > 0 for c in report["calibrated"])

    before, model = _model(weak_run), _model(out)
    old, new = before.state_dict(), model.state_dict()
    assert set(old) == set(new)
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("priors."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("priors."))

    with open_store(weak_store) as store:
        rows = store.indices(split="train")
        mnist = np.asarray(store.codes("dataset"))[rows] == store.values("dataset").index(
            "mnist")
        x = torch.from_numpy(store.images(rows))
    with torch.no_grad():
        r, _ = model.residuals(x, seeded(0, 0, torch.device("cpu")))
    r = [level[torch.from_numpy(mnist)].double() for level in r]
    mean = torch.cat([r[0].mean(dim=(0, 2, 3)), r[1].flatten(1).mean(dim=0)])
    prior = model.priors.conditions[model.registry.index("dataset=mnist")]
    assert torch.allclose(prior.loc.double(), mean, atol=1e-4)


def test_calibrate_with_a_new_condition_says_what_it_refitted(tzk, weak_run: Path,
                                                              full_store: Path,
                                                              tmp_path: Path) -> None:
    result = tzk("extend", weak_run, "--condition", "label=mnist/3", "--store", full_store,
                 "--calibrate", "300", "--refine-steps", "2", "--out", tmp_path / "both",
                 "--device", "cpu")
    assert result.code == 0, result.stderr
    assert ("calibrated: the flow and p_0 are unchanged, 2 old conditions refitted, "
            "0 unchanged") in result.stdout
    assert "label=mnist/3: " in result.stdout
    assert "dataset=mnist (refitted): " in result.stdout and "before (gain " in result.stdout

    # three random images cannot hold two of both old datasets
    few = tzk("extend", weak_run, "--condition", "label=mnist/3", "--store", full_store,
              "--calibrate", "3", "--out", tmp_path / "few", "--device", "cpu")
    assert few.code == 0, few.stderr
    assert "not refitted dataset=" in few.stderr and "the --calibrate sample" in few.stderr
    assert "old conditions are unchanged" in few.stdout


@pytest.mark.parametrize(("args", "message"), [
    ([], "--condition: missing; expected at least one kind=value or kind (or --calibrate N)"),
    (["--calibrate", "-1"], "--calibrate -1: expected 0 or more images"),
    (["--calibrate", "5", "--finetune", "--refine-steps", "1"], "--calibrate with --finetune"),
])
def test_extend_calibrate_usage_errors_exit_2_and_write_nothing(
        tzk, run_copy: Path, args: list[str], message: str) -> None:
    before = snapshot(run_copy)
    result = tzk("extend", run_copy, *args)
    assert result.code == 2, result.stderr
    assert message in _error_line(result)
    assert snapshot(run_copy) == before


def test_extend_checkpoint_picks_the_base(tzk, run_copy: Path, full_store: Path) -> None:
    first = tzk("extend", run_copy, "--condition", "label=mnist/3", "--store", full_store,
                "--device", "cpu")
    assert first.code == 0, first.stderr
    # latest is now the extension; --checkpoint best extends the trained model instead
    second = tzk("extend", run_copy, "--condition", "label=mnist/5", "--store", full_store,
                 "--checkpoint", "best", "--device", "cpu")
    assert second.code == 0, second.stderr
    record = json.loads((run_copy / "run.json").read_text())
    assert record["latest"] == "step-00000004-extend-2"
    assert record["extended_from"] == "step-00000004"
    specs = [c.spec for c in _model(run_copy).registry.conditions]
    assert "label=mnist/5" in specs and "label=mnist/3" not in specs

    before = snapshot(run_copy)
    missing = tzk("extend", run_copy, "--condition", "label=mnist/1", "--store", full_store,
                  "--checkpoint", "step-00000009")
    assert missing.code == 3
    assert "--checkpoint step-00000009: not found in" in _error_line(missing)
    assert snapshot(run_copy) == before
