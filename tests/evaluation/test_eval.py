"""``tzk eval`` as a user runs it: the JSON document, reproducibility, the results file, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.evaluation.conftest import snapshot


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def report(weak_run: Path, weak_store: Path, full_store: Path) -> dict:
    """``tzk eval weak_run --store weak_store --ood full_store --samples 2 --json``."""
    import contextlib
    import io

    from tzkcli.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["eval", str(weak_run), "--store", str(weak_store), "--ood",
                     str(full_store), "--samples", "2", "--device", "cpu", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_json_has_the_documented_figures(report: dict, weak_store: Path,
                                         full_store: Path) -> None:
    from tzkcli.store import open_store

    with open_store(weak_store) as store:
        test = store.indices(split="test")
        n_mnist = len(store.indices(split="test", dataset="mnist"))
    bpd = report["bpd"]
    assert report["images"] == len(test)
    mnist = bpd["by_condition"]["dataset=mnist"]
    assert set(mnist) == {"joint", "conditional", "gain", "n"} and mnist["n"] == n_mnist
    assert mnist["gain"] == pytest.approx(mnist["joint"] - mnist["conditional"])
    weighted = sum(v["joint"] * v["n"] for v in bpd["by_condition"].values()) / len(test)
    assert bpd["joint"] == pytest.approx(weighted)
    assert bpd["joint"] == pytest.approx(sum(bpd["parts"].values()))
    assert 0 <= report["accuracy"]["dataset"] <= 1
    matrix = np.array(report["confusion"]["dataset"]["matrix"])
    assert matrix.sum() == len(test)
    assert np.trace(matrix) / matrix.sum() == pytest.approx(report["accuracy"]["dataset"])
    ood = report["ood_auroc"][str(full_store)]
    assert set(ood) >= {"log_p0", "knowledge"} and 0 <= ood["log_p0"] <= 1
    assert set(report["sample_accuracy"]["dataset"]["by_condition"]) == {
        "dataset=mnist", "dataset=omniglot-atlas"}


def test_same_inputs_and_seed_give_the_same_numbers(tzk, report: dict, weak_run: Path,
                                                    weak_store: Path, full_store: Path) -> None:
    again = tzk("eval", weak_run, "--store", weak_store, "--ood", full_store, "--samples", "2",
                "--device", "cpu", "--json")
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout) == report

    written = weak_run / "eval" / f"{report['checkpoint']}-test.json"
    assert json.loads(written.read_text()) == report
    assert f"wrote {written}" in again.stderr

    other = tzk("eval", weak_run, "--store", weak_store, "--samples", "0", "--seed", "1",
                "--json")
    assert json.loads(other.stdout)["bpd"]["joint"] != report["bpd"]["joint"]


def test_table_on_stdout(tzk, weak_run: Path, weak_store: Path) -> None:
    result = tzk("eval", weak_run, "--store", weak_store, "--samples", "0", "--split", "train")
    assert result.code == 0, result.stderr
    assert "bits/dim by condition" in result.stdout
    assert "dataset=omniglot-atlas" in result.stdout
    assert "classification by the posterior" in result.stdout
    assert (weak_run / "eval" / "step-00000004-train.json").is_file()


@pytest.mark.parametrize(("store", "args", "code", "message"), [
    ("omniglot", [], 3, "none of its datasets (omniglot) is a condition of the model "
                        "(mnist, omniglot-atlas)"),
    ("shape", [], 3, "images of shape 1x64x64, expected 1x32x32"),
    ("weak", ["--split", "tset"], 3, "has no split 'tset'"),
    ("weak", ["--checkpoint", "step-9"], 3, "--checkpoint step-9: not found"),
    ("weak", ["--samples", "-1"], 2, "--samples -1: expected 0 or more"),
    ("weak", ["--ood", "missing.h5"], 3, "missing.h5"),
])
def test_eval_bad_input_is_one_line_and_writes_nothing(
        tzk, run_copy: Path, weak_store: Path, omniglot_store: Path, small_shape_store: Path,
        store: str, args: list[str], code: int, message: str) -> None:
    stores = {"weak": weak_store, "omniglot": omniglot_store, "shape": small_shape_store}
    before = snapshot(run_copy)
    result = tzk("eval", run_copy, "--store", stores[store], "--samples", "0", *args)
    assert result.code == code, result.stderr
    assert message in _error_line(result)
    assert snapshot(run_copy) == before


def test_datasets_the_model_lacks_are_left_out_and_said(tzk, weak_run: Path,
                                                          full_store: Path,
                                                          report: dict) -> None:
    result = tzk("eval", weak_run, "--store", full_store, "--samples", "0", "--json")
    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["left_out"] == {"omniglot": 36}
    assert "note: left out 36 of omniglot: datasets the model does not know" in result.stderr
    # the same MNIST and atlas test images as the weak store: the same figures
    assert document["images"] == report["images"]
    assert document["bpd"]["by_condition"] == report["bpd"]["by_condition"]


def test_eval_refuses_what_is_not_a_run(tzk, tmp_path: Path, weak_store: Path) -> None:
    result = tzk("eval", tmp_path, "--store", weak_store)
    assert result.code == 3 and "not a tzk run (no run.json)" in _error_line(result)
    assert list(tmp_path.iterdir()) == []
