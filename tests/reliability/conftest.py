"""Fixtures for the reliability tests, and the ledger that counts every fault they try.

Each test calls ``ledger.tried(fault, command, did=..., code=..., lost=...)`` once per fault
it injected, after checking what tzk did and what survived. With ``TZK_RELIABILITY_RECORD=FILE``
set, the session writes the ledger (plus the machine, the date and the pass/fail counts) to
FILE as JSON; ``scripts/reliability_report.py FILE`` renders it as ``docs/reliability.md``.

Stores are small real ones (``tests/store/fixtures.py``); the run is a tiny model (2 levels, 2
flow steps, 16 hidden channels) trained for 4 steps.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.store.fixtures import REPO, write_small_sources, write_unlabelled_manifest
from tests.tiny import TINY_FLAGS as TINY_RUN_FLAGS
from tests.tiny import one_thread, train_tiny_run

RECORD_ENV = "TZK_RELIABILITY_RECORD"
TINY_FLAGS = [*TINY_RUN_FLAGS, "--device", "cpu"]

# tests elsewhere in the suite that already try a fault of this table, counted by hand
ELSEWHERE = [
    ("manifest mutated field by field (Hypothesis, 300 examples)", "ingest",
     "tests/store/test_manifest.py::test_fuzz_mutated_manifests"),
    ("manifest of arbitrary text (Hypothesis, 200 examples)", "ingest",
     "tests/store/test_manifest.py::test_fuzz_arbitrary_text"),
    ("source files (IDX, PNG, zip, npz) truncated and patched (Hypothesis)", "ingest",
     "tests/store/test_readers.py::test_fuzz_idx_bytes, test_fuzz_png_zip_npz_bytes"),
    ("gzip bomb, npz with pickled objects", "ingest",
     "tests/store/test_readers.py::test_gzip_bomb_is_refused, test_npz_refuses_objects"),
    ("store with a damaged key (format, version, shape, codes, domain, rows...)", "info",
     "tests/store/test_store_format.py::test_damaged_store_names_the_key"),
    ("second ingest while the first holds the store", "ingest",
     "tests/store/test_crash_safety.py::test_second_writer_fails_at_once"),
    ("SIGKILL of ingest appending full MNIST (4, 16 slow)", "ingest",
     "tests/store/test_crash_safety.py"),
    ("SIGKILL during a checkpoint write, SIGTERM", "train", "tests/training/test_kill.py"),
    ("truncated or flipped checkpoint file, failed checkpoint write", "train",
     "tests/training/test_checkpoint.py"),
    ("model weights that unpickle code; damaged weights", "sample",
     "tests/model/test_save_load.py::test_a_pickle_that_would_run_code_is_refused"),
    ("non-finite losses until the run gives up", "train",
     "tests/training/test_train.py (exit 5, usable checkpoint)"),
    ("unknown config key, wrong type, not TOML", "train", "tests/training/test_config.py"),
    ("valid input end to end (exit 0); resume after a stop", "quickstart",
     "tests/quickstart/test_quickstart.py"),
]


@dataclass
class Row:
    """One fault of the table: how often it was tried and what tzk did each time."""

    fault: str
    command: str
    tries: int = 0
    did: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    example: str = ""
    tests: set = field(default_factory=set)


class Ledger:
    """Faults tried in this session, in first-tried order."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.current = ""

    def tried(self, fault: str, command: str, did: str, code: int | None = None,
              lost: str = "nothing", message: str = "") -> None:
        """Count one try of ``fault`` on ``command``: what it ``did``, its exit ``code``,
        what was ``lost`` (``nothing`` when every artifact checked out), one ``message``."""
        row = self.rows.setdefault((fault, command), Row(fault, command))
        row.tries += 1
        row.did[did] += 1
        if code is not None:
            row.codes[str(code)] += 1
        row.lost[lost] += 1
        if message and not row.example:
            row.example = " ".join(message.split())[:200]
        row.tests.add(self.current)

    def to_json(self) -> list[dict]:
        return [{"fault": r.fault, "command": r.command, "tries": r.tries, "did": dict(r.did),
                 "codes": dict(r.codes), "lost": dict(r.lost), "example": r.example,
                 "tests": sorted(r.tests)} for r in self.rows.values()]


LEDGER = Ledger()
COUNTS: Counter = Counter()
STARTED = time.time()


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    LEDGER.current = request.node.nodeid.split("tests/reliability/")[-1]
    return LEDGER


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/reliability/" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        COUNTS[report.outcome] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(RECORD_ENV)
    if not target:
        return
    import h5py
    import torch

    document = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(STARTED)),
        "seconds": round(time.time() - STARTED, 1),
        "slow": bool(session.config.getoption("--slow")),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version},
        "outcomes": dict(COUNTS),
        "rows": LEDGER.to_json(),
        "elsewhere": [{"fault": f, "command": c, "tests": t} for f, c, t in ELSEWHERE],
    }
    Path(target).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


# -- the real data, cut down -----------------------------------------------------------------


@pytest.fixture(scope="package", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread here and in subprocesses (a shared 2-core machine; and a run
    resumed here must compute as the killed subprocess did, bit for bit)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Cut-down real sources and manifests (the data root of the manifests in it), plus
    ``mnist-unlabelled.toml``."""
    work = tmp_path_factory.mktemp("reliability-sources")
    write_small_sources(data_root, work)
    write_unlabelled_manifest(work)
    return work


def make_store(sources: Path, path: Path, names: list[str]) -> Path:
    from tzkcli.store import ingest, load_manifest

    ingest([load_manifest(sources / f"{name}.toml") for name in names], path, sources)
    return path


@pytest.fixture(scope="session")
def weak_store(sources: Path) -> Path:
    """300 MNIST images without labels and 100 atlas images (1x32x32): the training store."""
    return make_store(sources, sources / "weak.h5", ["mnist-unlabelled", "omniglot-atlas"])


@pytest.fixture(scope="session")
def full_store(sources: Path) -> Path:
    """The same MNIST images with labels, and the atlas: the store ``tzk extend`` fits on."""
    return make_store(sources, sources / "full.h5", ["mnist", "omniglot-atlas"])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, weak_store: Path) -> Path:
    """A tiny model trained for 4 steps on ``weak_store`` (read-only: copy it)."""
    run = tmp_path_factory.mktemp("reliability-runs") / "run"
    return train_tiny_run(weak_store, run, checkpoint_every=2)


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture
def store_copy(weak_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.h5"
    shutil.copyfile(weak_store, copy)
    return copy


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


def tzk_process(*args: object, timeout: float = 600) -> Done:
    """``python -m tzkcli ARGS`` as a real subprocess, in the repository."""
    done = subprocess.run([sys.executable, "-m", "tzkcli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return Done(done.returncode, done.stdout, done.stderr)


def start_tzk(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tzkcli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but lock files, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock") and p.name != ".lock"}


def one_error_line(stderr: str) -> str:
    """The single ``Error:`` line of a failed command (asserting there is exactly one)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".tmp-*"))


@dataclass
class Mounts:
    """Small file systems mounted for a test, unmounted after it."""

    points: list[Path] = field(default_factory=list)

    def tmpfs(self, where: Path, size: int) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root "
                        "and CAP_SYS_ADMIN")
        self.points.append(where)
        return where

    def read_only(self, source: Path, where: Path) -> Path:
        """``source`` bind-mounted read-only at ``where``."""
        where.mkdir(parents=True, exist_ok=True)
        for command in (["mount", "--bind", str(source), str(where)],
                        ["mount", "-o", "remount,bind,ro", str(where)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"cannot make a read-only bind mount ({done.stderr.strip()}); "
                            "needs root and CAP_SYS_ADMIN")
            if command[1] == "--bind":
                self.points.append(where)
        return where

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.points.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    made = Mounts()
    yield made
    made.unmount_all()
