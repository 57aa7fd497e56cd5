"""Time reading random training batches from a store: memory map vs h5py point selection.

``Store.images`` gathers scattered rows from a read-only memory map at the chunks' byte
offsets; the alternative is h5py's fancy indexing on the sorted rows. Both read the same
random batches, interleaved batch by batch; the figures are medians.

    python benchmarks/ingest/bench_reads.py tzk.h5 --batch 256 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from tzkcli.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"memory map": [], "h5py points": []}
    with open_store(args.store) as store:
        store.images(np.arange(64))  # build the map once
        for _ in range(args.repeats):
            rows = np.unique(rng.integers(0, len(store), args.batch))
            for name in times:
                started = time.perf_counter()
                if name == "memory map":
                    mapped = store.images(rows)
                else:
                    points = store._images[rows]
                times[name].append(time.perf_counter() - started)
            assert np.array_equal(mapped, points)
        n = len(store)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load}")
    print(f"store: {n:,} images; {args.repeats} random batches of {args.batch} rows")
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:12s} median {median:8.2f} ms per batch")
    print(f"ratio h5py / memory map: {medians['h5py points'] / medians['memory map']:.1f}")


if __name__ == "__main__":
    main()
