"""What many test packages share: a tiny model's training flags, a tiny trained run, and one
intra-op thread.

The tiny model has 2 levels, 2 flow steps and 16 hidden channels; on this 2-core machine it
trains at over a thousand images a second.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Flags of `tzk train` for the tiny model (no budget, no device: tests add their own).
TINY_FLAGS = ["--levels", "2", "--flow-steps", "2", "--hidden", "16", "--batch-size", "16",
              "--val-images", "32", "--warmup", "2", "--log-every", "1", "--quiet"]

# The same model as training fields, with a budget of 4 steps on the CPU.
TINY_RUN = {"levels": 2, "flow_steps": 2, "hidden": 16, "batch_size": 16, "val_images": 32,
            "warmup": 2, "steps": 4, "checkpoint_every": 4, "val_every": 4, "quiet": True,
            "device": "cpu", "seed": 0}


def train_tiny_run(store: Path, run: Path, **fields: Any) -> Path:
    """Train the tiny model on ``store`` into the new directory ``run`` with the training
    library (``fields`` override ``TINY_RUN``); return ``run``."""
    from tzkcli.training import resolve, start_run

    start_run(store, run, resolve({}, {**TINY_RUN, **fields}, "tests"))
    return run


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread here and in subprocesses (``OMP_NUM_THREADS``), restored after.

    Tiny models gain nothing from more; on a shared machine OpenMP threads that wait for busy
    cores slow every step tenfold; and runs compared bit for bit must use the same count.
    """
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
