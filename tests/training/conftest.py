"""Fixtures for training tests: the store engineer's small real store, tiny model flags."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store.fixtures import build_small_store

TINY = ["--levels", "2", "--flow-steps", "2", "--hidden", "16", "--batch-size", "16",
        "--val-images", "32", "--warmup", "2", "--log-every", "1", "--quiet"]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """300 MNIST, 180 Omniglot and 100 atlas images (1x32x32), from the real data."""
    return build_small_store(tmp_path_factory.mktemp("store") / "small.h5", data_root)


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread here and in subprocesses, for every training test and fixture:
    tiny models gain nothing from more, on a shared machine OpenMP threads that wait for busy
    cores slow every step tenfold, and runs compared bit for bit must use the same count."""
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
