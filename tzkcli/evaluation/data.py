"""A store's images and knowledge as a trained model sees them.

The model's registry and a store agree by *name*: the store's ``dataset`` value ``mnist`` is the
model's condition ``dataset=mnist`` whatever its code in either. :func:`model_codes` maps the
store's codes into the model's kind order and value order (``-1`` where the model lacks the
kind or the value), so a model can be evaluated or extended on any store of the right image
shape, including stores ingested after it was trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tzkcli.errors import BadInputError
from tzkcli.knowledge.registry import DATASET


@dataclass
class StoreView:
    """What the commands read of a store, once.

    Attributes:
        path: the store file.
        digest: its content digest.
        shape: ``(C, H, W)``.
        kinds: the store's kinds, ``dataset`` first.
        values: each kind's vocabulary in store order.
        codes: ``{kind: int32 [N]}`` store codes, -1 unknown.
        domains: ``{kind: bool [n_datasets, n_values]}``.
        splits: split names; split_codes: int32 ``[N]``.
    """

    path: Path
    digest: str
    shape: tuple[int, int, int]
    kinds: list[str]
    values: dict[str, list[str]]
    codes: dict[str, np.ndarray]
    domains: dict[str, np.ndarray]
    splits: list[str]
    split_codes: np.ndarray

    def rows(self, split: str | None) -> np.ndarray:
        """Sorted int64 rows of ``split`` (every row for None).

        Raises:
            BadInputError: the store has no such split.
        """
        if split is None:
            return np.arange(len(self.split_codes), dtype=np.int64)
        if split not in self.splits:
            raise BadInputError(
                f"--split {split}: the store {self.path} has no split {split!r}; expected one "
                f"of {', '.join(self.splits)}"
            )
        return np.flatnonzero(self.split_codes == self.splits.index(split)).astype(np.int64)

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, Any]]:
        """``(rows of the batch, uint8 tensor [B, C, H, W])`` in order, one store read each."""
        import torch

        from tzkcli.store import open_store

        with open_store(self.path) as store:
            for start in range(0, len(rows), batch_size):
                chosen = rows[start:start + batch_size]
                yield chosen, torch.from_numpy(np.ascontiguousarray(store.images(chosen)))


def read_store(path: str | Path) -> StoreView:
    """Open ``path`` read-only and read its knowledge columns (not its images)."""
    from tzkcli.store import open_store

    path = Path(path)
    with open_store(path) as store:
        kinds = list(store.kinds)
        return StoreView(
            path=path, digest=str(store.digest),
            shape=tuple(int(n) for n in store.shape),  # type: ignore[arg-type]
            kinds=kinds,
            values={kind: list(store.values(kind)) for kind in kinds},
            codes={kind: np.array(store.codes(kind), dtype=np.int32) for kind in kinds},
            domains={kind: np.array(store.domain(kind), dtype=bool) for kind in kinds},
            splits=list(store.split_names),
            split_codes=np.array(store.split_codes, dtype=np.int32),
        )


def check_shape(view: StoreView, model: Any, flag: str = "--store") -> None:
    """The store's images must have the model's shape.

    Raises:
        BadInputError: another shape, naming both.
    """
    expected = tuple(model.config.flow.shape) if model.config.flow is not None else None
    if expected is not None and tuple(view.shape) != expected:
        found = "x".join(map(str, view.shape))
        raise BadInputError(
            f"{flag} {view.path}: images of shape {found}, expected "
            f"{'x'.join(map(str, expected))} (the model's image shape)"
        )


def model_codes(view: StoreView, registry: Any) -> np.ndarray:
    """Store codes in the model's terms, int64 ``[N, n_model_kinds]``, registry kind order.

    A value the model does not know, or a kind the store lacks, becomes ``-1``; the ``dataset``
    column is ``-1`` for images of datasets the model does not know.
    """
    n = len(view.split_codes)
    out = np.full((n, len(registry.kinds)), -1, dtype=np.int64)
    for column, kind in enumerate(registry.kinds):
        if kind not in view.codes:
            continue
        known = {value: i for i, value in enumerate(registry.values(kind))}
        table = np.array([known.get(value, -1) for value in view.values[kind]] + [-1],
                         dtype=np.int64)
        # code -1 (unknown) indexes the table's last entry, -1
        out[:, column] = table[view.codes[kind].astype(np.int64)]
    return out


def known_rows(view: StoreView, registry: Any, rows: np.ndarray,
               flag: str) -> tuple[np.ndarray, dict[str, int]]:
    """The rows of images whose dataset the model knows, and the count left out per dataset.

    Raises:
        BadInputError: no image of ``rows`` comes from a dataset the model knows.
    """
    known = set(registry.values(DATASET))
    names = view.values[DATASET]
    codes = view.codes[DATASET][rows]
    keep = np.isin(codes, [i for i, name in enumerate(names) if name in known])
    left_out = {names[c]: int((codes == c).sum()) for c in np.unique(codes[~keep]).tolist()}
    if not keep.any():
        found = ", ".join(left_out) or "none"
        raise BadInputError(
            f"{flag} {view.path}: none of its datasets ({found}) is a condition of the model "
            f"({', '.join(sorted(known))}); expected a store of the model's datasets, or tzk "
            "extend --condition dataset first"
        )
    return rows[keep], left_out
