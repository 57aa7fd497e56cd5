"""Opening a run directory for the commands that read a trained model (eval, sample, extend).

A tzk run is a directory with ``run.json`` (written by ``tzk train`` and ``tzk extend``) that
names its ``latest`` and ``best`` checkpoints under ``RUN/checkpoints/``. A checkpoint is
verified against its ``integrity.json`` before its model is loaded, so a truncated or altered
checkpoint is reported by name and never used.

Checkpoints written by ``tzk extend`` are named ``step-NNNNNNNN-extend-K`` (the step of the
checkpoint they extend, then a counter): ``tzk train --resume`` ignores them and continues the
base model's training, and ``run.json`` names them as ``latest``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tzkcli.errors import BadInputError

RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"


@dataclass
class OpenRun:
    """A run directory and the model of one of its checkpoints.

    Attributes:
        path: the run directory.
        record: ``run.json`` as read.
        checkpoint: the checkpoint's directory name (``step-00001000``).
        checkpoint_path: its path.
        model: the loaded ``TzK`` model, on the CPU, in eval mode.
    """

    path: Path
    record: dict[str, Any]
    checkpoint: str
    checkpoint_path: Path
    model: Any


def read_run_record(run: str | os.PathLike[str]) -> dict[str, Any]:
    """``RUN/run.json`` as a dict.

    Raises:
        BadInputError: ``run`` is not a directory, or has no readable ``run.json`` (not a run).
    """
    run = Path(run)
    path = run / RUN_RECORD
    if not run.is_dir():
        raise BadInputError(f"{run}: no such run directory; expected a run made by tzk train")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(
            f"{run}: not a tzk run (no {RUN_RECORD}); expected a run made by tzk train"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadInputError(f"{path}: unreadable or not JSON ({error})") from None
    if not isinstance(record, dict):
        raise BadInputError(f"{path}: found {type(record).__name__}, expected a JSON object")
    return record


def checkpoint_path(run: Path, record: dict[str, Any], which: str = "latest") -> Path:
    """The directory of checkpoint ``which``: ``latest``, ``best`` or a checkpoint name.

    Raises:
        BadInputError: the record names no such checkpoint, or it is not on disk.
    """
    name = record.get(which) if which in ("latest", "best") else which
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise BadInputError(
            f"{run / RUN_RECORD}: {which} checkpoint is {name!r}; expected the name of a "
            "checkpoint under checkpoints/"
        )
    path = run / CHECKPOINTS / name
    if not path.is_dir():
        known = sorted(p.name for p in (run / CHECKPOINTS).glob("step-*") if p.is_dir())
        raise BadInputError(
            f"--checkpoint {name}: not found in {run / CHECKPOINTS}; expected one of "
            f"{', '.join(known) or 'none (the run has no checkpoint yet)'}"
        )
    return path


def open_run(run: str | os.PathLike[str], which: str = "latest") -> OpenRun:
    """Read ``run.json``, verify checkpoint ``which`` and load its model (CPU, eval mode).

    Raises:
        BadInputError: not a run, a missing checkpoint, or a checkpoint that fails
            verification (named by file).
    """
    from tzkcli.model import TzK
    from tzkcli.training import checkpoint as ckpt

    run = Path(run)
    record = read_run_record(run)
    path = checkpoint_path(run, record, which)
    step = _step_of(path.name)
    ckpt.verify(ckpt.Checkpoint(path, step))
    model = TzK.load(path / "model")
    model.eval()
    return OpenRun(run, record, path.name, path, model)


def _step_of(name: str) -> int:
    """The training step in a checkpoint name (``step-00000020-extend-1`` -> 20)."""
    digits = name[len("step-"):].split("-", 1)[0]
    return int(digits) if digits.isdigit() else 0
