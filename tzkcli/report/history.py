"""The training history of a run, as the report plots it, from ``RUN/metrics.jsonl``.

Training time is the time spent in optimiser steps, rebuilt from the throughput records:
the loop reports ``images_per_s`` over the steps since its previous ``train`` record, so the
window between two records at steps ``s0 < s1`` took ``(s1 - s0) * batch_size / images_per_s``
seconds. Validation, checkpoints and the pauses of an interrupted run are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tzkcli.errors import BadInputError


@dataclass
class Series:
    """One quantity over training: ``bpd`` at ``steps`` after ``seconds`` of training."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    bpd: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, bpd: Any) -> None:
        if isinstance(bpd, (int, float)) and math.isfinite(bpd):
            self.steps.append(step)
            self.seconds.append(seconds)
            self.bpd.append(float(bpd))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array(self.steps), np.array(self.seconds), np.array(self.bpd)


@dataclass
class History:
    """What a run's metrics say about its training.

    Attributes:
        config: the resolved configuration (the first ``config`` record's ``config``).
        store: the store's identity from that record.
        device: the device it trained on, when recorded.
        train: bpd under ``p_0`` of the training batches.
        val: bpd under ``p_0`` of all validation images.
        val_base: per dataset, bpd of its validation images under ``p_0``.
        val_own: per dataset, bpd of its validation images under its own ``dataset=`` prior.
        last_val: the last validation record (``None`` without validation).
        end: the last ``end`` record (why and where training stopped), if any.
        train_seconds: training time of the last step.
    """

    config: dict[str, Any]
    store: dict[str, Any]
    device: str | None
    train: Series
    val: Series
    val_base: dict[str, Series]
    val_own: dict[str, Series]
    last_val: dict[str, Any] | None
    end: dict[str, Any] | None
    train_seconds: float


def read_history(run: Path) -> History:
    """Read ``RUN/metrics.jsonl`` into the series the report plots.

    Raises:
        BadInputError: no ``metrics.jsonl``, or no ``config`` record in it (not a tzk run).
    """
    from tzkcli.training.metrics import read_metrics

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise BadInputError(f"{path}: not found; expected the metrics of a run made by tzk train")
    records = read_metrics(Path(run))
    configs = [r for r in records if r.get("type") == "config"]
    if not configs:
        raise BadInputError(f"{path}: no config record; expected the metrics of a tzk train run")
    first = configs[0]
    batch = int(first["config"].get("batch_size") or 1)

    history = History(config=first["config"], store=first.get("store", {}),
                      device=first.get("device"), train=Series(), val=Series(), val_base={},
                      val_own={}, last_val=None, end=None, train_seconds=0.0)
    _replay(records, batch, history)
    return history


def _replay(records: list[dict[str, Any]], batch: int, history: History) -> None:
    """Walk the records in order, keeping the training clock."""
    seconds, last_step, per_step = 0.0, 0, 0.0
    for record in records:
        kind, step = record.get("type"), record.get("step")
        if not isinstance(step, int):
            continue
        if kind in ("start", "resume", "recover"):
            last_step = step
        elif kind == "train":
            rate = record.get("images_per_s")
            if isinstance(rate, (int, float)) and rate > 0 and step > last_step:
                per_step = batch / rate
                seconds += (step - last_step) * per_step
            last_step = step
            history.train.add(step, seconds, record.get("bpd_base", record.get("bpd")))
        elif kind == "val":
            at = seconds + max(0, step - last_step) * per_step
            _add_validation(history, record, step, at)
        elif kind == "end":
            history.end = record
    history.train_seconds = seconds


def _add_validation(history: History, record: dict[str, Any], step: int, seconds: float) -> None:
    history.val.add(step, seconds, record.get("bpd_base"))
    for name, parts in (record.get("datasets") or {}).items():
        history.val_base.setdefault(name, Series()).add(step, seconds, parts.get("bpd_base"))
        history.val_own.setdefault(name, Series()).add(step, seconds, parts.get("bpd_dataset"))
    history.last_val = record
