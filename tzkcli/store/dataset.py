"""A torch ``Dataset`` over rows of a store, for training and evaluation.

:class:`StoreDataset` holds the codes of its rows in memory (int64 ``[n, n_kinds]``, in
``store.kinds`` order, -1 unknown) and the images either in RAM (when they fit under a size
limit) or in the HDF5 file, which it then opens lazily in whichever process reads first. A
data-loader worker forked from the parent therefore opens its own handle: an HDF5 handle is
never shared across a fork.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tzkcli.errors import BadInputError
from tzkcli.store.reader import Store, open_store

IN_MEMORY_LIMIT_BYTES = 4 << 30


class StoreDataset(Dataset):
    """Rows ``indices`` of the store at ``path`` as ``(image, codes)`` pairs.

    ``dataset[i]`` is ``(uint8 tensor [C, H, W], int64 tensor [n_kinds])`` for row
    ``indices[i]``; :meth:`batch` reads many positions at once. ``in_memory=None`` loads the
    images into RAM when they take at most ``IN_MEMORY_LIMIT_BYTES`` (4 GiB), else reads them
    from the file on demand. ``kinds`` picks the code columns (default every kind of the store,
    in its order); a kind the store lacks is a ``BadInputError``. The store's digest is checked
    whenever the file is reopened, so a store replaced under a running job is an error rather
    than silently different data.
    """

    def __init__(self, path: str | os.PathLike[str], indices: Sequence[int] | np.ndarray,
                 in_memory: bool | None = None, kinds: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        with open_store(self.path) as store:
            if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(store)):
                raise IndexError(
                    f"{self.path}: indices outside [0, {len(store)}) given to StoreDataset"
                )
            self.kinds = list(store.kinds) if kinds is None else list(kinds)
            for kind in self.kinds:
                if kind not in store.kinds:
                    raise BadInputError(f"{self.path}: no kind {kind!r} in the store; expected "
                                        f"some of {', '.join(store.kinds)}")
            self.shape = store.shape
            self.digest = store.digest
            self.codes = np.stack(
                [store.codes(kind)[self.indices].astype(np.int64) for kind in self.kinds], axis=1
            ) if self.indices.size else np.empty((0, len(self.kinds)), dtype=np.int64)
            nbytes = self.indices.size * int(np.prod(store.shape))
            self.in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES if in_memory is None else in_memory
            self._images = store.images(self.indices) if self.in_memory else None
        self._store: Store | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.indices.size)

    def _file_images(self, rows: np.ndarray) -> np.ndarray:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.path)
            self._pid = os.getpid()
            if self._store.digest != self.digest:
                raise BadInputError(
                    f"{self.path}: store digest changed from {self.digest[:12]} to "
                    f"{self._store.digest[:12]} while in use; expected the same store"
                )
        return self._store.images(rows)

    def _images_at(self, positions: np.ndarray) -> np.ndarray:
        if self._images is not None:
            return self._images[positions]
        return self._file_images(self.indices[positions])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} images")
        position = int(position) % len(self)
        image = self._images_at(np.array([position]))[0]
        codes = torch.from_numpy(self.codes[position])
        return torch.from_numpy(np.ascontiguousarray(image)), codes

    def batch(self, positions: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 ``[B, C, H, W]`` and codes int64 ``[B, n_kinds]`` in one read."""

        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"positions out of range for {len(self)} images")
        positions = positions % max(1, len(self))
        images = np.ascontiguousarray(self._images_at(positions))
        return torch.from_numpy(images), torch.from_numpy(self.codes[positions])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None and self._pid == os.getpid():
            store.close()

