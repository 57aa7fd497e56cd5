"""DDP with 2 CPU processes (gloo, under torchrun) matches one process with the same batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import TINY
from tzkcli.training.metrics import read_metrics

# The processes differ from one process only in the order of floating-point sums (the gradient
# is the mean of two half-batch means instead of one full-batch mean). Adam normalises each
# gradient, so for parameters whose gradient is nearly zero that rounding can show up as a
# sizeable fraction of a step: the test bounds the whole difference relative to the last step's
# movement (which unsynchronised or wrongly sharded processes would make of order 1), and every
# single parameter by the learning rate. The first loss must agree to float rounding: the same
# images and the same dequantisation noise on both sides.
TOLERANCE = 0.01
LEARNING_RATE = 1e-3


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
    difference = torch.cat([(two[k] - one[k]).flatten() for k in floating])
    last_step = torch.cat([(one[k] - before[k]).flatten() for k in floating])
    print(f"DDP vs one process after 3 steps: max |difference| {difference.abs().max():.2e}, "
          f"relative to the last step {difference.norm() / last_step.norm():.2e}")

    assert float(difference.norm() / last_step.norm()) < TOLERANCE
    assert float(difference.abs().max()) < LEARNING_RATE
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if r["type"] == "train"]
              for run in ("ddp", "single")]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    config = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"world_size": 2' in config
