"""``tzk quickstart``: the whole pipeline on the shipped sample, refusal, resume, data root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tzkcli.errors import BadInputError, UsageError
from tzkcli.quickstart import STAGES, find_data, sample_choice

SAMPLE = Path(__file__).resolve().parents[2] / "tzkcli" / "sample_data"


def test_every_stage_runs_and_the_last_line_names_the_report(quickstart_run):
    out, result = quickstart_run
    assert result.code == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"report: {out / 'run' / 'report.html'}"
    for number, stage in enumerate(STAGES, start=1):
        assert f"[{number}/6] {stage}:" in result.stderr
    assert "the real sample shipped with tzk" in result.stderr
    assert result.stderr.count("  wrote ") >= 8  # 3 stores, run, extension, grids, 2 evals, page

    state = json.loads((out / "quickstart.json").read_text())
    assert [s for s in STAGES if state["stages"][s]["done"]] == list(STAGES)
    assert state["data"]["source"] == "sample"


def test_the_stores_hold_the_sample_and_the_run_is_extended(quickstart_run):
    from tzkcli.store import open_store

    out, _ = quickstart_run
    with open_store(out / "stores" / "base.h5") as store:
        assert store.values("dataset") == ["mnist", "omniglot-atlas"]
        assert store.kinds == ["dataset", "label"]
        assert len(store.indices(split="train", dataset="mnist")) == 3000
    with open_store(out / "stores" / "extended.h5") as store:
        assert store.values("dataset") == ["mnist", "omniglot-atlas", "omniglot"]
        assert len(store.values("alphabet")) == 8

    run = json.loads((out / "run" / "run.json").read_text())
    assert run["latest"].endswith("-extend-1")
    extension = json.loads((out / "run" / "checkpoints" / run["latest"] / "extension.json")
                           .read_text())
    specs = {c["spec"] for c in extension["conditions"]}
    assert {"dataset=omniglot", "alphabet=omniglot/Greek"} <= specs
    assert not any(spec.startswith("label=") for spec in specs)
    assert extension["frozen"] is True


def test_eval_covers_the_extended_model_and_ood_before_the_extension(quickstart_run):
    out, _ = quickstart_run
    results = sorted((out / "run" / "eval").glob("*.json"))
    assert [p.name for p in results] == ["step-00000003-extend-1-test.json",
                                         "step-00000003-test.json"]
    extended = json.loads(results[0].read_text())
    assert "alphabet=omniglot/Latin" in extended["bpd"]["by_condition"]
    assert set(extended["accuracy"]) == {"dataset", "label", "alphabet"}
    before = json.loads(results[1].read_text())
    assert set(before["accuracy"]) == {"dataset", "label"}
    (ood,) = before["ood_auroc"].values()
    assert ood["images"] == 192 and 0.0 <= ood["log_p0"] <= 1.0


def test_an_existing_folder_is_refused_without_resume(quickstart_run, tzk):
    out, _ = quickstart_run
    before = (out / "quickstart.json").read_text()
    result = tzk("quickstart", "--out", out, "--sample")
    assert result.code == 3
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("Error: --out ") and "--resume" in line
    assert (out / "quickstart.json").read_text() == before


def test_resume_skips_finished_stages_and_redoes_the_rest(quickstart_run, tzk, tmp_path):
    out, _ = quickstart_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "quickstart.json").read_text())
    del state["stages"]["report"]
    (copy / "quickstart.json").write_text(json.dumps(state))
    (copy / "run" / "report.html").unlink()

    result = tzk("quickstart", "--out", copy, "--resume", "--device", "cpu")
    assert result.code == 0, result.stderr
    assert result.stderr.count("skipped (finished by an earlier run)") == 5
    assert "[6/6] report: write the HTML report" in result.stderr
    assert (copy / "run" / "report.html").is_file()
    assert json.loads((copy / "quickstart.json").read_text())["stages"]["report"]["done"]


def test_resume_needs_a_quickstart_folder(tzk, tmp_path):
    result = tzk("quickstart", "--out", tmp_path, "--resume")
    assert result.code == 3
    assert "no quickstart.json" in result.stderr


def test_a_budget_that_is_not_positive_is_a_usage_error(tzk, tmp_path):
    result = tzk("quickstart", "--out", tmp_path / "q", "--time-budget", "0", "--sample")
    assert result.code == 2
    assert "--time-budget 0" in result.stderr
    assert not (tmp_path / "q").exists()


def test_a_data_root_without_the_datasets_is_named(tmp_path):
    with pytest.raises(BadInputError, match=r"--data-root .*mnist/.* not found"):
        find_data(tmp_path, environ={})
    with pytest.raises(BadInputError, match=r"TZK_DATA_ROOT .* not found"):
        find_data(None, environ={"TZK_DATA_ROOT": str(tmp_path)})
    with pytest.raises(UsageError, match="--sample with --data-root"):
        find_data(tmp_path, sample=True)


def test_the_data_root_is_the_flag_then_the_environment(data_root, tmp_path):
    chosen = find_data(data_root, environ={"TZK_DATA_ROOT": str(tmp_path)})
    assert (chosen.root, chosen.source) == (data_root, "--data-root")
    chosen = find_data(None, environ={"TZK_DATA_ROOT": str(data_root)})
    assert (chosen.root, chosen.source) == (data_root, "TZK_DATA_ROOT")
    assert chosen.manifest("mnist").is_file()


def test_beside_a_checkout_the_shared_data_is_found_else_the_sample(data_root, tmp_path):
    checkout = tmp_path / "work" / "tzk"
    checkout.mkdir(parents=True)
    (tmp_path / "work" / "shared").mkdir()
    (tmp_path / "work" / "shared" / "data").symlink_to(data_root)
    chosen = find_data(None, environ={}, cwd=checkout)
    assert chosen.source == "checkout"
    assert not find_data(None, environ={}, sample=True).root.samefile(data_root)
    assert sample_choice().root == SAMPLE
