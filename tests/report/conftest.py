from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.quickstart.pipeline import quickstart_output


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the shared quickstart on the shipped sample (report written)."""
    out, result = quickstart_output(tmp_path_factory.mktemp("shared-quickstart"))
    assert result.code == 0, result.stderr[-3000:]
    return out / "run"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The ``chromium`` executable; installed with apt-get (as root) when it is missing."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and "
                    "apt-get: apt-get install -y chromium)")
    try:
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            subprocess.run(command, capture_output=True, check=True, timeout=900,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as error:
        pytest.skip(f"chromium is not installed and apt-get install -y chromium failed: "
                    f"{str(error)[:200]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get install -y chromium ran but no chromium is on the PATH")
    return found
