"""``tzk ingest`` as a user runs it: appending, no-ops, replacing, and every bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tests.store.fixtures import idx_bytes, png_bytes, sha256, write_zip
from tzkcli.store import open_store

MANIFEST = """tzk_manifest = 1
[dataset]
name = "{name}"
license = "CC0"
citation = "made by a test"
[files.images]
path = "{images}"
sha256 = "{images_sha}"
[files.labels]
path = "{labels}"
sha256 = "{labels_sha}"
[kinds.label]
{kind_extra}
[transform]
polarity = "bright-on-dark"
pad = "center"
[[parts]]
reader = "idx"
images = "images"
split = "train"
kinds.label = {{ idx = "labels" }}
"""


def idx_source(root: Path, name: str = "digits", n: int = 24, side: int = 28,
               seed: int = 0, kind_extra: str = "", images_data: bytes | None = None,
               labels: np.ndarray | None = None) -> Path:
    """Write a small IDX source and its manifest under ``root``; return the manifest."""
    rng = np.random.default_rng(seed)
    images = root / f"{name}-images.idx"
    label_file = root / f"{name}-labels.idx"
    pixels = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    images.write_bytes(images_data if images_data is not None else idx_bytes(pixels))
    labels = rng.integers(0, 10, size=n).astype(np.uint8) if labels is None else labels
    label_file.write_bytes(idx_bytes(labels))
    manifest = root / f"{name}.toml"
    manifest.write_text(MANIFEST.format(
        name=name, images=images.name, images_sha=sha256(images), labels=label_file.name,
        labels_sha=sha256(label_file), kind_extra=kind_extra,
    ))
    return manifest


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


# appending, no-ops, replacing -----------------------------------------------------------------

def test_append_keeps_existing_codes_and_grows_vocabularies(small_store: Path, tmp_path: Path,
                                                            tzk):
    with open_store(small_store) as before:
        old = {k: (before.values(k), before.codes(k).copy()) for k in before.kinds}
        old_domain = {k: before.domain(k).copy() for k in before.kinds}
        n_old, old_images = len(before), before.images(np.arange(len(before)))
    manifest = idx_source(tmp_path, "digits", kind_extra='namespace = "mnist"')

    result = tzk("ingest", manifest, "--store", small_store, "--data-root", tmp_path)
    assert result.code == 0, result.stderr
    assert "digits: added 24 images (train 24)" in result.stdout

    with open_store(small_store) as after:
        assert after.kinds == list(old)
        assert after.values("dataset") == old["dataset"][0] + ["digits"]
        for kind, (values, codes) in old.items():
            assert after.values(kind)[:len(values)] == values
            np.testing.assert_array_equal(after.codes(kind)[:n_old], codes)
            np.testing.assert_array_equal(after.domain(kind)[:len(old_domain[kind]),
                                                          :len(values)], old_domain[kind])
        np.testing.assert_array_equal(after.images(np.arange(n_old)), old_images)
        # a shared label space: "digits" labels are the MNIST values, both datasets' domain
        label_domain = after.domain("label")
        assert after.values("label") == [f"mnist/{d}" for d in range(10)]
        assert label_domain[after.values("dataset").index("digits")].sum() > 0
        assert not after.domain("alphabet")[after.values("dataset").index("digits")].any()


def test_ingesting_the_same_source_again_is_a_no_op(small_store: Path, tmp_path: Path, tzk):
    manifest = idx_source(tmp_path)
    assert tzk("ingest", manifest, "--store", small_store, "--data-root", tmp_path).code == 0
    before = small_store.read_bytes()
    result = tzk("ingest", manifest, "--store", small_store, "--data-root", tmp_path)
    assert result.code == 0
    assert "digits: already in the store, unchanged" in result.stdout
    assert "nothing to do" in result.stdout
    assert small_store.read_bytes() == before


def test_replace_rewrites_a_source_in_place(small_store: Path, tmp_path: Path, tzk):
    first = idx_source(tmp_path, seed=1)
    assert tzk("ingest", first, "--store", small_store, "--data-root", tmp_path).code == 0
    with open_store(small_store) as store:
        rows_before = store.indices(dataset="digits")
        code_before = store.values("dataset").index("digits")

    second = idx_source(tmp_path, seed=2, n=30)
    refused = tzk("ingest", second, "--store", small_store, "--data-root", tmp_path)
    assert refused.code == 3 and "already in" in one_error_line(refused)

    result = tzk("ingest", second, "--store", small_store, "--data-root", tmp_path,
                 "--replace")
    assert result.code == 0, result.stderr
    assert "digits: replaced 30 images" in result.stdout
    with open_store(small_store) as store:
        assert store.values("dataset").index("digits") == code_before
        rows = store.indices(dataset="digits")
        assert rows[0] == rows_before[0] and len(rows) == 30
        assert store.compute_digest() == store.digest


def test_ingest_json_and_quiet_stderr(tmp_path: Path, tzk):
    manifest = idx_source(tmp_path)
    store = tmp_path / "new.h5"
    result = tzk("ingest", manifest, "--store", store, "--data-root", tmp_path, "--json")
    assert result.code == 0 and result.stderr == ""  # no progress bars off a terminal
    data = json.loads(result.stdout)
    assert data["written"] is True and data["shape"] == [1, 32, 32]
    assert data["sources"] == [{"name": "digits", "action": "added", "images": 24,
                                "splits": {"train": 24}, "dropped_duplicates": 0}]


def test_shape_flag_and_environment_data_root(tmp_path: Path, tzk, monkeypatch):
    manifest = idx_source(tmp_path)
    monkeypatch.setenv("TZK_DATA_ROOT", str(tmp_path))
    store = tmp_path / "big.h5"
    result = tzk("ingest", manifest, "--store", store, "--shape", "1x40x36")
    assert result.code == 0, result.stderr
    with open_store(store) as opened:
        assert opened.shape == (1, 40, 36)
        image = opened.images([0])[0, 0]
    assert not image[:6].any() and not image[:, :4].any()  # (40-28)/2 rows, (36-28)/2 cols


def test_no_data_root_is_a_usage_error(tmp_path: Path, tzk, monkeypatch):
    monkeypatch.delenv("TZK_DATA_ROOT", raising=False)
    result = tzk("ingest", idx_source(tmp_path), "--store", tmp_path / "s.h5")
    assert result.code == 2
    assert "--data-root" in one_error_line(result)
    assert not (tmp_path / "s.h5").exists()


# bad input: one test each; the existing store must stay byte for byte the same ---------------

def _bad_manifest_text(root: Path, replace: tuple[str, str]) -> Path:
    manifest = idx_source(root)
    manifest.write_text(manifest.read_text().replace(*replace))
    return manifest


def _missing_file(root: Path) -> Path:
    manifest = idx_source(root)
    (root / "digits-images.idx").unlink()
    return manifest


def _sha_mismatch(root: Path) -> Path:
    manifest = idx_source(root)
    data = bytearray((root / "digits-images.idx").read_bytes())
    data[-1] ^= 0xFF
    (root / "digits-images.idx").write_bytes(bytes(data))
    return manifest


def _truncated_idx(root: Path) -> Path:
    pixels = np.zeros((24, 28, 28), dtype=np.uint8)
    return idx_source(root, images_data=idx_bytes(pixels)[:-100])


def _corrupt_idx(root: Path) -> Path:
    return idx_source(root, images_data=b"\x12\x34\x08\x03" + bytes(100))


def _corrupt_gzip(root: Path) -> Path:
    data = gzip.compress(idx_bytes(np.zeros((24, 28, 28), dtype=np.uint8)))
    return idx_source(root, images_data=data[:20] + bytes(len(data) - 20))


def _tree_manifest(root: Path, zip_path: Path, reader_extra: str = "") -> Path:
    manifest = root / "tree.toml"
    manifest.write_text(f"""tzk_manifest = 1
[dataset]
name = "tree"
license = "CC0"
citation = "a test"
[files.zip]
path = "{zip_path.name}"
sha256 = "{sha256(zip_path)}"
[kinds.letter]
[transform]
polarity = "dark-on-bright"
resize = [28, 28]
pad = "center"
[[parts]]
reader = "image-tree"
images = "zip"
split = "train"
kinds.letter = {{ folders = [0] }}
{reader_extra}""")
    return manifest


def _corrupt_png(root: Path) -> Path:
    good = png_bytes(np.full((40, 40), 255, dtype=np.uint8))
    zip_path = write_zip(root / "tree.zip", {"a/1.png": good, "b/2.png": good[:60]})
    return _tree_manifest(root, zip_path)


def _corrupt_zip(root: Path) -> Path:
    zip_path = root / "tree.zip"
    zip_path.write_bytes(b"PK\x03\x04" + bytes(200))
    return _tree_manifest(root, zip_path)


def _truncated_atlas(root: Path) -> Path:
    sheet = png_bytes(np.zeros((56, 56), dtype=np.uint8))
    (root / "atlas.png").write_bytes(sheet[: len(sheet) // 2])
    manifest = root / "atlas.toml"
    manifest.write_text(f"""tzk_manifest = 1
[dataset]
name = "atlas"
license = "CC0"
citation = "a test"
[files.sheet]
path = "atlas.png"
sha256 = "{sha256(root / 'atlas.png')}"
[transform]
polarity = "bright-on-dark"
pad = "center"
[[parts]]
reader = "atlas"
images = "sheet"
split = "train"
tile = [28, 28]
""")
    return manifest


def _no_shape_mapping(root: Path) -> Path:
    return idx_source(root, side=40)


def _other_content(root: Path) -> Path:
    return idx_source(root, name="mnist")


BAD_INPUTS = {
    "missing file": (_missing_file, ["files.images.path", "not found"]),
    "sha256 mismatch": (_sha_mismatch, ["sha256", "files.images.sha256", "expected"]),
    "truncated IDX": (_truncated_idx, ["digits-images.idx", "truncated", "expected"]),
    "corrupt IDX": (_corrupt_idx, ["digits-images.idx", "not an IDX file"]),
    "corrupt gzip": (_corrupt_gzip, ["digits-images.idx", "gzip"]),
    "corrupt PNG": (_corrupt_png, ["tree.zip", "member b/2.png", "cannot decode image"]),
    "corrupt zip": (_corrupt_zip, ["tree.zip", "not a valid zip file"]),
    "truncated PNG atlas": (_truncated_atlas, ["atlas.png", "cannot decode image"]),
    "unknown format": (
        lambda root: _bad_manifest_text(root, ('reader = "idx"', 'reader = "tiff-stack"')),
        ["parts[0].reader", '"tiff-stack"', '"idx"'],
    ),
    "unknown key": (
        lambda root: _bad_manifest_text(root, ('license = "CC0"', 'license = "CC0"\nlicence = 1')),
        ["dataset.licence", "unknown key"],
    ),
    "missing field": (
        lambda root: _bad_manifest_text(root, ('citation = "made by a test"', "")),
        ["dataset.citation", "missing"],
    ),
    "wrong type": (
        lambda root: _bad_manifest_text(root, ('pad = "center"', "pad = 2")),
        ["transform.pad", "found int 2", "expected"],
    ),
    "invalid TOML": (
        lambda root: _bad_manifest_text(root, ("[transform]", "[transform")),
        ["not valid TOML"],
    ),
    "no shape mapping": (_no_shape_mapping, ["digits.toml", "1x40x40", "1x32x32"]),
    "dataset with other content": (_other_content, ["'mnist'", "already in", "--replace"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_the_store_unchanged(case: str, small_store: Path,
                                                              tmp_path: Path, tzk):
    build, needles = BAD_INPUTS[case]
    root = tmp_path / "source"
    root.mkdir()
    manifest = build(root)
    before = small_store.read_bytes()

    result = tzk("ingest", manifest, "--store", small_store, "--data-root", root)
    assert result.code == 3, result.stderr
    line = one_error_line(result)
    for needle in needles:
        assert needle in line, line
    assert small_store.read_bytes() == before
    assert not list(small_store.parent.glob(".tmp-*"))


def _make_not_hdf5(store: Path) -> list[str]:
    store.write_bytes(b"this is not an HDF5 file\n" * 10)
    return ["not an HDF5 file"]


def _make_other_format(store: Path) -> list[str]:
    import h5py

    with h5py.File(store, "r+") as file:
        file.attrs["format"] = "anndata"
    return ["attribute 'format'", "'anndata'", "'tzk-store'"]


def _make_newer_version(store: Path) -> list[str]:
    import h5py

    with h5py.File(store, "r+") as file:
        file.attrs["format_version"] = np.int64(7)
    return ["format_version 7", "newer", "upgrade tzk"]


@pytest.mark.parametrize("damage", [_make_not_hdf5, _make_other_format, _make_newer_version],
                         ids=["not HDF5", "another format", "newer version"])
def test_bad_store_is_refused_and_left_alone(damage, small_store: Path, tmp_path: Path, tzk):
    needles = damage(small_store)
    before = small_store.read_bytes()
    manifest = idx_source(tmp_path)
    for args in (("ingest", manifest, "--store", small_store, "--data-root", tmp_path),
                 ("info", small_store)):
        result = tzk(*args)
        assert result.code == 3, result.stderr
        line = one_error_line(result)
        assert str(small_store) in line
        for needle in needles:
            assert needle in line, line
    assert small_store.read_bytes() == before


def test_shape_of_an_existing_store_cannot_change(small_store: Path, tmp_path: Path, tzk):
    before = small_store.read_bytes()
    result = tzk("ingest", idx_source(tmp_path), "--store", small_store, "--data-root",
                 tmp_path, "--shape", "1x64x64")
    assert result.code == 3
    line = one_error_line(result)
    assert "--shape" in line and "1x64x64" in line and "1x32x32" in line
    assert small_store.read_bytes() == before


def test_malformed_shape_flag(tmp_path: Path, tzk):
    result = tzk("ingest", idx_source(tmp_path), "--store", tmp_path / "s.h5", "--data-root",
                 tmp_path, "--shape", "32x32")
    assert result.code == 2 and "--shape" in one_error_line(result)


def test_store_path_in_a_missing_folder_or_a_folder(tmp_path: Path, tzk):
    manifest = idx_source(tmp_path)
    result = tzk("ingest", manifest, "--store", tmp_path / "no" / "s.h5", "--data-root",
                 tmp_path)
    assert result.code == 3 and "does not exist" in one_error_line(result)
    result = tzk("ingest", manifest, "--store", tmp_path, "--data-root", tmp_path)
    assert result.code == 3 and "is not a file" in one_error_line(result)


def test_append_with_a_new_kind(small_store: Path, tmp_path: Path, tzk):
    manifest = idx_source(tmp_path, "strokes")
    text = manifest.read_text().replace("[transform]", "[kinds.stroke]\n[transform]")
    manifest.write_text(text.replace('kinds.label = { idx = "labels" }',
                                     'kinds.label = { idx = "labels" }\n'
                                     'kinds.stroke = { constant = "pen" }'))
    with open_store(small_store) as before:
        n_old, old_kinds = len(before), before.kinds
    assert tzk("ingest", manifest, "--store", small_store, "--data-root", tmp_path).code == 0
    with open_store(small_store) as after:
        assert after.kinds == old_kinds + ["stroke"]
        assert after.values("stroke") == ["strokes/pen"]
        assert (after.codes("stroke")[:n_old] == -1).all()
        assert (after.codes("stroke")[n_old:] == 0).all()
        assert after.domain("stroke")[:, 0].tolist() == [False, False, False, True]
