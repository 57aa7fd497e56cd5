"""Shared fixtures: the real data root, and ways to run ``tzk`` as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`bash .ci/run &`) with SIGINT ignored, and Python then
    # keeps it ignored, in this process and in every `tzk` the tests start. The tests of Ctrl-C
    # need Python's own handler, which a user's foreground shell gives; install it here. (A
    # handler set from Python resets to the default at exec, so the children get theirs.)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder of real datasets: ``TZK_DATA_ROOT``, else ``../shared/data`` beside the repo."""
    root = Path(os.environ.get("TZK_DATA_ROOT", REPO.parent / "shared" / "data"))
    if not (root / "mnist").is_dir():
        pytest.skip(f"real data not found at {root} (set TZK_DATA_ROOT)")
    return root


@dataclass
class Result:
    """What one ``tzk`` invocation did."""

    code: int
    stdout: str
    stderr: str


@pytest.fixture
def tzk(capsys: pytest.CaptureFixture[str]):
    """Run ``tzk ARGS...`` in this process; return its exit code and captured output."""
    from tzkcli.cli import main

    def run(*args: str | os.PathLike[str]) -> Result:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def run_tzk_process(*args: str | os.PathLike[str], timeout: float = 600, **kwargs) -> Result:
    """Run ``python -m tzkcli ARGS...`` as a real subprocess."""
    done = subprocess.run(
        [sys.executable, "-m", "tzkcli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )
    return Result(done.returncode, done.stdout, done.stderr)
