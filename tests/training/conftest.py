"""Fixtures for training tests: the store engineer's small real store, tiny model flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.store.fixtures import build_small_store

TINY = ["--levels", "2", "--flow-steps", "2", "--hidden", "16", "--batch-size", "16",
        "--val-images", "32", "--warmup", "2", "--log-every", "1", "--quiet"]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """300 MNIST, 180 Omniglot and 100 atlas images (1x32x32), from the real data."""
    return build_small_store(tmp_path_factory.mktemp("store") / "small.h5", data_root)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread here and in subprocesses: tiny models gain nothing from more, and
    on a shared machine OpenMP threads that wait for busy cores slow every step tenfold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)
