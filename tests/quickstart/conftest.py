from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Result
from tests.quickstart.pipeline import quickstart_output


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """The shared quickstart on the shipped sample: ``(OUT, result)``."""
    return quickstart_output(tmp_path_factory.mktemp("shared-quickstart"))
