"""Time ``ingest`` of the three bundled sources beside the raw ceiling, interleaved.

The ceiling does the unavoidable part of the same job in the same run: decompress the same
files (gunzip the MNIST IDX files, decode every PNG of both Omniglot zips and the atlas with
Pillow) and write the same uint8 array of the finished store with one h5py call. Ingest adds
sha256 checks, parsing, transforms (inversion, area resize, padding), deduplication, splits,
the content digest, fsync and the atomic rename.

Each repeat runs both variants back to back, alternating which goes first, and the figures
are medians over repeats, so drift in the machine's speed affects both alike.

    python benchmarks/ingest/bench_ingest.py --data-root ../shared/data --repeats 7
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from tzkcli.store import ingest, load_manifest, open_store

REPO = Path(__file__).resolve().parents[2]
NAMES = ("mnist", "omniglot", "omniglot-atlas")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ZIPS = ("images_background_small1.zip", "images_background_small2.zip")


def run_ingest(data_root: Path, directory: Path) -> float:
    store = directory / "bench.h5"
    store.unlink(missing_ok=True)
    manifests = [load_manifest(REPO / "data_manifests" / f"{n}.toml") for n in NAMES]
    started = time.perf_counter()
    ingest(manifests, store, data_root)
    return time.perf_counter() - started


def run_ceiling(data_root: Path, directory: Path, images: np.ndarray) -> float:
    started = time.perf_counter()
    for name in MNIST_FILES:
        gzip.decompress((data_root / "mnist" / name).read_bytes())
    for name in ZIPS:
        with zipfile.ZipFile(data_root / "omniglot" / name) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    np.asarray(Image.open(io.BytesIO(archive.read(info))).convert("L"))
    np.asarray(Image.open(data_root / "omniglot" / "images_background_28x28_atlas.png")
               .convert("L"))
    with h5py.File(directory / "ceiling.h5", "w") as file:
        file.create_dataset("images", data=images)
    return time.perf_counter() - started


def machine_state() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("TZK_DATA_ROOT", REPO.parent / "shared/data")))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=REPO.parent if os.access(REPO.parent, os.W_OK)
                                     else None) as folder:
        directory = Path(folder)
        run_ingest(args.data_root, directory)  # warm the page cache and imports
        with open_store(directory / "bench.h5") as store:
            images = store.images(slice(None))
        run_ceiling(args.data_root, directory, images)

        print(f"machine: {machine_state()}")
        print(f"images: {images.shape[0]:,} x {'x'.join(map(str, images.shape[1:]))} "
              f"({images.nbytes / 2**20:.1f} MiB)")
        times: dict[str, list[float]] = {"ingest": [], "ceiling": []}
        for repeat in range(args.repeats):
            order = ("ingest", "ceiling") if repeat % 2 == 0 else ("ceiling", "ingest")
            for variant in order:
                if variant == "ingest":
                    times[variant].append(run_ingest(args.data_root, directory))
                else:
                    times[variant].append(run_ceiling(args.data_root, directory, images))
        print(f"machine after: {machine_state()}")

    ingest_median = statistics.median(times["ingest"])
    ceiling_median = statistics.median(times["ceiling"])
    ratios = [i / c for i, c in zip(times["ingest"], times["ceiling"])]
    print(f"repeats: {args.repeats} (interleaved, alternating order)")
    print(f"ingest  median {ingest_median:6.2f} s  (min {min(times['ingest']):.2f}, "
          f"max {max(times['ingest']):.2f})")
    print(f"ceiling median {ceiling_median:6.2f} s  (min {min(times['ceiling']):.2f}, "
          f"max {max(times['ceiling']):.2f})")
    print(f"ratio ingest / ceiling: median of medians {ingest_median / ceiling_median:.2f}, "
          f"median of paired ratios {statistics.median(ratios):.2f} (target <= 3)")
    print(f"ingest throughput: {images.shape[0] / ingest_median:,.0f} images/s")


if __name__ == "__main__":
    main()
