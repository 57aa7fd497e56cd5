"""Evaluation, extension and sampling speed: what more knowledge costs.

Usage::

    python benchmarks/eval/bench_eval.py [--rounds 5] [--train 2000] [--test 500]
        [--levels 3 --flow-steps 4 --hidden 64] [--batch-size 256] [--threads 2]

It builds a store of the first ``--train`` and ``--test`` real MNIST images (labelled) in a
temporary folder, and one flow (actnorm initialised, otherwise untrained: speed does not
depend on training) shared by every model below. In each round, interleaved (the order of the
variants rotates from round to round):

- ``eval K``: ``tzkcli.evaluation.evaluate`` on the test split (no OOD, no samples) of models
  with K = 1, 10, 100 conditions (``dataset=mnist``, labels, then filler conditions of a kind
  the store lacks: every one is scored). Target: K = 100 within 1.3x of K = 1, since one flow
  pass scores every condition.
- ``extend N``: ``tzkcli.extension.extend_run`` of a run whose model knows only
  ``dataset=mnist``, adding 1, 5 or 10 labels (N images: their training images), into a new
  run directory; the time is the whole command's work (load, flow pass, fit, checkpoint).
- ``sample``: images/s of ``TzK.sample`` of 64 images from ``p_0``, one condition, and the
  composition of two.

It prints medians over rounds and ratios, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train", type=int, default=2000, help="MNIST training images")
    parser.add_argument("--test", type=int, default=500, help="MNIST test images")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--flow-steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="images per sampling call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("TZK_DATA_ROOT",
                                                    REPO.parent / "shared" / "data")))
    return parser.parse_args()


def _store(folder: Path, args: argparse.Namespace) -> Path:
    from tests.store.fixtures import write_small_sources
    from tzkcli.store import ingest, load_manifest

    sources = folder / "sources"
    manifests = write_small_sources(args.data_root, sources, n_train=args.train,
                                    n_test=args.test, n_members=2, atlas_rows=1)
    store = folder / "mnist.h5"
    ingest([load_manifest(manifests[0])], store, sources)
    return store


def _models(store: Path, args: argparse.Namespace) -> dict[int, object]:
    """Models with 1, 10 and 100 conditions around one shared, initialised flow."""
    from tzkcli.flows import GlowConfig
    from tzkcli.knowledge import Registry
    from tzkcli.model import ModelConfig, TzK
    from tzkcli.store import open_store

    with open_store(store) as opened:
        first = torch.from_numpy(opened.images(opened.indices(split="train")[:256]))
    flow = GlowConfig(shape=(1, 32, 32), levels=args.levels, steps=args.flow_steps,
                      hidden=args.hidden)
    models: dict[int, object] = {}
    shared = None
    for k in (1, 10, 100):
        registry = Registry()
        registry.add_condition("dataset", "mnist")
        registry.add_kind("label")
        for digit in range(min(10, k - 1)):
            registry.add_condition("label", f"mnist/{digit}")
        registry.add_kind("cluster")
        for extra in range(k - len(registry)):
            registry.add_condition("cluster", f"c{extra}")
        torch.manual_seed(0)
        model = TzK(ModelConfig(flow=flow), registry)
        if shared is None:
            model.initialize(first, torch.Generator().manual_seed(0))
            shared = model.flow.state_dict()
        model.flow.load_state_dict(shared)
        with torch.no_grad():
            for prior in model.priors.conditions:
                prior.loc.normal_(0, 0.1)
                prior.log_scale.normal_(0, 0.1)
        models[k] = model.eval()
    return models


def _run_of(model: object, store: Path, folder: Path) -> Path:
    """A run directory holding ``model`` as its latest checkpoint (the training's writers)."""
    from tzkcli.training import checkpoint as ckpt

    run = folder / "run"
    ckpt.write_checkpoint(run / "checkpoints", 0, model.save, {"step": 0})
    ckpt.write_run_record(run, {"status": "finished", "step": 0, "store": str(store),
                                "latest": "step-00000000", "best": None})
    return run


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    from tzkcli.evaluation import EvalOptions, evaluate
    from tzkcli.extension import ExtendOptions, extend_run
    from tzkcli.knowledge import Registry
    from tzkcli.model import ModelConfig, TzK
    from tzkcli.store import open_store

    folder = Path(tempfile.mkdtemp(prefix="tzk-bench-eval-"))
    try:
        store = _store(folder, args)
        models = _models(store, args)
        base = TzK(ModelConfig(flow=models[1].config.flow), _dataset_only())
        base.load_state_dict(models[1].state_dict())
        run = _run_of(base, store, folder)
        with open_store(store) as opened:
            import numpy as np

            train = opened.indices(split="train")
            labels = np.asarray(opened.codes("label"))[train]
        extensions = {1: ["label=mnist/0"], 5: [f"label=mnist/{d}" for d in range(5)],
                      10: ["label"]}
        images = {n: int(np.isin(labels, list(range(n))).sum()) for n in extensions}

        times: dict[str, list[float]] = {}
        options = EvalOptions(split="test", samples=0, batch_size=args.batch_size)
        sources = {"p_0": None, "one condition": "label=mnist/3",
                   "composition of two": ["label=mnist/3", "cluster=c0"]}
        for round_ in range(args.rounds):
            # rotate the order of the variants every round: no variant always runs first
            for k in _rotated(list(models), round_):
                times.setdefault(f"eval {k}", []).append(
                    _timed(lambda: evaluate(models[k], store, options)))
            for name, seconds in _parts(models, store, args.batch_size).items():
                times.setdefault(name, []).append(seconds)
            for n in _rotated(list(extensions), round_):
                out = folder / f"out-{round_}-{n}"
                times.setdefault(f"extend {n}", []).append(_timed(lambda: extend_run(
                    run, ExtendOptions(extensions[n], out=out, batch_size=args.batch_size))))
                shutil.rmtree(out)
            for name in _rotated(list(sources), round_):
                generator = torch.Generator().manual_seed(round_)
                times.setdefault(f"sample {name}", []).append(_timed(
                    lambda: models[100].sample(args.samples, sources[name], 1.0, generator)))
        _print(times, args, images)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parts(models: dict[int, object], store: Path, batch: int) -> dict[str, float]:
    """One batch: the flow pass, and the prior term of 1 and of 100 conditions."""
    from tzkcli.store import open_store

    with open_store(store) as opened:
        x = torch.from_numpy(opened.images(opened.indices(split="test")[:batch]))
    model = models[100]
    out = {}
    with torch.no_grad():
        start = time.perf_counter()
        r, _ = model.residuals(x, torch.Generator().manual_seed(0))
        out["part flow"] = time.perf_counter() - start
        stats = model.priors.stats(r)
        for k in (1, 100):
            start = time.perf_counter()
            model.priors.log_prob(stats, list(range(k)))
            out[f"part prior {k}"] = time.perf_counter() - start
    return out


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _dataset_only() -> object:
    from tzkcli.knowledge import Registry

    registry = Registry()
    registry.add_condition("dataset", "mnist")
    return registry


def _print(times: dict[str, list[float]], args: argparse.Namespace,
           images: dict[int, int]) -> None:
    median = {name: statistics.median(values) for name, values in times.items()}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Glow L={args.levels} K={args.flow_steps} hidden={args.hidden}, 1x32x32 MNIST, "
          f"batch {args.batch_size}, float32 CPU; {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} torch threads, torch {torch.__version__}; load average {load}")
    print(f"medians of {args.rounds} interleaved rounds")
    print(f"eval of {args.test} test images (one flow pass; every condition scored)")
    for k in (1, 10, 100):
        print(f"  {k:>3} conditions  {median[f'eval {k}']:7.2f} s  "
              f"{median[f'eval {k}'] / median['eval 1']:5.2f}x of 1 condition")
    flow = median["part flow"]
    print(f"one batch of {args.batch_size}: flow pass {1000 * flow:.0f} ms; prior term of 1 "
          f"condition {1000 * median['part prior 1']:.1f} ms, of 100 conditions "
          f"{1000 * median['part prior 100']:.1f} ms ({median['part prior 100'] / flow:.3%} of "
          "the flow pass)")
    print("extend (load, flow pass over the new images, fit, checkpoint) into a new run")
    for n in (1, 5, 10):
        seconds = median[f"extend {n}"]
        print(f"  {n:>2} labels, {images[n]:>5} images  {seconds:7.2f} s  "
              f"{images[n] / seconds:7.0f} images/s")
    print(f"sampling {args.samples} images")
    for name in ("p_0", "one condition", "composition of two"):
        seconds = median[f"sample {name}"]
        print(f"  {name:<20} {args.samples / seconds:7.0f} images/s")


if __name__ == "__main__":
    main()
