"""DDP with 2 CPU processes (gloo, under torchrun) matches one process with the same batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.training.conftest import TINY

# Parameters after 3 steps may differ by floating-point summation order only (the gradient is
# the mean of two half-batch means instead of one full-batch mean); each step moves them by
# about the learning rate (1e-3), so this tolerance is 50 times tighter than one step.
TOLERANCE = 2e-5


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from tzkcli.model import TzK

    return TzK.load(run / "checkpoints" / f"step-{step:08d}" / "model").state_dict()


def test_two_gloo_processes_match_one(tzk, small_store: Path, tmp_path: Path) -> None:
    flags = [*TINY, "--steps", "3", "--checkpoint-every", "1", "--device", "cpu"]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tzkcli", "train", "--store", str(small_store), "--out", str(tmp_path / "ddp"),
         *flags],
        capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = tzk("train", "--store", small_store, "--out", tmp_path / "single", *flags)
    assert single.code == 0, single.stderr

    two, one = _weights(tmp_path / "ddp", 3), _weights(tmp_path / "single", 3)
    before = _weights(tmp_path / "single", 2)
    floating = [k for k in one if one[k].is_floating_point()]
    worst = max(float((two[k] - one[k]).abs().max()) for k in floating)
    moved = max(float((one[k] - before[k]).abs().max()) for k in floating)

    assert worst < TOLERANCE
    assert moved > 50 * TOLERANCE
    config = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"world_size": 2' in config
