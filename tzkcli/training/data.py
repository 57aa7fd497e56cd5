"""The training data order: deterministic, resumable, optionally balanced across datasets.

An *epoch* is a sequence of positions into the training rows (positions index the
``StoreDataset`` built over the training split), cut into global batches of ``batch_size``; an
incomplete last batch is dropped so that every batch, and every rank's share of it, has the
same size. Epoch ``e`` is a pure function of ``(seed, e)``, so the position in the data order
is the single integer :attr:`DataOrder.drawn`, the number of global batches drawn so far, and
a resumed run continues with exactly the batch that an uninterrupted run would have drawn.

``balance="dataset"`` gives each dataset an equal share of every epoch (epoch length stays the
number of training rows): a dataset smaller than its share is cycled through successive
permutations of its rows, a larger one is subsampled afresh each epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tzkcli.errors import BadInputError


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one epoch: independent of every other epoch and of the past."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, epoch])))


class DataOrder:
    """Global batches of training positions, epoch after epoch.

    Args:
        groups: dataset code of each training position, int64 ``[N]``.
        batch_size: global batch size ``B``.
        seed: the run's seed.
        balance: ``"none"`` (a permutation of all rows per epoch) or ``"dataset"``.
    """

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int, balance: str) -> None:
        self.groups = np.asarray(groups, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.balance = balance
        self.members = [np.flatnonzero(self.groups == g) for g in np.unique(self.groups)]
        self.batches_per_epoch = len(self.groups) // batch_size
        if self.batches_per_epoch == 0:
            raise BadInputError(
                f"--batch-size {batch_size}: larger than the {len(self.groups)} training images; "
                "expected at most the size of the training split"
            )
        self.drawn = 0
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> float:
        """Fractional epochs drawn so far."""
        return self.drawn / self.batches_per_epoch

    def positions(self, epoch: int) -> np.ndarray:
        """All positions of epoch ``epoch`` in order, int64 ``[batches_per_epoch · B]``."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = epoch_generator(self.seed, epoch)
        if self.balance == "dataset":
            order = self._balanced(rng)
        else:
            order = rng.permutation(len(self.groups))
        order = order[: self.batches_per_epoch * self.batch_size]
        self._cached = (epoch, order)
        return order

    def _balanced(self, rng: np.random.Generator) -> np.ndarray:
        n, k = len(self.groups), len(self.members)
        shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
        draws = []
        for members, share in zip(self.members, shares):
            cycles = -(-share // len(members))
            stream = np.concatenate([rng.permutation(members) for _ in range(cycles)])
            draws.append(stream[:share])
        return rng.permutation(np.concatenate(draws))

    def batch(self, number: int) -> np.ndarray:
        """Positions of global batch ``number`` (counting from the run's start), ``[B]``."""
        epoch, index = divmod(number, self.batches_per_epoch)
        start = index * self.batch_size
        return self.positions(epoch)[start : start + self.batch_size]

    def next(self) -> np.ndarray:
        """The next global batch; advances :attr:`drawn`."""
        positions = self.batch(self.drawn)
        self.drawn += 1
        return positions


def rank_share(positions: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous slice of a global batch (``B`` must divide by ``world``)."""
    size = len(positions) // world
    return positions[rank * size : (rank + 1) * size]


def labelled_mask(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which training positions keep their labels under ``--label-fraction``, bool ``[N]``.

    Within each dataset, ``round(fraction · n_d)`` positions keep every known label; the rest
    keep only their dataset (all other kinds become unknown, ``-1``). The choice depends only on
    ``seed`` and the training rows, so it is the same on every rank and after a resume.
    """
    groups = np.asarray(groups, dtype=np.int64)
    keep = np.zeros(len(groups), dtype=bool)
    rng = epoch_generator(seed, 0, stream=1)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        count = int(round(fraction * len(members)))
        keep[rng.permutation(members)[:count]] = True
    return keep


def hide_labels(codes: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Codes ``[B, n_kinds]`` with every kind but ``dataset`` (column 0) set to ``-1`` where
    ``labelled`` ``[B]`` is false."""
    hidden = np.array(codes, copy=True)
    hidden[~np.asarray(labelled, dtype=bool), 1:] = -1
    return hidden


def validation_positions(
    groups: np.ndarray, total: int, seed: int
) -> list[tuple[int, np.ndarray]]:
    """Up to ``ceil(total / n_datasets)`` positions of each dataset, ``[(dataset code, pos)]``.

    A fixed, seeded subset (sorted) of the validation split, so that each dataset's bpd is
    measured on enough of its own images even when datasets differ much in size.
    """
    groups = np.asarray(groups, dtype=np.int64)
    datasets = np.unique(groups)
    if total == 0 or len(datasets) == 0:
        return []
    per = -(-total // len(datasets))
    rng = epoch_generator(seed, 0, stream=2)
    chosen = []
    for g in datasets:
        members = np.flatnonzero(groups == g)
        chosen.append((int(g), np.sort(rng.permutation(members)[:per])))
    return chosen


class RankBatches:
    """Batch ``n`` of the data order as this rank reads it: ``(positions, x, codes)``.

    ``x`` is uint8 ``[B / world, C, H, W]``; ``codes`` int64 ``[B / world, n_kinds]`` with the
    labels hidden outside ``labelled``. A map-style dataset over batch numbers, so that a
    ``DataLoader`` with workers prefetches the next batches in background processes while the
    order itself stays a pure function of the batch number.
    """

    def __init__(self, dataset: Any, order: DataOrder, labelled: np.ndarray, rank: int,
                 world: int) -> None:
        self.dataset = dataset
        self.order = order
        self.labelled = labelled
        self.rank = rank
        self.world = world

    def __getitem__(self, number: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        positions = rank_share(self.order.batch(int(number)), self.rank, self.world)
        x, codes = self.dataset.batch(positions)
        codes = torch.from_numpy(hide_labels(codes.numpy(), self.labelled[positions]))
        return positions, x, codes


def batch_stream(
    batches: RankBatches, start: int, workers: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Batches ``start, start + 1, ...`` forever: read inline, or prefetched by ``workers``."""
    if workers == 0:
        return (batches[n] for n in itertools.count(start))
    from torch.utils.data import DataLoader

    loader = DataLoader(batches, batch_size=None, sampler=itertools.count(start),
                        num_workers=workers, prefetch_factor=4, collate_fn=_identity)
    return iter(loader)


def _identity(item: Any) -> Any:
    return item
