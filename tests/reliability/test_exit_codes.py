"""Every command's exit codes: 0 success, 2 usage, 3 bad input, 4 busy (5 and 130 where a
command can fail mid-run: see test_disk.py, test_concurrency.py and tests/training).

Busy is a real ``flock`` held by this test process on the store or run's lock file: a tzk
command run here opens the lock file afresh, and ``flock`` locks belong to the open file,
so it is refused exactly as if another process held it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.reliability.conftest import TINY_FLAGS, Ledger, one_error_line
from tzkcli import fsio

COMMANDS = ["ingest", "info", "train", "extend", "sample", "eval", "encode", "report",
            "quickstart"]


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_errors_exit_2(command: str, tzk, ledger: Ledger) -> None:
    result = tzk(command, "--no-such-flag")
    assert result.code == 2, result.stderr
    assert "no-such-flag" in result.stderr and "Traceback" not in result.stderr
    ledger.tried("unknown flag", command, "usage error", result.code)


@pytest.fixture
def paths(tmp_path: Path, weak_store: Path, full_store: Path, run_copy: Path,
          sources: Path) -> dict[str, Path]:
    return {"tmp": tmp_path, "store": weak_store, "full": full_store, "run": run_copy,
            "sources": sources, "missing": tmp_path / "missing"}


def bad_input(p: dict[str, Path]) -> dict[str, list[object]]:
    """One invocation per command whose input is missing or wrong."""
    return {
        "ingest": ["ingest", p["missing"] / "m.toml", "--store", p["tmp"] / "s.h5",
                   "--data-root", p["sources"]],
        "info": ["info", p["missing"] / "s.h5"],
        "train": ["train", "--store", p["missing"] / "s.h5", "--out", p["tmp"] / "r"],
        "extend": ["extend", p["missing"], "--condition", "label"],
        "sample": ["sample", p["missing"], "--out", p["tmp"] / "g.png"],
        "eval": ["eval", p["missing"], "--store", p["store"]],
        "encode": ["encode", p["run"], "--store", p["store"], "--condition", "label=x",
                   "--out", p["tmp"] / "c.npy"],
        "report": ["report", p["missing"]],
        "quickstart": ["quickstart", "--out", p["sources"]],  # exists and is not empty
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_exits_3(command: str, paths: dict[str, Path], tzk,
                           ledger: Ledger) -> None:
    result = tzk(*bad_input(paths)[command])
    assert result.code == 3, result.stderr
    line = one_error_line(result.stderr)
    ledger.tried("missing or wrong input file", command, "one line naming it", result.code,
                 message=line)


def busy(p: dict[str, Path]) -> dict[str, tuple[Path, list[object]]]:
    """The artifact each writing command locks, and an invocation that needs it."""
    store = p["tmp"] / "busy.h5"
    shutil.copyfile(p["store"], store)
    return {
        "ingest": (store, ["ingest", p["sources"] / "omniglot.toml", "--store", store,
                           "--data-root", p["sources"]]),
        "train": (p["run"], ["train", "--resume", p["run"], "--steps", "6", "--quiet"]),
        "extend": (p["run"], ["extend", p["run"], "--store", p["full"], "--condition",
                              "label", "--device", "cpu"]),
    }


@pytest.mark.parametrize("command", ["ingest", "train", "extend"])
def test_busy_exits_4_at_once(command: str, paths: dict[str, Path], tzk,
                              ledger: Ledger) -> None:
    import time

    target, args = busy(paths)[command]
    what = "store" if command == "ingest" else "run directory"
    with fsio.exclusive_lock(target, what):
        started = time.monotonic()
        result = tzk(*args)
        seconds = time.monotonic() - started
    assert result.code == 4, result.stderr
    line = one_error_line(result.stderr)
    assert "in use by another tzk process" in line and str(target) in line
    ledger.tried("store or run locked by another process", command,
                 f"refused at once ({seconds:.1f} s), naming the holder's pid", result.code,
                 message=line)


def test_every_command_succeeds_with_0(paths: dict[str, Path], tzk, ledger: Ledger) -> None:
    p = paths
    store = p["tmp"] / "new.h5"
    out = p["tmp"]
    steps = [
        ("ingest", ["ingest", p["sources"] / "omniglot-atlas.toml", "--store", store,
                    "--data-root", p["sources"]]),
        ("info", ["info", store, "--verify"]),
        ("train", ["train", "--store", p["store"], "--out", out / "new-run", *TINY_FLAGS,
                   "--steps", "2"]),
        ("extend", ["extend", p["run"], "--store", p["full"], "--condition", "label",
                    "--device", "cpu", "--prior", "label=bottleneck:2"]),
        ("sample", ["sample", p["run"], "--out", out / "grid.png", "-n", "4", "--device",
                    "cpu"]),
        ("eval", ["eval", p["run"], "--store", p["full"], "--samples", "2", "--device",
                  "cpu"]),
        ("encode", ["encode", p["run"], "--store", p["full"], "--condition", "label=mnist/3",
                    "--out", out / "codes.npy", "--device", "cpu"]),
        ("report", ["report", p["run"], "--no-samples", "--out", out / "report.html"]),
    ]
    for command, args in steps:
        result = tzk(*args)
        assert result.code == 0, (command, result.stderr)
        ledger.tried("valid input", command, "success", 0)
