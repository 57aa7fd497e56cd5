"""StoreDataset: the same images and codes in RAM and lazily, in workers too."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tzkcli.store import StoreDataset, open_store
from tzkcli.store import reader as store_reader


@pytest.mark.parametrize("in_memory", [True, False])
def test_items_and_batches_match_the_store(small_store: Path, in_memory: bool):
    with open_store(small_store) as store:
        rows = store.indices(split="train")
        expected_images = store.images(rows)
        expected_codes = np.stack([store.codes(k)[rows] for k in store.kinds], axis=1)
        kinds = store.kinds
    dataset = StoreDataset(small_store, rows, in_memory=in_memory)
    assert dataset.in_memory is in_memory and dataset.kinds == kinds
    assert len(dataset) == len(rows)

    image, codes = dataset[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 32, 32)
    assert codes.dtype == torch.int64 and codes.shape == (len(kinds),)
    np.testing.assert_array_equal(image.numpy(), expected_images[3])
    np.testing.assert_array_equal(codes.numpy(), expected_codes[3])

    positions = np.array([10, 2, 2, len(rows) - 1, 0])
    images, batch_codes = dataset.batch(positions)
    assert images.shape == (5, 1, 32, 32) and batch_codes.shape == (5, len(kinds))
    np.testing.assert_array_equal(images.numpy(), expected_images[positions])
    np.testing.assert_array_equal(batch_codes.numpy(), expected_codes[positions])
    assert (batch_codes[:, 0] >= 0).all()  # the dataset is always known
    with pytest.raises(IndexError):
        dataset[len(rows)]


def test_lazy_dataset_in_forked_workers(small_store: Path):
    with open_store(small_store) as store:
        rows = store.indices(dataset="omniglot")
        expected = store.images(rows)
    dataset = StoreDataset(small_store, rows, in_memory=False)
    assert dataset._store is None  # nothing opened before the fork
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2,
                                         multiprocessing_context="fork")
    images = torch.cat([batch[0] for batch in loader]).numpy()
    np.testing.assert_array_equal(images, expected)
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[0][0].numpy(), expected[0])


def test_replaced_store_is_noticed_by_a_lazy_reader(small_store: Path, tmp_path: Path):
    dataset = StoreDataset(small_store, [0, 1, 2], in_memory=False)
    with h5py.File(small_store, "r+") as file:
        file.attrs["digest"] = "0" * 64
    from tzkcli.errors import BadInputError

    with pytest.raises(BadInputError, match="digest changed"):
        dataset[0]


@pytest.mark.parametrize("block_bytes", [1 << 30, 4096])
def test_read_rows_any_order_and_sparse(tmp_path: Path, monkeypatch, block_bytes: int):
    monkeypatch.setattr(store_reader, "READ_BLOCK_BYTES", block_bytes)
    data = np.random.default_rng(0).integers(0, 256, size=(3000, 1, 4, 4), dtype=np.uint8)
    with h5py.File(tmp_path / "rows.h5", "w") as file:
        file.create_dataset("x", data=data, chunks=(64, 1, 4, 4))
    with h5py.File(tmp_path / "rows.h5", "r") as file:
        rng = np.random.default_rng(1)
        for rows in (rng.integers(0, 3000, 500),        # many runs, dense span
                     np.arange(0, 3000, 97)[::-1],       # sparse, reversed
                     np.array([5, 6, 7, 100, 101]),      # few runs
                     np.array([], dtype=np.int64)):
            np.testing.assert_array_equal(store_reader.read_rows(file["x"], rows), data[rows])


def test_memory_mapped_rows_equal_hdf5_reads(small_store: Path, tmp_path: Path):
    rows = np.random.default_rng(3).integers(0, 580, 400)
    with open_store(small_store) as store:
        mapped = store.images(rows)
        assert isinstance(store._row_map, store_reader.RowMap)
        np.testing.assert_array_equal(mapped, store_reader.read_rows(store._images, rows))
        everything = store.images(slice(None))
        with pytest.raises(IndexError):
            store.images(np.arange(40) + 560)

    # a store whose images are compressed (a layout tzk does not write) is read through h5py
    with h5py.File(small_store, "r+") as file:
        del file["images"]
        file.create_dataset("images", data=everything, chunks=(50, 1, 32, 32),
                            compression="gzip")
    with open_store(small_store) as store:
        np.testing.assert_array_equal(store.images(rows), everything[rows])
        assert store._row_map is False
        with pytest.raises(IndexError):
            store.images(np.arange(40) + 560)
