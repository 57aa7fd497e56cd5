"""Helpers that make small source files and stores for tests (importable from any test folder).

``build_small_store(store, data_root, workdir)`` builds, in about a second, a real store of the
three bundled sources cut down to a few hundred images: the first MNIST train and test images
(IDX), the first members of each Omniglot zip (both zips, so deduplication still happens), and
the first rows of the atlas. It uses the same dataset names, kinds and transforms as
``data_manifests/``, so code written against the full store runs on it unchanged::

    from tests.store.fixtures import build_small_store

    @pytest.fixture(scope="session")
    def small_store(tmp_path_factory, data_root):
        return build_small_store(tmp_path_factory.mktemp("store") / "small.h5", data_root)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "data_manifests"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of ``array`` (uint8 or int32), as the MNIST files are laid out."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(np.int32): 0x0C}
    array = np.asarray(array)
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    body = array.astype(">i4").tobytes() if code == 0x0C else array.tobytes()
    return header + body


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of a uint8 ``[h, w]`` (grey) or ``[h, w, 3]`` (RGB) array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def read_idx_independently(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file with nothing of tzk: the test's own reference reader."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


MNIST_SUBSET = """tzk_manifest = 1
[dataset]
name = "mnist"
license = "CC BY-SA 3.0"
citation = "LeCun et al. 1998"
[files.train-images]
path = "mnist-train-images.idx"
sha256 = "{train_images}"
[files.train-labels]
path = "mnist-train-labels.idx"
sha256 = "{train_labels}"
[files.test-images]
path = "mnist-test-images.idx"
sha256 = "{test_images}"
[files.test-labels]
path = "mnist-test-labels.idx"
sha256 = "{test_labels}"
[kinds.label]
[transform]
polarity = "bright-on-dark"
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

OMNIGLOT_SUBSET = """tzk_manifest = 1
[dataset]
name = "omniglot"
license = "MIT"
citation = "Lake et al. 2015"
dedupe = true
[files.small1]
path = "omniglot-small1.zip"
sha256 = "{small1}"
[files.small2]
path = "omniglot-small2.zip"
sha256 = "{small2}"
[kinds.alphabet]
[kinds.character]
[transform]
polarity = "dark-on-bright"
resize = [28, 28]
pad = "center"
[[parts]]
reader = "image-tree"
images = "small1"
kinds.alphabet = {{ folders = [1] }}
kinds.character = {{ folders = [1, 2] }}
[[parts]]
reader = "image-tree"
images = "small2"
kinds.alphabet = {{ folders = [1] }}
kinds.character = {{ folders = [1, 2] }}
[split]
fraction = 0.2
seed = 20190205
"""

ATLAS_SUBSET = """tzk_manifest = 1
[dataset]
name = "omniglot-atlas"
license = "MIT"
citation = "Lake et al. 2015"
[files.atlas]
path = "omniglot-atlas.png"
sha256 = "{atlas}"
[transform]
polarity = "bright-on-dark"
pad = "center"
[[parts]]
reader = "atlas"
images = "atlas"
tile = [28, 28]
[split]
fraction = 0.2
seed = 20190206
"""


def write_unlabelled_manifest(workdir: Path) -> Path:
    """``mnist-unlabelled.toml``: the MNIST manifest of ``workdir`` without its labels."""
    text = (workdir / "mnist.toml").read_text()
    unlabelled = [line for line in text.splitlines() if "kinds.label" not in line]
    path = workdir / "mnist-unlabelled.toml"
    path.write_text("\n".join(unlabelled) + "\n")
    return path


def write_small_sources(data_root: Path, workdir: Path, n_train: int = 200, n_test: int = 100,
                        n_members: int = 120, atlas_rows: int = 5) -> list[Path]:
    """Cut the real data down into ``workdir`` and write manifests for it; return them.

    ``workdir`` becomes the data root of the returned manifests.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    mnist = data_root / "mnist"
    files = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = read_idx_independently(mnist / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx_independently(mnist / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        files[f"{split}_images"] = sha256(write_idx(workdir / f"mnist-{split}-images.idx", images))
        files[f"{split}_labels"] = sha256(write_idx(workdir / f"mnist-{split}-labels.idx", labels))
    (workdir / "mnist.toml").write_text(MNIST_SUBSET.format(**files))

    zips = {}
    for key, name in (("small1", "images_background_small1.zip"),
                      ("small2", "images_background_small2.zip")):
        with zipfile.ZipFile(data_root / "omniglot" / name) as archive:
            pngs = sorted(n for n in archive.namelist() if n.endswith(".png"))
            # half from Greek, which both zips hold byte for byte, so that dedupe has work
            greek = [n for n in pngs if n.split("/")[1] == "Greek"][: n_members // 2]
            members = greek + [n for n in pngs if n not in greek][: n_members - len(greek)]
            content = {member: archive.read(member) for member in members}
        zips[key] = sha256(write_zip(workdir / f"omniglot-{key}.zip", content))
    (workdir / "omniglot.toml").write_text(OMNIGLOT_SUBSET.format(**zips))

    from PIL import Image

    with Image.open(data_root / "omniglot" / "images_background_28x28_atlas.png") as sheet:
        top = sheet.crop((0, 0, sheet.width, 28 * atlas_rows))
        top.save(workdir / "omniglot-atlas.png")
    atlas = sha256(workdir / "omniglot-atlas.png")
    (workdir / "omniglot-atlas.toml").write_text(ATLAS_SUBSET.format(atlas=atlas))
    return [workdir / "mnist.toml", workdir / "omniglot.toml", workdir / "omniglot-atlas.toml"]


def build_small_store(store: Path, data_root: Path, workdir: Path | None = None) -> Path:
    """Build a small real store at ``store`` (300 MNIST, 180 Omniglot after deduplication of
    240, and 100 atlas images, shape 1x32x32) from the real data under ``data_root``.

    Returns the store's path; the cut-down sources and manifests are left in ``workdir``.
    """
    from tzkcli.store import ingest, load_manifest

    workdir = workdir or store.parent / "small-sources"
    manifests = write_small_sources(data_root, workdir)
    ingest([load_manifest(path) for path in manifests], store, workdir)
    return store
