"""One real ``tzk quickstart`` on the shipped sample, shared by the quickstart and report tests.

It runs once per test session (a subprocess, as a user runs it) with a tiny model trained for
three steps; every later request gets the same folder and result.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Result, run_tzk_process

TINY = """\
levels = 2
flow_steps = 2
hidden = 16
steps = 3
batch_size = 16
warmup = 1
val_images = 30
val_every = 1
log_every = 1
checkpoint_every = 3
"""

_done: dict[str, tuple[Path, Result]] = {}


def quickstart_output(root: Path) -> tuple[Path, Result]:
    """``(OUT, result)`` of ``tzk quickstart --sample --config tiny.toml`` into ``root``."""
    if "out" not in _done:
        config = root / "tiny.toml"
        config.write_text(TINY, encoding="utf-8")
        out = root / "quickstart"
        result = run_tzk_process("quickstart", "--out", out, "--sample", "--time-budget", "5",
                                 "--config", config, "--device", "cpu", timeout=900)
        _done["out"] = (out, result)
    return _done["out"]
