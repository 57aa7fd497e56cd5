"""The HDF5 store as an untrusted file: every key is checked before use, errors name it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tzkcli.errors import BadInputError
from tzkcli.store import open_store


def replace_dataset(store: Path, key: str, data: np.ndarray) -> None:
    with h5py.File(store, "r+") as file:
        del file[key]
        file.create_dataset(key, data=data)


def _float_images(store: Path) -> None:
    with open_store(store) as opened:
        n = len(opened)
    replace_dataset(store, "images", np.zeros((n, 1, 32, 32), dtype=np.float32))


def _code_out_of_range(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        file["kinds/label/codes"][0] = 99


def _unknown_dataset_code(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        file["kinds/dataset/codes"][3] = -1


def _wrong_codes_dtype(store: Path) -> None:
    with h5py.File(store, "r") as file:
        codes = file["kinds/label/codes"][...]
    replace_dataset(store, "kinds/label/codes", codes.astype(np.int64))


def _missing_splits(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        del file["splits/codes"]


def _huge_declared_shape(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        file.attrs["shape"] = np.array([1, 100_000, 32])


def _domain_shape(store: Path) -> None:
    replace_dataset(store, "kinds/label/domain", np.zeros((2, 10), dtype=np.uint8))


def _source_rows(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        file["sources/rows"][0, 1] = 10**9


def _kinds_order(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        file.attrs["kinds"] = np.array(["label", "dataset", "alphabet", "character"],
                                       dtype=h5py.string_dtype())


def _scalar_images(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        del file["images"]
        file.create_dataset("images", data=np.uint8(0))


def _bad_digest(store: Path) -> None:
    with h5py.File(store, "r+") as file:
        file.attrs["digest"] = "not a digest"


DAMAGE = {
    "float images": (_float_images, "HDF5 key /images: found dtype float32; expected uint8"),
    "code out of range": (_code_out_of_range, "HDF5 key /kinds/label/codes: found code 99"),
    "unknown dataset code": (_unknown_dataset_code, "HDF5 key /kinds/dataset/codes: found "
                                                    "code -1; expected codes in [0, 3)"),
    "codes dtype": (_wrong_codes_dtype, "HDF5 key /kinds/label/codes: found dtype int64"),
    "missing split codes": (_missing_splits, "HDF5 key /splits/codes: found nothing"),
    "declared shape over limits": (_huge_declared_shape, "attribute 'shape'"),
    "domain shape": (_domain_shape, "HDF5 key /kinds/label/domain: found shape [2, 10]; "
                                    "expected shape [3, 10]"),
    "source rows": (_source_rows, "HDF5 key /sources/rows"),
    "kinds order": (_kinds_order, "'dataset' first"),
    "digest": (_bad_digest, "attribute 'digest'"),
    "scalar images": (_scalar_images, "HDF5 key /images: found shape []; expected shape [*, "),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_store_names_the_key(case: str, small_store: Path, tzk):
    damage, needle = DAMAGE[case]
    damage(small_store)
    with pytest.raises(BadInputError) as raised:
        open_store(small_store)
    assert needle in str(raised.value)
    assert str(small_store) in str(raised.value)
    result = tzk("info", small_store)
    assert result.code == 3 and needle in result.stderr


def test_verify_finds_a_changed_pixel(small_store: Path, tzk):
    assert tzk("info", small_store, "--verify").code == 0
    with h5py.File(small_store, "r+") as file:
        file["images"][5, 0, 16, 16] ^= 1
    assert tzk("info", small_store).code == 0  # the digest is only recomputed on request
    result = tzk("info", small_store, "--verify")
    assert result.code == 3
    assert "digest mismatch" in result.stderr and str(small_store) in result.stderr


def test_missing_store(tmp_path: Path, tzk):
    result = tzk("info", tmp_path / "none.h5")
    assert result.code == 3 and "store not found" in result.stderr


def test_info_tables(small_store: Path, tzk):
    result = tzk("info", small_store)
    assert result.code == 0
    for needle in ("1x32x32", "format version 1", "mnist", "omniglot-atlas", "label",
                   "mnist/", "Sources", "train", "test"):
        assert needle in result.stdout


def test_schema_on_disk(small_store: Path):
    """The layout docs/store.md documents."""
    with h5py.File(small_store, "r") as file:
        assert file.attrs["format"] == "tzk-store" and file.attrs["format_version"] == 1
        assert list(file.attrs["shape"]) == [1, 32, 32]
        images = file["images"]
        assert images.dtype == np.uint8 and images.chunks is not None
        assert 10 << 10 <= np.prod(images.chunks) <= 1 << 20  # 10 KiB to 1 MiB chunks
        for kind in file.attrs["kinds"]:
            group = file[f"kinds/{kind}"]
            assert group["codes"].dtype == np.int32
            assert group["domain"].dtype == np.uint8
            assert h5py.check_string_dtype(group["values"].dtype) is not None
        assert set(file["sources"]) == {"names", "origins", "manifests", "fingerprints",
                                        "files", "rows"}


def test_indices_and_images_api(small_store: Path):
    with open_store(small_store) as store:
        all_rows = store.indices()
        assert all_rows.dtype == np.int64 and (np.diff(all_rows) > 0).all()
        train = store.indices(split="train")
        test = store.indices(split="test")
        assert len(train) + len(test) == len(store)
        mnist_test = store.indices(split="test", dataset="mnist")
        assert set(mnist_test) <= set(test) and len(mnist_test) == 100
        rows = np.array([7, 3, 7, 500, 0])
        images = store.images(rows)
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(images[i], store.images(slice(row, row + 1))[0])
        with pytest.raises(BadInputError, match="no split 'valid'"):
            store.indices(split="valid")
        with pytest.raises(BadInputError, match="no kind 'colour'"):
            store.values("colour")
        with pytest.raises(IndexError):
            store.images([len(store)])
