"""Fixtures for eval, extend, sample and encode: two small real stores and a tiny trained run.

``weak_store`` holds MNIST without its labels and the Omniglot atlas; ``full_store`` the same
MNIST images with labels, the Omniglot zips (alphabet, character) and the atlas. ``weak_run``
is a tiny model (2 levels, 2 steps, 16 hidden channels) trained for a few steps on
``weak_store`` with the training library, so that ``label``, ``alphabet`` and the dataset
``omniglot`` are new knowledge for it, as in the model documentation's second way to learn.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.store.fixtures import write_small_sources, write_unlabelled_manifest
from tests.tiny import train_tiny_run


@pytest.fixture(scope="session")
def eval_sources(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Cut-down real sources and manifests, plus ``mnist-unlabelled.toml`` without labels."""
    work = tmp_path_factory.mktemp("eval-sources")
    write_small_sources(data_root, work)
    write_unlabelled_manifest(work)
    return work


def _store(sources: Path, path: Path, names: list[str],
           shape: tuple[int, int, int] | None = None) -> Path:
    from tzkcli.store import ingest, load_manifest

    ingest([load_manifest(sources / f"{name}.toml") for name in names], path, sources,
           shape=shape)
    return path


@pytest.fixture(scope="session")
def weak_store(eval_sources: Path) -> Path:
    """300 MNIST images without labels and 100 atlas images, 1x32x32."""
    return _store(eval_sources, eval_sources.parent / "weak.h5",
                  ["mnist-unlabelled", "omniglot-atlas"])


@pytest.fixture(scope="session")
def full_store(eval_sources: Path) -> Path:
    """The same MNIST images with labels, 180 Omniglot images and the atlas, 1x32x32."""
    return _store(eval_sources, eval_sources.parent / "full.h5",
                  ["mnist", "omniglot", "omniglot-atlas"])


@pytest.fixture(scope="session")
def omniglot_store(eval_sources: Path) -> Path:
    """180 Omniglot images alone: a store of no dataset the weak model knows."""
    return _store(eval_sources, eval_sources.parent / "omniglot.h5", ["omniglot"])


@pytest.fixture(scope="session")
def small_shape_store(eval_sources: Path) -> Path:
    """The atlas alone at 1x64x64: a store whose shape does not fit the model."""
    return _store(eval_sources, eval_sources.parent / "atlas64.h5", ["omniglot-atlas"],
                  shape=(1, 64, 64))


@pytest.fixture(scope="session")
def weak_run(tmp_path_factory: pytest.TempPathFactory, weak_store: Path) -> Path:
    """A tiny model trained for 4 steps on ``weak_store`` (read-only for tests: copy it)."""
    return train_tiny_run(weak_store, tmp_path_factory.mktemp("eval-runs") / "weak")


@pytest.fixture
def run_copy(weak_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``weak_run`` that a test may change."""
    copy = tmp_path / "run"
    shutil.copytree(weak_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but lock files) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}
