"""Test bpd of a trained run under ``p_0`` and under each dataset's own prior.

Usage::

    python benchmarks/train/test_bpd.py RUN [--checkpoint latest|best|step-N] [--per-dataset N]
        [--split test] [--batch-size 256]

Scores the test split of the run's store (every image, or the first ``N`` of each dataset in
store order) with the chosen checkpoint's model, one flow pass per batch, dequantisation noise
from a generator seeded 0, and prints a Markdown table: images, bpd under ``p_0``, bpd under
``dataset=NAME`` and the knowledge gain (their difference), with the parts of the ``p_0`` bpd.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--per-dataset", type=int, default=0, help="0: every test image")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    from tzkcli.model import TzK
    from tzkcli.store import StoreDataset, open_store

    record = json.loads((args.run / "run.json").read_text())
    name = record[args.checkpoint] if args.checkpoint in ("best", "latest") else args.checkpoint
    model = TzK.load(args.run / "checkpoints" / name / "model").eval()
    store_path = Path(record["store"])
    generator = torch.Generator().manual_seed(0)

    print(f"run {args.run}, checkpoint {name}, store {store_path}, split {args.split}, "
          f"n_bits {model.config.n_bits}, uniform dequantisation, D = {model.dims}")
    print()
    print("| dataset | images | bpd under p_0 | (prior + ladj + dequantisation) "
          "| bpd under own dataset prior | knowledge gain |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    start = time.perf_counter()
    with open_store(store_path) as store:
        datasets = store.values("dataset")
        rows_of = {d: store.indices(split=args.split, dataset=d) for d in datasets}
    totals = np.zeros(2)
    count = 0
    for dataset in datasets:
        rows = rows_of[dataset][: args.per_dataset or None]
        data = StoreDataset(store_path, rows)
        condition = model.registry.index(f"dataset={dataset}")
        base, own, prior, ladj = [], [], [], []
        with torch.no_grad():
            for first in range(0, len(data), args.batch_size):
                x, _ = data.batch(np.arange(first, min(first + args.batch_size, len(data))))
                scores = model.score(x, conditions=[condition], generator=generator)
                base.append(scores.bpd_base)
                own.append(scores.bpd[:, 0])
                prior.append(scores.parts.prior_base)
                ladj.append(scores.parts.ladj)
        b, o = torch.cat(base).mean().item(), torch.cat(own).mean().item()
        p, a = torch.cat(prior).mean().item(), torch.cat(ladj).mean().item()
        print(f"| {dataset} | {len(data)} | {b:.4f} | {p:.4f} + {a:.4f} + "
              f"{model.config.n_bits} | {o:.4f} | {b - o:+.4f} |")
        totals += [b * len(data), o * len(data)]
        count += len(data)
    print(f"| all | {count} | {totals[0] / count:.4f} | | {totals[1] / count:.4f} | "
          f"{(totals[0] - totals[1]) / count:+.4f} |")
    print()
    print(f"scored in {time.perf_counter() - start:.0f} s with {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
