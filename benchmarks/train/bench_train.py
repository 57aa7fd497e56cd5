"""Training throughput: the data pipeline beside the model step, the loop beside the bare step.

Usage::

    python benchmarks/train/bench_train.py --store tzk.h5 [--rounds 5] [--steps 4]
        [--levels 3 --flow-steps 4 --hidden 64 --batch-size 32] [--workers 0]

Three variants are measured in every round, interleaved, on the same model and store:

- ``data``: drawing global batches from the training data order (permutation, one store read,
  label hiding), with nothing else, from the images in RAM (the default below 4 GiB) and, as
  ``file``, from the HDF5 file (what a store too large for RAM gets);
- ``bare``: the bare model step on one batch already in memory: ``objective``, backward,
  optimiser step;
- ``loop``: iterations of the real training loop (``_Trainer.iteration``): the batch stream,
  learning-rate schedule, non-finite checks, gradient clipping, records every ``log_every``
  steps. Periodic validation and checkpoints are excluded (they come every 500 steps by
  default); one checkpoint write is timed separately.

It prints images/s per variant (median over rounds) and the two ratios the project requires:
data / bare >= 10 (the pipeline is not the bottleneck) and loop overhead over bare <= 10 %,
both as medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="model steps per round")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--flow-steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    from tzkcli.training import distributed
    from tzkcli.training.config import resolve
    from tzkcli.training.data import RankBatches, batch_stream
    from tzkcli.training.loop import _Trainer

    config = resolve({}, {
        "levels": args.levels, "flow_steps": args.flow_steps, "hidden": args.hidden,
        "batch_size": args.batch_size, "workers": args.workers, "val_images": 0,
        "val_every": 10**9, "checkpoint_every": 10**9, "steps": 10**9, "device": "cpu",
        "quiet": True,
    }, "benchmark")
    run = Path(tempfile.mkdtemp(prefix="tzk-bench-train-"))
    trainer = _Trainer(args.store, run, config, distributed.setup("cpu"), None)
    trainer.build()
    trainer.fresh()
    trainer.begin(10**9)

    x, codes = trainer.data.train.batch(trainer.order.batch(0))
    generator = torch.Generator().manual_seed(0)

    def bare() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.model.objective(x, codes, beta=config.beta, impute=config.impute,
                                          generator=generator)
        loss.backward()
        trainer.optimizer.step()

    def loop() -> None:
        trainer.iteration([])

    n_data = 20 * args.steps
    from tzkcli.store import StoreDataset

    on_file = StoreDataset(args.store, trainer.data.train.indices, in_memory=False)
    streams = {
        "data": batch_stream(RankBatches(trainer.data.train, trainer.order, trainer.labelled,
                                         0, 1), 0, args.workers),
        "file": batch_stream(RankBatches(on_file, trainer.order, trainer.labelled, 0, 1), 0,
                             args.workers),
    }

    def data() -> None:
        for _ in range(n_data):
            next(streams["data"])

    def file() -> None:
        for _ in range(n_data):
            next(streams["file"])

    bare()
    loop()
    rates: dict[str, list[float]] = {"data": [], "file": [], "bare": [], "loop": []}
    for _ in range(args.rounds):
        for name, body, images in (
            ("data", data, n_data * config.batch_size),
            ("file", file, n_data * config.batch_size),
            ("bare", lambda: [bare() for _ in range(args.steps)], args.steps * config.batch_size),
            ("loop", lambda: [loop() for _ in range(args.steps)], args.steps * config.batch_size),
        ):
            start = time.perf_counter()
            body()
            rates[name].append(images / (time.perf_counter() - start))

    start = time.perf_counter()
    trainer._checkpoint()
    checkpoint_seconds = time.perf_counter() - start

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"model: levels {args.levels}, flow steps {args.flow_steps}, hidden {args.hidden}, "
          f"batch {config.batch_size}, {torch.get_num_threads()} threads; store {args.store}")
    print(f"rounds {args.rounds}, {args.steps} model steps and {n_data} data batches per round")
    labels = {"data": "data (store in RAM)", "file": "data (HDF5 reads)", "bare": "bare step",
              "loop": "training loop"}
    for name in ("data", "file", "bare", "loop"):
        spread = ", ".join(f"{v:.1f}" for v in rates[name])
        print(f"{labels[name]:>20}: median {median[name]:10.1f} images/s   (rounds: {spread})")
    for name in ("data", "file"):
        ratio = statistics.median(d / b for d, b in zip(rates[name], rates["bare"]))
        print(f"{labels[name]} / bare step: median per-round ratio {ratio:.0f}x "
              "(required >= 10x)")
    overheads = [b / loop - 1 for b, loop in zip(rates["bare"], rates["loop"])]
    spread = ", ".join(f"{100 * o:+.1f}" for o in overheads)
    middle = 100 * statistics.median(overheads)
    print(f"loop overhead over bare step: median per-round {middle:+.1f} % (rounds: {spread}) "
          "(required <= 10 %)")
    step_seconds = config.batch_size / median["loop"]
    print(f"one checkpoint write: {checkpoint_seconds:.3f} s = "
          f"{checkpoint_seconds / step_seconds:.2f} loop steps")


if __name__ == "__main__":
    main()
