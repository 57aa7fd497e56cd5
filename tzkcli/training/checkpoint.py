"""Checkpoints of a run: written all or nothing, verified before they are loaded.

A checkpoint is a directory ``RUN/checkpoints/step-NNNNNNNN/``::

    model/           the model in its own save format (``TzK.save`` / ``TzK.load``)
    state.pt         training state: optimiser, step, data position, learning-rate scale,
                     RNG states, best validation bpd so far (``torch.load(weights_only=True)``)
    integrity.json   format, version, step, and the sha256 and size of every other file

It is written under ``.tmp-step-NNNNNNNN.*`` beside its final name, every file fsync'ed,
``integrity.json`` last, and then renamed into place, so a process killed at any moment leaves
the previous checkpoints intact plus a temporary directory that the next writer removes. A
checkpoint whose files do not match ``integrity.json`` (a truncated copy, a flipped bit) is
reported by name and never loaded.

The last ``keep_last`` checkpoints are kept, plus the best by validation bpd under ``p_0``;
``RUN/run.json`` names the latest and the best for people and for ``tzk eval``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tzkcli import fsio
from tzkcli.errors import BadInputError

FORMAT = "tzk-checkpoint"
VERSION = 1
PREFIX = "step-"
INTEGRITY = "integrity.json"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint directory on disk."""

    path: Path
    step: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def capture_rng() -> dict[str, Any]:
    """The RNG states that training draws from (torch CPU, and every CUDA device in use)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(Path(directory) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsio.fsync_dir(Path(directory))


def write_checkpoint(
    directory: Path,
    step: int,
    save_model: Callable[[Path], None],
    state: dict[str, Any],
) -> Checkpoint:
    """Write checkpoint ``step`` into ``directory`` all or nothing; return it.

    ``save_model(path)`` writes the model in its own format into the new folder ``path``.
    ``state`` is saved with ``torch.save`` and must hold only tensors, numbers, strings,
    lists and dicts.

    Raises:
        RunFailedError | BadInputError: the write failed (disk full, not writable); the
            previous checkpoints are intact.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    fsio.remove_stale_temporaries(directory, PREFIX)
    temporary = Path(tempfile.mkdtemp(prefix=f"{fsio.TMP_PREFIX}{name}.", dir=directory))
    final = directory / name
    try:
        temporary.chmod(0o755)
        save_model(temporary / "model")
        buffer = io.BytesIO()  # torch.save to a file turns ENOSPC into a RuntimeError
        torch.save(state, buffer)
        (temporary / "state.pt").write_bytes(buffer.getvalue())
        files = {
            str(p.relative_to(temporary)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(temporary.rglob("*")) if p.is_file()
        }
        meta = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        (temporary / INTEGRITY).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_tree(temporary)
        if final.exists():
            _remove(final)
        os.rename(temporary, final)
        fsio.fsync_dir(directory)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise fsio.write_error(final, error) from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return Checkpoint(final, step)


def _remove(path: Path) -> None:
    """Delete a checkpoint by first renaming it to a temporary name: never half a checkpoint."""
    doomed = path.with_name(f"{fsio.TMP_PREFIX}{path.name}.deleted")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Checkpoints under ``directory`` by step (temporaries and strangers ignored)."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            digits = path.name[len(PREFIX):]
            if path.is_dir() and path.name.startswith(PREFIX) and digits.isdigit():
                found.append(Checkpoint(path, int(digits)))
    return sorted(found, key=lambda c: c.step)


def verify(checkpoint: Checkpoint) -> dict[str, Any]:
    """Check every file of ``checkpoint`` against ``integrity.json``; return that record.

    Raises:
        BadInputError: a missing, truncated or altered file, named with the checkpoint.
    """
    meta_path = checkpoint.path / INTEGRITY
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(
            f"{checkpoint.path}: no {INTEGRITY}; expected a complete tzk checkpoint"
        ) from None
    except (OSError, ValueError) as error:
        raise BadInputError(f"{meta_path}: unreadable or not JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadInputError(f"{meta_path}: format {meta.get('format')!r}; expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise BadInputError(f"{meta_path}: version {meta.get('version')!r}; expected {VERSION}")

    for relative, expected in meta.get("files", {}).items():
        path = checkpoint.path / relative
        if not path.is_file():
            raise BadInputError(f"{path}: missing from checkpoint; expected by {INTEGRITY}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise BadInputError(
                f"{path}: truncated or altered checkpoint file ({size} bytes); expected "
                f"{expected['bytes']} bytes as recorded in {INTEGRITY}"
            )
        if _sha256(path) != expected["sha256"]:
            raise BadInputError(
                f"{path}: corrupt checkpoint file (sha256 mismatch); expected the hash "
                f"recorded in {INTEGRITY}"
            )
    return meta


def load_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """Verify ``checkpoint`` and load its training state (no arbitrary unpickling)."""
    verify(checkpoint)
    try:
        return torch.load(checkpoint.path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:
        line = " ".join(str(error).split())[:200]
        raise BadInputError(f"{checkpoint.path / 'state.pt'}: unreadable ({line})") from None


def prune(directory: Path, keep_last: int, best: str | None) -> None:
    """Delete all but the last ``keep_last`` checkpoints and the one named ``best``."""
    checkpoints = list_checkpoints(directory)
    for checkpoint in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if checkpoint.name != best:
            with contextlib.suppress(OSError):
                _remove(checkpoint.path)


def write_run_record(run: Path, record: dict[str, Any]) -> None:
    """Update ``RUN/run.json`` (latest, best, status) atomically; keys that other commands
    wrote there (``tzk extend``) are kept."""
    path = run / "run.json"
    merged: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text(encoding="utf-8"))
        merged = old if isinstance(old, dict) else {}
    merged.update(record)
    fsio.atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
