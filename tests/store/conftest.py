"""Store fixtures: the full real store (built once per session) and a small real store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.store.fixtures import MANIFESTS, build_small_store


@pytest.fixture(scope="session")
def full_store(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """All three bundled sources ingested from the real data (about 3 s, once)."""
    from tzkcli.store import ingest, load_manifest

    path = tmp_path_factory.mktemp("full") / "tzk.h5"
    names = ("mnist", "omniglot", "omniglot-atlas")
    ingest([load_manifest(MANIFESTS / f"{n}.toml") for n in names], path, data_root)
    return path


@pytest.fixture(scope="session")
def small_store_template(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A small real store (a few hundred images of each source); never modify it."""
    return build_small_store(tmp_path_factory.mktemp("small") / "small.h5", data_root)


@pytest.fixture
def small_store(tmp_path: Path, small_store_template: Path) -> Path:
    """A private copy of the small store that a test may append to or damage."""
    path = tmp_path / "store.h5"
    shutil.copyfile(small_store_template, path)
    return path
