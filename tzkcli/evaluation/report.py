"""Evaluation results in the run directory: ``RUN/eval/CHECKPOINT-SPLIT.json``, atomically.

The file holds exactly what ``tzk eval --json`` prints, so a result can be read back later
without recomputing it; a new evaluation of the same checkpoint and split replaces it whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tzkcli import fsio

EVAL_DIR = "eval"


def results_path(run: Path, checkpoint: str, split: str | None) -> Path:
    """Where the results of ``checkpoint`` on ``split`` are written."""
    return Path(run) / EVAL_DIR / f"{checkpoint}-{split or 'all'}.json"


def finite(data: Any) -> Any:
    """``data`` with NaN and infinities as None, so that it is strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def write_results(run: Path, checkpoint: str, split: str | None, report: dict[str, Any]) -> Path:
    """Write ``report`` to :func:`results_path`, all or nothing; return the path."""
    path = results_path(run, checkpoint, split)
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as error:
        raise fsio.write_error(path.parent, error) from error
    fsio.atomic_write_text(path, json.dumps(finite(report), indent=2) + "\n")
    return path
