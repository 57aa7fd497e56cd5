"""What the report shows of a store: images per dataset, split and kind, and a few images.

Only the store's public reader (:func:`tzkcli.store.open_store`) is used, and only the example
images are read from disk; counts come from the code columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXAMPLES = 16
EXAMPLE_SEED = 0


@dataclass
class StoreSummary:
    """The data a run used, as tables and examples.

    Attributes:
        path: the store file.
        digest: its content digest.
        shape: ``(C, H, W)``.
        datasets: dataset names in store order.
        splits: split names in store order.
        counts: int ``[n_datasets, n_splits]`` images.
        kinds: every kind but ``dataset``.
        known: per kind, int ``[n_datasets, n_splits]`` images whose value is known.
        n_values: per kind, the number of values a dataset's images may take
            (``[n_datasets]``; 0 where the kind does not apply to the dataset).
        examples: per dataset, uint8 ``[n, C, H, W]``: a seeded choice of its images.
    """

    path: Path
    digest: str
    shape: tuple[int, int, int]
    datasets: list[str]
    splits: list[str]
    counts: np.ndarray
    kinds: list[str]
    known: dict[str, np.ndarray]
    n_values: dict[str, np.ndarray]
    examples: dict[str, np.ndarray]


def summarise_store(path: str | Path, examples: int = EXAMPLES) -> StoreSummary:
    """Count a store's images per dataset, split and kind and pick ``examples`` per dataset.

    Raises:
        BadInputError: the store is missing or not a valid tzk store.
    """
    from tzkcli.store import open_store

    with open_store(path) as store:
        datasets = list(store.values("dataset"))
        splits = list(store.split_names)
        dataset_codes = np.asarray(store.codes("dataset"))
        split_codes = np.asarray(store.split_codes)
        cell = dataset_codes.astype(np.int64) * len(splits) + split_codes
        counts = _cells(cell, len(datasets), len(splits))

        kinds = [kind for kind in store.kinds if kind != "dataset"]
        known = {kind: _cells(cell[np.asarray(store.codes(kind)) >= 0], len(datasets),
                              len(splits)) for kind in kinds}
        n_values = {kind: np.asarray(store.domain(kind)).sum(axis=1) for kind in kinds}
        chosen = {name: _examples(store, name, examples) for name in datasets}
        return StoreSummary(Path(path), str(store.digest), tuple(store.shape), datasets, splits,
                            counts, kinds, known, n_values, chosen)


def _cells(cell: np.ndarray, n_datasets: int, n_splits: int) -> np.ndarray:
    flat = np.bincount(cell[cell >= 0], minlength=n_datasets * n_splits)
    return flat.reshape(n_datasets, n_splits)


def _examples(store, dataset: str, n: int) -> np.ndarray:
    rows = np.asarray(store.indices(dataset=dataset))
    rng = np.random.default_rng(EXAMPLE_SEED)
    chosen = np.sort(rng.choice(rows, min(n, len(rows)), replace=False))
    return np.asarray(store.images(chosen))
