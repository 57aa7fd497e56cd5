"""``RUN/metrics.jsonl``: one JSON object per line, the first the resolved configuration.

Records carry a ``type``:

- ``config``: ``{"type": "config", "config": {...}, "store": {...}, "world_size": W}``, first.
- ``train``: ``step``, ``epoch``, ``loss``, ``bpd`` and its parts (``bpd_prior``,
  ``bpd_ladj``, ``bpd_dequantisation``), ``ce``, ``lr``, ``grad_norm``, ``images_per_s``.
- ``val``: ``step``, ``bpd_base`` (all validation images under ``p_0``), and per dataset
  ``datasets[name] = {"bpd_base": ..., "bpd_dataset": ...}`` (under ``p_0`` and under its own
  ``dataset=`` prior).
- ``actnorm_init``, ``skip`` (a non-finite step), ``recover`` (last good state restored with a
  lower learning rate), ``checkpoint``, ``resume``, ``end``.

Non-finite numbers are written as ``null``. TensorBoard event files are written beside it, under
``RUN/tensorboard/``, when ``torch.utils.tensorboard`` can be imported; tzk does not depend on it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tzkcli import fsio


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (flushed per record) and, optionally, TensorBoard."""

    def __init__(self, run: Path, enabled: bool = True) -> None:
        self.path = run / "metrics.jsonl"
        self.enabled = enabled
        try:
            self._handle = open(self.path, "a", encoding="utf-8") if enabled else None
        except OSError as error:
            raise fsio.write_error(self.path, error) from error
        self._board = _tensorboard(run) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        try:
            self._handle.write(json.dumps(_clean(record), allow_nan=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise fsio.write_error(self.path, error) from error
        if self._board is not None:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if step is None or record.get("type") not in ("train", "val"):
            return
        prefix = record["type"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self._board.add_scalar(f"{prefix}/{key}", value, step)
        for name, parts in record.get("datasets", {}).items():
            for key, value in parts.items():
                if value is not None and math.isfinite(value):
                    self._board.add_scalar(f"{prefix}/{name}/{key}", value, step)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._board is not None:
            self._board.close()
            self._board = None


def _tensorboard(run: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run / "tensorboard"))


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """All records of ``RUN/metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    records = []
    with open(run / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
