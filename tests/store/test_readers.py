"""The generic readers on files the tests make themselves, end to end and fuzzed."""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.store.fixtures import idx_bytes, png_bytes, sha256, write_npz, write_zip
from tzkcli.errors import BadInputError
from tzkcli.store import ingest, open_store, parse_manifest
from tzkcli.store import readers

HEADER = """tzk_manifest = 1
[dataset]
name = "{name}"
license = "CC0"
citation = "a test"
"""


def tree_sha256(root: Path) -> str:
    """The documented hash of a folder: sha256 of "<file sha256>  <relative path>" lines."""
    files = sorted(
        (p.relative_to(root).as_posix(), p) for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    lines = "".join(f"{sha256(path)}  {relative}\n" for relative, path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def manifest(name: str, body: str, files: dict[str, Path]) -> str:
    entries = "".join(
        f'[files.{key}]\npath = "{path.name}"\n'
        f'sha256 = "{tree_sha256(path) if path.is_dir() else sha256(path)}"\n'
        for key, path in files.items()
    )
    return HEADER.format(name=name) + entries + body


def ingest_text(text: str, root: Path, shape=(1, 32, 32), name: str = "store.h5"):
    store = root / name
    ingest([parse_manifest(text, origin="test.toml")], store, root, shape=shape)
    return open_store(store)


# each format end to end -----------------------------------------------------------------------

def test_npz_source_with_string_labels_and_layouts(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 20, 20, 3), dtype=np.uint8)  # NHWC colour
    write_npz(tmp_path / "data.npz", x=x, y=np.array(list("abcabcabcabc")),
              z=np.arange(12) % 2 == 0)
    body = """[kinds.letter]
[kinds.even]
[kinds.source]
namespace = "shared"
[transform]
polarity = "bright-on-dark"
color = "rgb"
pad = "center"
[[parts]]
reader = "npz"
images = "data"
array = "x"
layout = "NHWC"
split = "train"
kinds.letter = { array = "y" }
kinds.even = { array = "z" }
kinds.source = { constant = "synthetic" }
"""
    with ingest_text(manifest("colours", body, {"data": tmp_path / "data.npz"}), tmp_path,
                     shape=(3, 24, 24)) as store:
        assert store.shape == (3, 24, 24)
        np.testing.assert_array_equal(store.images([0])[0][:, 2:22, 2:22],
                                      x[0].transpose(2, 0, 1))
        assert store.values("letter") == ["colours/a", "colours/b", "colours/c"]
        assert store.values("even") == ["colours/0", "colours/1"]
        assert store.values("source") == ["shared/synthetic"]
        assert [store.values("letter")[c] for c in store.codes("letter")[:3]] == [
            "colours/a", "colours/b", "colours/c"]


def test_folder_tree_directory_with_depths_and_tree_hash(tmp_path: Path):
    tree = tmp_path / "tree"
    pixels = {}
    for alphabet in ("alpha", "beta"):
        for character in ("c1", "c2"):
            folder = tree / alphabet / character
            folder.mkdir(parents=True)
            for i in range(2):
                image = np.full((30, 30), 255, dtype=np.uint8)
                image[i: i + 5, 3:9] = 0
                (folder / f"{i}.png").write_bytes(png_bytes(image))
                pixels[f"{alphabet}/{character}/{i}.png"] = image
    (tree / ".hidden.png").write_bytes(b"ignored")
    body = """[kinds.alphabet]
[kinds.character]
namespace = "glyphs"
[transform]
polarity = "dark-on-bright"
resize = [15, 15]
pad = "center"
[[parts]]
reader = "image-tree"
images = "tree"
split = "train"
kinds.alphabet = { folders = [0] }
kinds.character = { folders = [0, 1] }
"""
    with ingest_text(manifest("tree", body, {"tree": tree}), tmp_path) as store:
        assert len(store) == 8
        assert store.values("alphabet") == ["tree/alpha", "tree/beta"]
        assert store.values("character")[0] == "glyphs/alpha/c1"
        first = store.images([0])[0, 0]
    expected = readers_free_area(255 - pixels["alpha/c1/0.png"], 15)
    assert np.abs(first[8:23, 8:23].astype(float) - expected).max() <= 0.5 + 1e-9
    assert not first[:8].any() and not first[23:].any()


def readers_free_area(image: np.ndarray, side: int) -> np.ndarray:
    """2x downscaling by plain block means (30 -> 15), as a reference."""
    h = image.shape[0] // side
    return image.reshape(side, h, side, h).mean(axis=(1, 3))


def test_atlas_count_and_zip_tree_labels(tmp_path: Path):
    sheet = np.arange(4 * 6 * 25, dtype=np.uint16).reshape(20, 30) % 251
    sheet = sheet.astype(np.uint8)
    (tmp_path / "sheet.png").write_bytes(png_bytes(sheet))
    body = """[transform]
polarity = "bright-on-dark"
pad = "center"
[[parts]]
reader = "atlas"
images = "sheet"
tile = [10, 6]
count = 7
split = "test"
"""
    with ingest_text(manifest("sheet", body, {"sheet": tmp_path / "sheet.png"}), tmp_path,
                     shape=(1, 10, 8)) as store:
        assert len(store) == 7 and store.split_names == ["test"]
        np.testing.assert_array_equal(store.images([6])[0, 0, :, 1:7], sheet[10:20, 6:12])

    with pytest.raises(BadInputError, match="count = 11, but the atlas holds 10 tiles"):
        readers.read_atlas(png_bytes(sheet), "sheet.png", "gray", (10, 6), 11)
    with pytest.raises(BadInputError, match="not a whole number"):
        readers.read_atlas(png_bytes(sheet), "sheet.png", "gray", (7, 6), None)


def test_zip_tree_reader_sorts_and_labels(tmp_path: Path):
    members = {f"root/{a}/{c}/x.png": png_bytes(np.full((4, 4), i, dtype=np.uint8))
               for i, (a, c) in enumerate([("b", "2"), ("a", "1"), ("a", "2")])}
    members["__MACOSX/root/a/._x.png"] = b"resource fork"
    data = write_zip(tmp_path / "t.zip", members).read_bytes()
    native = readers.read_image_tree(tmp_path / "t.zip", data, "t.zip", "gray", (".png",),
                                     {"pair": (1, 2), "top": (0,)})
    assert list(native.names) == ["root/a/1/x.png", "root/a/2/x.png", "root/b/2/x.png"]
    assert native.kinds["pair"].values == ["a/1", "a/2", "b/2"]
    assert native.kinds["top"].values == ["root"]
    np.testing.assert_array_equal(native.pixels[:, 0, 0, 0], [1, 2, 0])
    with pytest.raises(BadInputError, match="needs folder depth 3"):
        readers.read_image_tree(tmp_path / "t.zip", data, "t.zip", "gray", (".png",),
                                {"deep": (3,)})


def test_idx_labels_count_mismatch(tmp_path: Path):
    (tmp_path / "i.idx").write_bytes(idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8)))
    (tmp_path / "l.idx").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    body = """[kinds.label]
[transform]
polarity = "bright-on-dark"
pad = "center"
[[parts]]
reader = "idx"
images = "i"
split = "train"
kinds.label = { idx = "l" }
"""
    text = manifest("short", body, {"i": tmp_path / "i.idx", "l": tmp_path / "l.idx"})
    with pytest.raises(BadInputError, match=r"l\.idx: 4 labels; expected 5"):
        ingest_text(text, tmp_path)
    assert not (tmp_path / "store.h5").exists()


def test_declared_values_fix_the_domain(tmp_path: Path):
    (tmp_path / "i.idx").write_bytes(idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8)))
    (tmp_path / "l.idx").write_bytes(idx_bytes(np.array([2, 0, 2], dtype=np.uint8)))
    body = """[kinds.label]
values = ["0", "1", "2", "3"]
[transform]
polarity = "bright-on-dark"
pad = "center"
[[parts]]
reader = "idx"
images = "i"
split = "train"
kinds.label = { idx = "l" }
"""
    text = manifest("few", body, {"i": tmp_path / "i.idx", "l": tmp_path / "l.idx"})
    with ingest_text(text, tmp_path) as store:
        assert store.values("label") == ["few/0", "few/1", "few/2", "few/3"]
        assert store.domain("label")[0].tolist() == [True, True, True, True]
        assert store.codes("label").tolist() == [2, 0, 2]
    with pytest.raises(BadInputError, match="value '2', which is not declared"):
        ingest_text(text.replace('"0", "1", "2", "3"', '"0", "1"'), tmp_path, name="other.h5")


# fuzzing and round trips ----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9)),
       st.booleans())
def test_idx_round_trip(array: np.ndarray, compress: bool):
    data = idx_bytes(array)
    data = gzip.compress(data) if compress else data
    np.testing.assert_array_equal(readers.read_idx(data, "x.idx"), array)


def _survives(read, data: bytes) -> None:
    try:
        read(data)
    except BadInputError as error:
        assert "\n" not in str(error)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 60), st.binary(max_size=8))
def test_fuzz_idx_bytes(noise: bytes, cut: int, patch: bytes):
    good = idx_bytes(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    _survives(lambda d: readers.read_idx(d, "x"), noise)
    _survives(lambda d: readers.read_idx(d, "x"), good[:cut] + patch + good[cut + len(patch):])
    zipped = gzip.compress(good)
    _survives(lambda d: readers.read_idx(d, "x"), zipped[:cut] + patch + zipped[cut:])


PNG = png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("r/a/1.png", PNG)
        archive.writestr("r/b/2.png", PNG)
    return buffer.getvalue()


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array([1, 2]))
    return buffer.getvalue()


def _read_tree(data: bytes) -> None:
    readers.read_image_tree(Path("z.zip"), data, "z.zip", "gray", (".png",), {"k": (1,)})


def _read_npz(data: bytes) -> None:
    readers.npz_images(readers.read_npz_array(data, "d.npz", "x"), "d.npz", "NHW")
    readers.npz_column(readers.read_npz_array(data, "d.npz", "y"), "d.npz")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["png", "zip", "npz"]), st.integers(0, 400), st.binary(min_size=1,
                                                                                max_size=6),
       st.booleans())
def test_fuzz_png_zip_npz_bytes(kind: str, at: int, patch: bytes, truncate: bool):
    good = {"png": PNG, "zip": _zip_bytes(), "npz": _npz_bytes()}[kind]
    read = {"png": lambda d: readers.decode_image(d, "a.png", "gray"),
            "zip": _read_tree, "npz": _read_npz}[kind]
    at = at % len(good)
    data = good[:at] if truncate else good[:at] + patch + good[at + len(patch):]
    _survives(read, data)


def test_npz_refuses_objects_and_bad_sizes():
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BadInputError, match="dtype object"):
        readers.read_npz_array(buffer.getvalue(), "o.npz", "x")
    with pytest.raises(BadInputError, match="no array 'q'; expected one of: x, y"):
        readers.read_npz_array(_npz_bytes(), "d.npz", "q")
    with pytest.raises(BadInputError, match="expected uint8 images in layout NCHW"):
        readers.npz_images(np.zeros((2, 4, 4), dtype=np.uint8), "d.npz", "NCHW")


def test_gzip_bomb_is_refused():
    data = gzip.compress(bytes(1 << 20))
    with pytest.raises(BadInputError, match="gunzips to more than 1000 bytes"):
        readers.decompress_if_gzip(data, "bomb.gz", limit=1000)
