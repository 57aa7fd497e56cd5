"""Fixtures for training tests: the store engineer's small real store, tiny model flags."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store.fixtures import build_small_store
from tests.tiny import TINY_FLAGS, one_thread

TINY = TINY_FLAGS


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """300 MNIST, 180 Omniglot and 100 atlas images (1x32x32), from the real data."""
    return build_small_store(tmp_path_factory.mktemp("store") / "small.h5", data_root)


@pytest.fixture(scope="package", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread for every training test and fixture (``tests.tiny.one_thread``)."""
    with one_thread():
        yield
