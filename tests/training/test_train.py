"""``tzk train`` end to end on a small real store: resume, metrics, bad input, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import TINY
from tzkcli import fsio
from tzkcli.training import checkpoint as ckpt
from tzkcli.training.metrics import read_metrics


def _weights(run: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    from tzkcli.model import TzK

    found = {c.name: c for c in ckpt.list_checkpoints(run / "checkpoints")}
    chosen = found[name] if name else found[max(found)]
    return TzK.load(chosen.model_dir).state_dict()


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of 4 steps, checkpoints every 2 (shared by several tests)."""
    from tzkcli.cli import main

    run = tmp_path_factory.mktemp("runs") / "whole"
    code = main(["train", "--store", str(small_store), "--out", str(run), *TINY,
                 "--steps", "4", "--checkpoint-every", "2", "--val-every", "2"])
    assert code == 0
    return run


def test_stop_and_resume_is_bit_identical(tzk, small_store: Path, finished_run: Path,
                                          tmp_path: Path) -> None:
    run = tmp_path / "halves"
    first = tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "2",
                "--checkpoint-every", "2", "--val-every", "2")
    assert first.code == 0, first.stderr
    second = tzk("train", "--resume", run, "--steps", "4")
    assert second.code == 0, second.stderr

    whole, halves = _weights(finished_run), _weights(run)
    assert whole.keys() == halves.keys()
    assert all(torch.equal(whole[k], halves[k]) for k in whole)
    assert any(not torch.equal(whole[k], _weights(finished_run, "step-00000002")[k])
               for k in whole)


def test_adam_runs_fused(finished_run: Path) -> None:
    latest = ckpt.list_checkpoints(finished_run / "checkpoints")[-1]
    groups = ckpt.load_state(latest)["optimizer"]["param_groups"]

    assert all(group["fused"] for group in groups)


def test_the_model_is_built_with_the_scale_floor(tzk, small_store: Path, finished_run: Path,
                                                 tmp_path: Path) -> None:
    from tzkcli.flows.config import DEFAULT_SCALE_FLOOR
    from tzkcli.model import TzK

    def floor(run: Path) -> float:
        latest = ckpt.list_checkpoints(run / "checkpoints")[-1]
        return TzK.load(latest.model_dir).config.flow.scale_floor

    run = tmp_path / "run"
    result = tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "1",
                 "--scale-floor", "0.25")

    assert result.code == 0, result.stderr
    assert floor(run) == 0.25
    assert floor(finished_run) == DEFAULT_SCALE_FLOOR


def test_metrics_first_record_is_the_config(finished_run: Path) -> None:
    records = read_metrics(finished_run)

    assert records[0]["type"] == "config"
    assert records[0]["config"]["steps"] == 4 and records[0]["config"]["hidden"] == 16
    assert records[1]["type"] == "actnorm_init"
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "bpd", "bpd_base", "ce", "lr", "grad_norm", "images_per_s"):
        assert all(isinstance(r[key], float) for r in train), key
    val = [r for r in records if r["type"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert set(val[0]["datasets"]) == {"mnist", "omniglot", "omniglot-atlas"}
    for parts in val[0]["datasets"].values():
        assert parts["bpd_base"] == pytest.approx(
            parts["bpd_base_prior"] + parts["bpd_ladj"] + parts["bpd_dequantisation"], abs=1e-4)
    assert records[-1]["type"] == "end" and records[-1]["reason"] == "steps"

    record = json.loads((finished_run / "run.json").read_text())
    assert record["status"] == "finished" and record["latest"] == "step-00000004"
    assert (finished_run / "config.toml").read_text().count("steps = 4") == 1


def test_existing_run_without_resume_is_refused(tzk, small_store: Path,
                                                finished_run: Path) -> None:
    before = _snapshot(finished_run)
    result = tzk("train", "--store", small_store, "--out", finished_run, *TINY)

    assert result.code == 3
    assert result.stderr.count("\n") == 1
    assert "run directory exists" in result.stderr and "--resume" in result.stderr
    assert _snapshot(finished_run) == before


def test_corrupt_checkpoint_is_named_and_not_loaded(tzk, finished_run: Path,
                                                    tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    state = run / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    before = _snapshot(run)

    result = tzk("train", "--resume", run, "--steps", "6")
    assert result.code == 3
    assert "step-00000004/state.pt: truncated or altered checkpoint file" in result.stderr
    assert _snapshot(run) == before


@pytest.mark.parametrize("flags, code, message", [
    (["--prior", "label=gausian"], 2, "unknown prior form 'gausian'"),
    (["--prior", "colour=gaussian"], 3, "has no kind 'colour'"),
    (["--levels", "6"], 3, "--levels 6: the store"),
    (["--val-split", "dev"], 3, "--val-split dev: the store"),
    (["--batch-size", "100000"], 3, "--batch-size 100000"),
    (["--optimizer", "sgd"], 2, "--optimizer sgd"),
    (["--scale-floor", "1"], 2, "--scale-floor 1.0: expected a number in [0, 1)"),
    (["--kinds", "dataset,lable"], 3, "has no kind 'lable'; expected some of"),
])
def test_bad_input_is_one_line(tzk, small_store: Path, tmp_path: Path, flags: list[str],
                               code: int, message: str) -> None:
    run = tmp_path / "run"
    result = tzk("train", "--store", small_store, "--out", run, *TINY, *flags)

    assert result.code == code, result.stderr
    assert result.stderr.startswith("Error:") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not run.exists()


def test_config_file_with_unknown_key(tzk, small_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text("hiden = 16\n")
    result = tzk("train", "--store", small_store, "--out", tmp_path / "run", "--config", config)

    assert result.code == 3
    assert "unknown key 'hiden'" in result.stderr and "did you mean 'hidden'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_model_flag(tzk, finished_run: Path) -> None:
    result = tzk("train", "--resume", finished_run, "--hidden", "32")
    assert result.code == 2
    assert "--hidden 32: cannot change on --resume" in result.stderr


def test_resume_refuses_another_store(tzk, finished_run: Path, tmp_path: Path,
                                      data_root: Path) -> None:
    from tests.store.fixtures import write_small_sources
    from tzkcli.store import ingest, load_manifest

    manifests = write_small_sources(data_root, tmp_path / "src", n_train=50, n_test=20)
    other = tmp_path / "other.h5"
    ingest([load_manifest(m) for m in manifests[:1]], other, tmp_path / "src")
    result = tzk("train", "--resume", finished_run, "--store", other, "--steps", "6")

    assert result.code == 3
    assert "does not match the run's store" in result.stderr


def test_a_held_run_is_busy(tzk, finished_run: Path) -> None:
    with fsio.exclusive_lock(finished_run, "run directory"):
        result = tzk("train", "--resume", finished_run, "--steps", "6")
    assert result.code == 4
    assert "in use by another tzk process" in result.stderr


def test_divergence_skips_restores_then_stops_with_exit_5(tzk, small_store: Path,
                                                          tmp_path: Path) -> None:
    from tzkcli.model import TzK

    run = tmp_path / "diverged"
    result = tzk("train", "--store", small_store, "--out", run, *TINY, "--lr", "1e6",
                 "--warmup", "0", "--steps", "40", "--checkpoint-every", "1000")

    assert result.code == 5, result.stderr
    assert "training diverged" in result.stderr and result.stderr.count("\n") == 1
    records = read_metrics(run)
    kinds = [r["type"] for r in records]
    assert kinds.count("skip") == 6 and kinds.count("recover") == 1
    assert records[-1] == {**records[-1], "type": "end", "reason": "diverged"}

    latest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    ckpt.verify(latest)
    model = TzK.load(latest.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((run / "run.json").read_text())["status"] == "diverged"


def test_label_fraction_and_balance_train(tzk, small_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "semi"
    result = tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "2",
                 "--label-fraction", "0.25", "--seed", "3", "--balance", "dataset",
                 "--prior", "label=bottleneck:2")

    assert result.code == 0, result.stderr
    train = [r for r in read_metrics(run) if r["type"] == "train"]
    assert max(r["imputed"] for r in train) > 0


def test_kinds_selects_what_the_model_learns(tzk, small_store: Path, tmp_path: Path) -> None:
    from tzkcli.evaluation.runs import open_run

    run = tmp_path / "datasets-only"
    result = tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "2",
                 "--kinds", "dataset")

    assert result.code == 0, result.stderr
    model = open_run(run).model
    assert list(model.registry.kinds) == ["dataset"]
    extended = tzk("extend", run, "--condition", "label", "--store", small_store)
    assert extended.code == 0, extended.stderr
    assert "label=mnist/3" in extended.stdout


def test_plain_progress_lines_on_stderr_and_the_result_on_stdout(tzk, small_store: Path,
                                                                  tmp_path: Path) -> None:
    loud = [flag for flag in TINY if flag != "--quiet"]
    result = tzk("train", "--store", small_store, "--out", tmp_path / "loud", *loud,
                 "--steps", "1")

    assert result.code == 0, result.stderr
    assert "actnorm initialised on 16 images" in result.stderr
    assert "step 1  loss" in result.stderr and "img/s" in result.stderr
    assert result.stdout.startswith("stopped at step 1 (steps)")

    quiet = tzk("train", "--store", small_store, "--out", tmp_path / "quiet", *TINY,
                "--steps", "1")
    assert quiet.code == 0 and quiet.stderr == ""


def test_epoch_and_time_budgets(tzk, small_store: Path, tmp_path: Path) -> None:
    by_epochs = tzk("train", "--store", small_store, "--out", tmp_path / "epochs", *TINY,
                    "--epochs", "0.1")
    assert by_epochs.code == 0, by_epochs.stderr
    records = read_metrics(tmp_path / "epochs")
    start = next(r for r in records if r["type"] == "start")
    train_rows = records[0]["store"]["train_images"]
    assert start["total_steps"] == -(-(train_rows // 16) // 10)
    assert records[-1]["reason"] == "epochs" and records[-1]["step"] == start["total_steps"]

    by_time = tzk("train", "--store", small_store, "--out", tmp_path / "time", *TINY,
                  "--time-budget", "0.001")
    assert by_time.code == 0, by_time.stderr
    assert read_metrics(tmp_path / "time")[-1]["reason"] == "time_budget"


def test_prefetching_workers_draw_the_same_batches(tzk, small_store: Path,
                                                   tmp_path: Path) -> None:
    runs = {}
    for workers in ("0", "2"):
        run = tmp_path / f"workers-{workers}"
        result = tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "2",
                     "--val-images", "0", "--workers", workers)
        assert result.code == 0, result.stderr
        runs[workers] = _weights(run)

    assert all(torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])
