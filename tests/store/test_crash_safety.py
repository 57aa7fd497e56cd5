"""Crash safety and exclusive writing, with real ``tzk ingest`` subprocesses.

A killed ingest (SIGKILL at seeded moments) must leave the previous store byte for byte, or
the complete new one; a second writer must fail at once while the first holds the store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_tzk_process
from tests.store.fixtures import MANIFESTS, REPO, sha256
from tzkcli.store import open_store

FULL_MNIST = "mnist-full"


def full_mnist_manifest(tmp_path: Path) -> Path:
    """The real MNIST manifest under another dataset name, to append to the small store."""
    text = (MANIFESTS / "mnist.toml").read_text().replace('name = "mnist"',
                                                          f'name = "{FULL_MNIST}"')
    path = tmp_path / "mnist-full.toml"
    path.write_text(text.replace("[kinds.label]", '[kinds.label]\nnamespace = "mnist"'))
    return path


def start_ingest(manifest: Path, store: Path, data_root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tzkcli", "ingest", str(manifest), "--store", str(store),
         "--data-root", str(data_root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


def check_after_kill(store: Path, old_bytes_sha: str) -> str:
    """The store is the old one byte for byte, or a complete, valid new one."""
    if sha256(store) == old_bytes_sha:
        return "old"
    with open_store(store) as opened:
        assert FULL_MNIST in opened.values("dataset")
        assert opened.compute_digest() == opened.digest
    return "new"


def kill_moments(seed: int, count: int, duration: float) -> list[tuple[str, float]]:
    """Half uniform over a whole run, half shortly after the temporary store appears."""
    rng = random.Random(seed)
    moments = []
    for i in range(count):
        if i % 2 == 0:
            moments.append(("start", rng.uniform(0.0, duration)))
        else:
            moments.append(("temporary", rng.uniform(0.0, 0.4)))
    return moments


def run_kills(small_store: Path, tmp_path: Path, data_root: Path, seed: int,
              count: int) -> list[str]:
    manifest = full_mnist_manifest(tmp_path)
    old_bytes = small_store.read_bytes()
    old_sha = sha256(small_store)
    # calibrate: how long one uninterrupted run takes here and now (on a copy)
    probe = tmp_path / "probe.h5"
    probe.write_bytes(small_store.read_bytes())
    started = time.monotonic()
    assert run_tzk_process("ingest", manifest, "--store", probe, "--data-root",
                           data_root).code == 0
    duration = time.monotonic() - started

    outcomes = []
    for anchor, delay in kill_moments(seed, count, duration):
        process = start_ingest(manifest, small_store, data_root)
        if anchor == "temporary":
            wait_for(lambda: list(small_store.parent.glob(f".tmp-{small_store.name}*"))
                     or process.poll() is not None)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcome = check_after_kill(small_store, old_sha)
        outcomes.append(outcome)
        if outcome == "new":  # the rename happened before the kill: start from the old again
            small_store.write_bytes(old_bytes)

    # the next writer runs to the end and clears what the killed ones left
    result = run_tzk_process("ingest", manifest, "--store", small_store, "--data-root",
                             data_root)
    assert result.code == 0, result.stderr
    assert not list(small_store.parent.glob(".tmp-*"))
    assert check_after_kill(small_store, old_sha) == "new"
    return outcomes


def test_sigkill_at_seeded_moments_leaves_old_or_new_store(small_store: Path,
                                                           tmp_path: Path, data_root: Path):
    outcomes = run_kills(small_store, tmp_path, data_root, seed=2, count=4)
    assert "old" in outcomes  # at least one kill landed before the rename


@pytest.mark.slow
def test_sigkill_at_many_seeded_moments(small_store: Path, tmp_path: Path,
                                        data_root: Path):
    outcomes = run_kills(small_store, tmp_path, data_root, seed=11, count=16)
    assert "old" in outcomes


def test_second_writer_fails_at_once_while_the_first_holds_the_store(
        small_store: Path, tmp_path: Path, data_root: Path, tzk):
    # the first writer blocks reading a FIFO in place of a source file, holding the lock
    real = data_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    for name in os.listdir(data_root / "mnist"):
        if name != real.name:
            os.symlink(data_root / "mnist" / name, root / "mnist" / name)
    fifo = root / "mnist" / real.name
    os.mkfifo(fifo)
    manifest = full_mnist_manifest(tmp_path)
    before = small_store.read_bytes()

    first = start_ingest(manifest, small_store, root)
    lock = small_store.with_name(small_store.name + ".lock")
    try:
        assert wait_for(lambda: lock.exists() and lock.read_text() == str(first.pid))
        started = time.monotonic()
        second = tzk("ingest", manifest, "--store", small_store, "--data-root", data_root)
        assert time.monotonic() - started < 5.0
        assert second.code == 4
        line = second.stderr.strip()
        assert line.startswith("Error: ") and "\n" not in line
        assert f"pid {first.pid}" in line and str(small_store) in line
        assert small_store.read_bytes() == before

        with open(fifo, "wb") as pipe:  # let the first writer finish
            pipe.write(real.read_bytes())
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    with open_store(small_store) as store:
        assert FULL_MNIST in store.values("dataset")
