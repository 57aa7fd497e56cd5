"""The data order: deterministic, resumable, balanced; label hiding; validation subsets."""

from __future__ import annotations

import numpy as np
import pytest

from tzkcli.errors import BadInputError
from tzkcli.training.data import (
    DataOrder,
    hide_labels,
    labelled_mask,
    rank_share,
    validation_positions,
)

GROUPS = np.array([0] * 90 + [1] * 10)


def test_order_is_a_function_of_seed_and_batch_number() -> None:
    a = DataOrder(GROUPS, 8, seed=3, balance="none")
    b = DataOrder(GROUPS, 8, seed=3, balance="none")
    first = [a.next() for _ in range(30)]

    b.drawn = 17
    assert np.array_equal(b.next(), first[17])
    assert not np.array_equal(DataOrder(GROUPS, 8, 4, "none").batch(0), first[0])


def test_an_epoch_is_a_permutation_without_the_incomplete_batch() -> None:
    order = DataOrder(GROUPS, 8, seed=0, balance="none")
    epoch = np.concatenate([order.batch(i) for i in range(order.batches_per_epoch)])

    assert order.batches_per_epoch == 12
    assert len(np.unique(epoch)) == 96
    assert not np.array_equal(order.positions(0), order.positions(1))


def test_balance_gives_each_dataset_an_equal_share() -> None:
    order = DataOrder(GROUPS, 10, seed=0, balance="dataset")
    drawn = np.concatenate([order.batch(i) for i in range(order.batches_per_epoch)])

    counts = np.bincount(GROUPS[drawn])
    assert counts.tolist() == [50, 50]
    assert set(drawn[GROUPS[drawn] == 1]) == set(range(90, 100))


def test_batch_larger_than_training_set_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="--batch-size 101"):
        DataOrder(GROUPS, 101, 0, "none")


def test_rank_shares_partition_the_global_batch() -> None:
    batch = np.arange(8)
    shares = [rank_share(batch, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(shares), batch)


def test_label_fraction_keeps_that_share_of_each_dataset() -> None:
    keep = labelled_mask(GROUPS, 0.3, seed=1)

    assert keep[:90].sum() == 27 and keep[90:].sum() == 3
    assert np.array_equal(keep, labelled_mask(GROUPS, 0.3, seed=1))
    assert not np.array_equal(keep, labelled_mask(GROUPS, 0.3, seed=2))

    codes = np.array([[0, 4, 2], [1, 7, 0]])
    hidden = hide_labels(codes, np.array([True, False]))
    assert hidden.tolist() == [[0, 4, 2], [1, -1, -1]]


def test_validation_takes_up_to_an_equal_count_per_dataset() -> None:
    chosen = dict(validation_positions(GROUPS, 40, seed=0))

    assert len(chosen[0]) == 20 and len(chosen[1]) == 10
    assert (GROUPS[chosen[0]] == 0).all() and np.all(np.diff(chosen[0]) > 0)
