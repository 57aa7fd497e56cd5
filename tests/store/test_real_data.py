"""The bundled sources ingested from the real data: exact counts, labels and pixels."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.store.fixtures import read_idx_independently
from tzkcli.store import open_store


def area_matrix(source: int, target: int) -> np.ndarray:
    """Weights ``[target, source]`` of exact area averaging (a target pixel's coverage)."""
    scale = source / target
    weights = np.zeros((target, source))
    for t in range(target):
        low, high = t * scale, (t + 1) * scale
        for s in range(int(np.floor(low)), int(np.ceil(high))):
            weights[t, s] = (min(high, s + 1) - max(low, s)) / scale
    return weights


def test_mnist_counts_and_labels_are_exact(full_store: Path, data_root: Path):
    raw = {
        "train": read_idx_independently(data_root / "mnist/train-labels-idx1-ubyte.gz"),
        "test": read_idx_independently(data_root / "mnist/t10k-labels-idx1-ubyte.gz"),
    }
    with open_store(full_store) as store:
        assert store.values("label") == [f"mnist/{d}" for d in range(10)]
        for split, labels in raw.items():
            rows = store.indices(split=split, dataset="mnist")
            assert len(rows) == len(labels) == {"train": 60_000, "test": 10_000}[split]
            codes = store.codes("label")[rows]
            np.testing.assert_array_equal(np.bincount(codes, minlength=10),
                                          np.bincount(labels, minlength=10))
            np.testing.assert_array_equal(codes, labels)  # same order as the files


def test_mnist_pixels_are_the_files_padded_by_two(full_store: Path, data_root: Path):
    raw = read_idx_independently(data_root / "mnist/t10k-images-idx3-ubyte.gz")
    with open_store(full_store) as store:
        rows = store.indices(split="test", dataset="mnist")
        images = store.images(rows)
    assert images.shape == (10_000, 1, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0, 2:30, 2:30], raw)
    assert not images[:, :, :2].any() and not images[:, :, 30:].any()
    assert not images[:, :, :, :2].any() and not images[:, :, :, 30:].any()


def test_omniglot_dedupe_alphabets_and_characters(full_store: Path):
    with open_store(full_store) as store:
        rows = store.indices(dataset="omniglot")
        assert len(rows) == 4_840
        assert len(np.unique(store.codes("alphabet")[rows])) == 8
        assert len(np.unique(store.codes("character")[rows])) == 242
        assert len(store.values("alphabet")) == 8 and len(store.values("character")) == 242
        assert "omniglot/Greek" in store.values("alphabet")
        assert "omniglot/Greek/character01" in store.values("character")
        # every image of a character belongs to that character's alphabet
        for row in rows[::97]:
            character = store.values("character")[store.codes("character")[row]]
            alphabet = store.values("alphabet")[store.codes("alphabet")[row]]
            assert character.startswith(alphabet + "/")
        assert store.indices(split="test", dataset="omniglot").size == round(0.2 * 4_840)


def test_omniglot_pixels_are_inverted_area_resized_and_padded(full_store: Path,
                                                              data_root: Path):
    from PIL import Image

    with zipfile.ZipFile(data_root / "omniglot/images_background_small1.zip") as archive:
        name = sorted(n for n in archive.namelist() if n.endswith(".png"))[0]
        source = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L"))
    assert source.shape == (105, 105)
    weights = area_matrix(105, 28)
    expected = weights @ (255.0 - source.astype(np.float64)) @ weights.T

    with open_store(full_store) as store:
        first = store.indices(dataset="omniglot")[0]  # rows keep the sorted member order
        image = store.images([first])[0, 0].astype(np.float64)
        assert store.values("character")[store.codes("character")[first]] == (
            "omniglot/" + "/".join(name.split("/")[1:3])
        )
    assert np.abs(image[2:30, 2:30] - expected).max() <= 0.5 + 1e-9  # rounding only
    assert not image[:2].any() and not image[30:].any()


def test_atlas_tiles_in_row_major_order(full_store: Path, data_root: Path):
    from PIL import Image

    sheet = np.asarray(Image.open(data_root / "omniglot/images_background_28x28_atlas.png"))
    with open_store(full_store) as store:
        rows = store.indices(dataset="omniglot-atlas")
        assert len(rows) == 19_280
        images = store.images(rows[[0, 1, 20, 19_279]])
    for image, (r, c) in zip(images, [(0, 0), (0, 1), (1, 0), (963, 19)]):
        tile = sheet[28 * r: 28 * r + 28, 28 * c: 28 * c + 28, 0]
        np.testing.assert_array_equal(image[0, 2:30, 2:30], tile)


def test_domain_and_kinds(full_store: Path):
    with open_store(full_store) as store:
        assert store.kinds == ["dataset", "label", "alphabet", "character"]
        assert store.values("dataset") == ["mnist", "omniglot", "omniglot-atlas"]
        np.testing.assert_array_equal(store.domain("dataset"), np.eye(3, dtype=bool))
        np.testing.assert_array_equal(store.domain("label").sum(axis=1), [10, 0, 0])
        np.testing.assert_array_equal(store.domain("alphabet").sum(axis=1), [0, 8, 0])
        np.testing.assert_array_equal(store.domain("character").sum(axis=1), [0, 242, 0])
        atlas = store.indices(dataset="omniglot-atlas")
        assert (store.codes("label")[atlas] == -1).all()
        assert store.codes("label").dtype == np.int32


def test_info_json_of_the_full_store(full_store: Path, tzk):
    result = tzk("info", full_store, "--json", "--verify")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["shape"] == [1, 32, 32] and data["format_version"] == 1
    assert data["datasets"] == {
        "mnist": {"train": 60_000, "test": 10_000},
        "omniglot": {"train": 3_872, "test": 968},
        "omniglot-atlas": {"train": 15_424, "test": 3_856},
    }
    assert data["kinds"] == {"dataset": 3, "label": 10, "alphabet": 8, "character": 242}
    assert data["verified"] is True and len(data["digest"]) == 64


def test_the_readme_command_works(tmp_path: Path, data_root: Path):
    from tests.conftest import run_tzk_process
    from tests.store.fixtures import REPO

    store = tmp_path / "tzk.h5"
    result = run_tzk_process(
        "ingest", "data_manifests/mnist.toml", "data_manifests/omniglot.toml",
        "data_manifests/omniglot-atlas.toml", "--store", store, "--data-root", data_root,
        cwd=REPO,
    )
    assert result.code == 0, result.stderr
    assert "wrote" in result.stdout and "94,120 images" in result.stdout
    with open_store(store) as opened:
        assert len(opened) == 94_120


@pytest.mark.slow
def test_ingest_is_deterministic(tmp_path: Path, full_store: Path, data_root: Path):
    from tests.store.fixtures import MANIFESTS
    from tzkcli.store import ingest, load_manifest

    names = ("mnist", "omniglot", "omniglot-atlas")
    again = tmp_path / "again.h5"
    ingest([load_manifest(MANIFESTS / f"{n}.toml") for n in names], again, data_root)
    with open_store(full_store) as first, open_store(again) as second:
        assert first.digest == second.digest
