#!/usr/bin/env python3
"""Generate the small real sample shipped in ``tzkcli/sample_data/`` (at most 2 MB).

The quickstart falls back to this sample when no data root is found. It is real data, cut
from the datasets of ``../shared/data`` (see its ``SOURCES.md``), never synthesised:

- ``mnist/``: a seeded, class-balanced subset of MNIST: 300 training and 50 test images per
  digit, written as gzipped IDX files exactly like the originals (``gzip -9 -n`` bytes).
- ``omniglot/sample_28x28_atlas.png``: 3,000 tiles, a seeded choice from the 28x28 Omniglot
  atlas, laid out 20 tiles wide in row-major order (white strokes on black, no labels).
- ``omniglot/images_background_sample.zip``: the original 105x105 PNG files, byte for byte, of
  the first 6 characters of each of the 8 alphabets of the two small background splits (all
  20 drawers each: 960 images), under ``images_background_sample/ALPHABET/characterNN/``.

Beside them it writes the licenses, a ``README.md`` with the attribution, and one manifest per
dataset under ``manifests/`` whose sha256 fields match the written files. The output is
deterministic: running the script twice gives the same bytes.

Usage::

    python scripts/make_sample_data.py [--data-root ../shared/data] [--out tzkcli/sample_data]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEED = 20261203
MNIST_TRAIN_PER_DIGIT = 300
MNIST_TEST_PER_DIGIT = 50
ATLAS_TILES = 3000
ATLAS_COLUMNS = 20
TILE = 28
CHARACTERS_PER_ALPHABET = 6
MAX_BYTES = 2 * 1024 * 1024
ZIP_TOP = "images_background_sample"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)

# the sha256 of each input, as listed in ../shared/data/SOURCES.md
SOURCES = {
    "mnist/train-images-idx3-ubyte.gz":
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "mnist/train-labels-idx1-ubyte.gz":
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "mnist/t10k-images-idx3-ubyte.gz":
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "mnist/t10k-labels-idx1-ubyte.gz":
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
    "omniglot/images_background_28x28_atlas.png":
        "644988456247c07d17b687db039dc73c1a45b2e59cbd51139e642d10564f96c5",
    "omniglot/images_background_small1.zip":
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "omniglot/images_background_small2.zip":
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_sources(root: Path) -> None:
    """Refuse inputs that are not the published files (a partial copy, another version)."""
    for relative, expected in SOURCES.items():
        path = root / relative
        if not path.is_file():
            sys.exit(f"Error: {path}: not found; expected the real data (see SOURCES.md)")
        if sha256(path) != expected:
            sys.exit(f"Error: {path}: sha256 differs from SOURCES.md; expected {expected}")


# MNIST -----------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array of its declared shape."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array (magic 0x08 = unsigned byte), gzipped like ``gzip -9 -n``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array).tobytes(), compresslevel=9,
                         mtime=0)


def balanced_rows(labels: np.ndarray, per_digit: int, rng: np.random.Generator) -> np.ndarray:
    """``per_digit`` seeded rows of each digit, in their original order."""
    chosen = [rng.choice(np.flatnonzero(labels == digit), per_digit, replace=False)
              for digit in range(10)]
    return np.sort(np.concatenate(chosen))


def make_mnist(root: Path, out: Path, rng: np.random.Generator) -> None:
    (out / "mnist").mkdir(parents=True)
    for split, prefix, per_digit in (("train", "train", MNIST_TRAIN_PER_DIGIT),
                                     ("test", "t10k", MNIST_TEST_PER_DIGIT)):
        images = read_idx(root / f"mnist/{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"mnist/{prefix}-labels-idx1-ubyte.gz")
        rows = balanced_rows(labels, per_digit, rng)
        (out / f"mnist/{split}-images-idx3-ubyte.gz").write_bytes(idx_bytes(images[rows]))
        (out / f"mnist/{split}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels[rows]))


# Omniglot ---------------------------------------------------------------------------------------

def make_atlas(root: Path, out: Path, rng: np.random.Generator) -> None:
    """A seeded choice of atlas tiles, in their original order, as a smaller atlas."""
    from PIL import Image

    with Image.open(root / "omniglot/images_background_28x28_atlas.png") as image:
        sheet = np.asarray(image.convert("L"))
    rows, cols = sheet.shape[0] // TILE, sheet.shape[1] // TILE
    tiles = sheet.reshape(rows, TILE, cols, TILE).transpose(0, 2, 1, 3).reshape(-1, TILE, TILE)
    chosen = tiles[np.sort(rng.choice(len(tiles), ATLAS_TILES, replace=False))]
    grid = chosen.reshape(ATLAS_TILES // ATLAS_COLUMNS, ATLAS_COLUMNS, TILE, TILE)
    small = grid.transpose(0, 2, 1, 3).reshape(-1, ATLAS_COLUMNS * TILE)
    buffer = io.BytesIO()
    Image.fromarray(small, mode="L").save(buffer, format="PNG", optimize=True)
    (out / "omniglot").mkdir(parents=True, exist_ok=True)
    (out / "omniglot/sample_28x28_atlas.png").write_bytes(buffer.getvalue())


def omniglot_members(root: Path) -> dict[str, bytes]:
    """``ALPHABET/characterNN/FILE.png`` -> original bytes, for the first characters of each
    alphabet of both small splits (the splits share Greek and Latin byte for byte)."""
    members: dict[str, bytes] = {}
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        with zipfile.ZipFile(root / "omniglot" / name) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if not info.is_dir() and len(parts) == 4 and parts[3].endswith(".png"):
                    members.setdefault("/".join(parts[1:]), archive.read(info))

    characters: dict[str, list[str]] = {}
    for relative in sorted(members):
        alphabet, character, _ = relative.split("/")
        known = characters.setdefault(alphabet, [])
        if character not in known:
            known.append(character)
    kept = {(a, c) for a, names in characters.items() for c in names[:CHARACTERS_PER_ALPHABET]}
    return {r: data for r, data in members.items() if tuple(r.split("/")[:2]) in kept}


def make_omniglot_zip(root: Path, out: Path) -> None:
    members = omniglot_members(root)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for relative in sorted(members):
            info = zipfile.ZipInfo(f"{ZIP_TOP}/{relative}", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[relative])
    (out / "omniglot/images_background_sample.zip").write_bytes(buffer.getvalue())


# manifests, licenses, README --------------------------------------------------------------------

MNIST_MANIFEST = """\
# The shipped MNIST sample: {train} training and {test} test images (a seeded, class-balanced
# subset of MNIST made by scripts/make_sample_data.py), 28x28, bright on dark.
# Paths are relative to the sample folder (tzkcli/sample_data).
tzk_manifest = 1

[dataset]
name = "mnist"
description = "MNIST handwritten digits 0-9 (LeCun, Cortes, Burges), 28x28 grey; shipped sample"
license = "CC BY-SA 3.0 (as commonly stated for MNIST)"
citation = "Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to \
document recognition. Proceedings of the IEEE 86(11), 1998."
url = "http://yann.lecun.com/exdb/mnist/"

[files.train-images]
path = "mnist/train-images-idx3-ubyte.gz"
sha256 = "{train_images}"

[files.train-labels]
path = "mnist/train-labels-idx1-ubyte.gz"
sha256 = "{train_labels}"

[files.test-images]
path = "mnist/test-images-idx3-ubyte.gz"
sha256 = "{test_images}"

[files.test-labels]
path = "mnist/test-labels-idx1-ubyte.gz"
sha256 = "{test_labels}"

[kinds.label]

[transform]
polarity = "bright-on-dark"
color = "gray"
pad = "center"

[[parts]]
reader = "idx"
images = "train-images"
split = "train"
kinds.label = {{ idx = "train-labels" }}

[[parts]]
reader = "idx"
images = "test-images"
split = "test"
kinds.label = {{ idx = "test-labels" }}
"""

ATLAS_MANIFEST = """\
# The shipped Omniglot atlas sample: {tiles} tiles of the 28x28 background atlas (a seeded
# choice made by scripts/make_sample_data.py), no labels: dataset identity only.
tzk_manifest = 1

[dataset]
name = "omniglot-atlas"
description = "Omniglot background set, 28x28, unlabelled atlas; shipped sample of {tiles} tiles"
license = "MIT (Omniglot: Brenden Lake; atlas: LICENSE.atlas)"
citation = "B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning \
through probabilistic program induction. Science 350(6266), 2015."
url = "https://github.com/brendenlake/omniglot"

[files.atlas]
path = "omniglot/sample_28x28_atlas.png"
sha256 = "{atlas}"

[transform]
polarity = "bright-on-dark"
color = "gray"
pad = "center"

[[parts]]
reader = "atlas"
images = "atlas"
tile = [28, 28]
count = {tiles}

[split]
held_out = "test"
fraction = 0.2
seed = 20190206
rest = "train"
"""

OMNIGLOT_MANIFEST = """\
# The shipped labelled Omniglot sample: the original 105x105 PNGs of the first
# {characters} characters of each of the 8 alphabets of the small background splits
# ({images} images), made by scripts/make_sample_data.py. Labels come from the folder names.
tzk_manifest = 1

[dataset]
name = "omniglot"
description = "Omniglot background set, small splits, {images} images; shipped sample"
license = "MIT (Brenden Lake)"
citation = "B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning \
through probabilistic program induction. Science 350(6266), 2015."
url = "https://github.com/brendenlake/omniglot"
dedupe = true

[files.sample]
path = "omniglot/images_background_sample.zip"
sha256 = "{zip}"

[kinds.alphabet]
[kinds.character]

[transform]
polarity = "dark-on-bright"
color = "gray"
resize = [28, 28]
pad = "center"

[[parts]]
reader = "image-tree"
images = "sample"
kinds.alphabet = {{ folders = [1] }}
kinds.character = {{ folders = [1, 2] }}

[split]
held_out = "test"
fraction = 0.2
seed = 20190205
rest = "train"
"""

README = """\
# The shipped sample of real data

`tzk quickstart` trains on this folder with `--sample`, or when it finds no data root
(`--data-root`, `TZK_DATA_ROOT`, or `../shared/data` beside a checkout). It is real data, cut
from the published datasets by `scripts/make_sample_data.py` (seed {seed}); nothing here is
synthesised. Ingest it with the manifests in `manifests/` and `--data-root` set to this folder.

- `mnist/train-*-ubyte.gz`: MNIST training images and labels, {mnist_train} per digit
  ({mnist_train_total} images);
- `mnist/test-*-ubyte.gz`: MNIST test images and labels, {mnist_test} per digit
  ({mnist_test_total} images);
- `omniglot/sample_28x28_atlas.png`: {tiles} tiles of the 28x28 Omniglot background atlas;
- `omniglot/images_background_sample.zip`: {omniglot} original Omniglot PNGs,
  {characters} characters x 20 drawers of each of the 8 alphabets.

## Attribution and licenses

- **MNIST**: Yann LeCun, Corinna Cortes, Christopher J. C. Burges,
  <http://yann.lecun.com/exdb/mnist/>. Y. LeCun, L. Bottou, Y. Bengio, P. Haffner,
  "Gradient-based learning applied to document recognition", Proceedings of the IEEE 86(11),
  1998. Licensed as commonly stated for MNIST: Creative Commons Attribution-Share Alike 3.0
  (CC BY-SA 3.0). The subset here is shared under the same license.
- **Omniglot**: Brenden M. Lake, <https://github.com/brendenlake/omniglot>. B. M. Lake,
  R. Salakhutdinov, J. B. Tenenbaum, "Human-level concept learning through probabilistic
  program induction", Science 350(6266), 2015. MIT License: `omniglot/LICENSE`.
- **The 28x28 Omniglot atlas** the atlas tiles come from: MIT License, `omniglot/LICENSE.atlas`.

Regenerate (bit for bit) with `python scripts/make_sample_data.py --data-root ../shared/data`.
"""


def write_texts(root: Path, out: Path) -> None:
    for name in ("LICENSE", "LICENSE.atlas"):
        shutil.copyfile(root / "omniglot" / name, out / "omniglot" / name)
    digest = {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()}
    omniglot = len(zipfile.ZipFile(out / "omniglot/images_background_sample.zip").namelist())
    manifests = out / "manifests"
    manifests.mkdir()
    (manifests / "mnist.toml").write_text(MNIST_MANIFEST.format(
        train=10 * MNIST_TRAIN_PER_DIGIT, test=10 * MNIST_TEST_PER_DIGIT,
        train_images=digest["mnist/train-images-idx3-ubyte.gz"],
        train_labels=digest["mnist/train-labels-idx1-ubyte.gz"],
        test_images=digest["mnist/test-images-idx3-ubyte.gz"],
        test_labels=digest["mnist/test-labels-idx1-ubyte.gz"]), encoding="utf-8")
    (manifests / "omniglot-atlas.toml").write_text(ATLAS_MANIFEST.format(
        tiles=ATLAS_TILES, atlas=digest["omniglot/sample_28x28_atlas.png"]), encoding="utf-8")
    (manifests / "omniglot.toml").write_text(OMNIGLOT_MANIFEST.format(
        characters=CHARACTERS_PER_ALPHABET, images=omniglot,
        zip=digest["omniglot/images_background_sample.zip"]), encoding="utf-8")
    (out / "README.md").write_text(README.format(
        seed=SEED, mnist_train=MNIST_TRAIN_PER_DIGIT, mnist_test=MNIST_TEST_PER_DIGIT,
        mnist_train_total=10 * MNIST_TRAIN_PER_DIGIT, mnist_test_total=10 * MNIST_TEST_PER_DIGIT,
        tiles=ATLAS_TILES, characters=CHARACTERS_PER_ALPHABET, omniglot=omniglot),
        encoding="utf-8")


def total_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_sample(root: Path, out: Path) -> int:
    """Write the whole sample into the new folder ``out``; return its size in bytes."""
    check_sources(root)
    out.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    make_mnist(root, out, rng)
    make_atlas(root, out, rng)
    make_omniglot_zip(root, out)
    write_texts(root, out)
    size = total_bytes(out)
    if size > MAX_BYTES:
        sys.exit(f"Error: {out}: the sample takes {size:,} bytes; expected at most {MAX_BYTES:,}")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="the folder of the real datasets (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO / "tzkcli" / "sample_data",
                        help="the sample folder to (re)write (default: tzkcli/sample_data)")
    args = parser.parse_args()

    staging = args.out.with_name(f".tmp-{args.out.name}")
    shutil.rmtree(staging, ignore_errors=True)
    size = make_sample(args.data_root, staging)
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(f"wrote {args.out}: {size:,} bytes")


if __name__ == "__main__":
    main()
