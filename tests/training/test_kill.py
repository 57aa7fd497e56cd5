"""A real ``python -m tzkcli train`` killed with SIGKILL while writing a checkpoint resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_tzk_process
from tests.training.conftest import TINY
from tzkcli.training import checkpoint as ckpt


def _kill_during_checkpoint_write(store: Path, run: Path) -> bool:
    """Start a run that checkpoints every step; SIGKILL it as soon as a checkpoint is being
    written. True when the kill left a half-written temporary checkpoint behind."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tzkcli", "train", "--store", str(store), "--out", str(run),
         *TINY, "--steps", "100000", "--checkpoint-every", "1", "--val-images", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoints = run / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoints.is_dir() and len(ckpt.list_checkpoints(checkpoints)) >= 2 and any(
                entry.name.startswith(".tmp-step-") for entry in os.scandir(checkpoints)
            ):
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    return process.returncode == -signal.SIGKILL and any(checkpoints.glob(".tmp-step-*"))


def test_sigkill_during_checkpoint_write_resumes_from_an_intact_one(
    small_store: Path, tmp_path: Path
) -> None:
    for attempt in range(5):
        run = tmp_path / f"killed-{attempt}"
        if _kill_during_checkpoint_write(small_store, run):
            break
    else:
        raise AssertionError("never caught the process inside a checkpoint write")

    survivors = ckpt.list_checkpoints(run / "checkpoints")
    for checkpoint in survivors:
        ckpt.verify(checkpoint)
    latest = survivors[-1].step

    result = run_tzk_process("train", "--resume", run, "--steps", latest + 2, "--quiet")
    assert result.code == 0, result.stderr
    assert ckpt.list_checkpoints(run / "checkpoints")[-1].step == latest + 2
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_sigterm_checkpoints_the_last_step_and_exits_130(small_store: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "stopped"
    process = subprocess.Popen(
        [sys.executable, "-m", "tzkcli", "train", "--store", str(small_store), "--out", str(run),
         *TINY, "--steps", "100000", "--checkpoint-every", "100000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"type": "train"') >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    ckpt.verify(last)
    assert last.step >= 3


def test_resume_removes_stale_temporaries_of_the_run_files(tzk, small_store: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "litter"
    assert tzk("train", "--store", small_store, "--out", run, *TINY, "--steps", "1").code == 0
    for stem in ("run.json", "config.toml"):
        (run / f".tmp-{stem}.abc123").write_text("half written")

    assert tzk("train", "--resume", run, "--steps", "2").code == 0
    assert not list(run.glob(".tmp-*"))
