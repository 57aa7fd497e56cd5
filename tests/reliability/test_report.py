"""The ledger and its rendering as docs/reliability.md (scripts/reliability_report.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.reliability.conftest import ELSEWHERE, REPO, Ledger


def test_ledger_counts_and_the_script_renders_every_row(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.current = "test_x.py::test_y"
    for code in (-9, -9, 0):
        ledger.tried("SIGKILL | at a moment", "ingest", "killed" if code else "finished", code)
    ledger.tried("disk full", "sample", "refused", 5, message="Error: x:\n no space left")
    document = {"date": "2026-12-03 19:00 UTC", "seconds": 90.0, "slow": True,
                "machine": {"platform": "Linux", "cpus": 2, "python": "3.11", "torch": "2",
                            "h5py": "3", "hdf5": "1.14"},
                "outcomes": {"passed": 3}, "rows": ledger.to_json(),
                "elsewhere": [{"fault": f, "command": c, "tests": t} for f, c, t in ELSEWHERE]}
    record = tmp_path / "record.json"
    record.write_text(json.dumps(document))

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "reliability_report.py"),
                           str(record)], capture_output=True, text=True, check=True)
    page = done.stdout
    assert "2 faults and bad inputs, 4 tries; lost in any of them: nothing." in page
    assert ("| SIGKILL \\| at a moment | ingest | 3 | killed (2); finished (1) | -9 ×2, 0 | "
            "nothing |") in page
    assert "e.g. `Error: x: no space left`" in page
    assert all(f"`{t}`" in page for _, _, t in ELSEWHERE)
    assert "3 tests passed" in page and "2 CPUs" in page and "--slow" in page
