"""Run the flow benchmark: ``python -m benchmarks.flow [--sections throughput,quality] ...``.

``throughput``: training throughput of tzk's Glow (channels_last and NCHW) and normflows
1.7.3's Glow, interleaved step by step in one run. ``quality``: per seed, both trained for
``--train-steps`` steps on the same batches, then test bpd, non-finite samples at temperatures
0.7 and 1.0, the time to score a batch under 1, 10 and 100 conditions, and sampling speed.
The throughput table's page faults are a step's median minor page faults: glibc hands large
freed blocks back to the system and each new one faults in page by page, which costs some
subjects far more than others (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in
the environment change it). ``--processes N`` runs the throughput section in N fresh processes, one after the other, and
prints each process's ratios and their medians: a subject's speed differs from one process to
the next (memory layout) by more than within one. ``pip install -e ".[bench]"`` installs
normflows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.flow import quality
from benchmarks.flow.data import dequantise, mnist
from benchmarks.flow.subjects import NormflowsSubject, TzkSubject
from benchmarks.flow.throughput import training_throughput


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow", description=__doc__)
    parser.add_argument("--sections", default="throughput,quality")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per subject")
    parser.add_argument("--steps", type=int, default=1, help="training steps per round")
    parser.add_argument("--subjects", default="channels_last,no-fast-path,nchw,bf16,normflows",
                        help="throughput subjects, interleaved (normflows is the reference)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--depth", type=int, default=8, help="flow steps per level")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--betas", default="0,0.01",
                        help="tzk models to train, by the objective's beta")
    parser.add_argument("--test", type=int, default=2000, help="MNIST test images scored")
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1,
                        help="throughput: fresh processes, one after another; their medians")
    parser.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1:
        parser.error(f"--processes {args.processes}: expected an integer >= 1")
    return args


def _machine(threads: int) -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch threads, "
            f"torch {torch.__version__}, load average {load}")


def throughput(args: argparse.Namespace) -> None:
    images, labels = mnist("train")
    arch = (args.levels, args.depth, args.hidden)
    build = {
        "channels_last": lambda: TzkSubject(*arch, channels_last=True),
        "no-fast-path": lambda: TzkSubject(*arch, channels_last=True, fast_path=False),
        "nchw": lambda: TzkSubject(*arch, channels_last=False),
        "bf16": lambda: TzkSubject(*arch, channels_last=True, bf16_networks=True),
        "normflows": lambda: NormflowsSubject(*arch),
    }
    names = args.subjects.split(",")
    unknown = sorted(set(names) - set(build))
    if unknown or "normflows" not in names:
        raise SystemExit(f"--subjects {args.subjects!r}: expected names from {sorted(build)}, "
                         "normflows among them")
    subjects = [build[name]() for name in names]
    first = dequantise(images[:256], torch.Generator().manual_seed(args.seed))
    for subject in subjects:
        subject.initialize(first, labels[:256])

    print(f"## Training throughput: Glow L={args.levels} K={args.depth} hidden={args.hidden} "
          f"affine, 1x32x32 MNIST, batch {args.batch}, float32, Adam", flush=True)
    print(f"before: {_machine(args.threads)}", flush=True)
    results = training_throughput(subjects, images, labels, args.batch, args.rounds,
                                  args.steps, args.seed)
    print(f"after: {_machine(args.threads)}; medians of {results[0].steps} steps each")
    reference = next(r for r in results if r.name == "normflows")
    print("| subject | forward ms | backward ms | Adam ms | images/s | vs normflows | "
          "page faults |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        rate = result.images_per_second(args.batch)
        ratio = rate / reference.images_per_second(args.batch)
        print(f"| {result.name} | {result.forward_ms:.1f} | {result.backward_ms:.1f} | "
              f"{result.adam_ms:.1f} | {rate:.0f} | {ratio:.2f}x | {result.page_faults:.0f} |",
              flush=True)
    if args.json_out is not None:
        rates = {r.name: r.images_per_second(args.batch) for r in results}
        args.json_out.write_text(json.dumps(rates))


def throughput_processes(args: argparse.Namespace) -> None:
    """The throughput section in ``args.processes`` fresh processes, run one at a time (in
    parallel they would slow each other), then per subject the median and range over them."""
    options = ["--rounds", args.rounds, "--steps", args.steps, "--subjects", args.subjects,
               "--batch", args.batch, "--levels", args.levels, "--depth", args.depth,
               "--hidden", args.hidden, "--threads", args.threads, "--seed", args.seed]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.processes):
            out = Path(folder) / f"{index}.json"
            command = [sys.executable, "-m", "benchmarks.flow", "--sections", "throughput",
                       *map(str, options), "--json-out", str(out)]
            print(f"\n### Process {index + 1} of {args.processes}", flush=True)
            subprocess.run(command, check=True)
            runs.append(json.loads(out.read_text()))

    print(f"\n## Over {args.processes} processes: images/s and ratio to normflows")
    print("| subject | median images/s | median ratio | ratios, in run order |")
    print("| --- | --- | --- | --- |")
    for name in runs[0]:
        ratios = [run[name] / run["normflows"] for run in runs]
        rates = statistics.median(run[name] for run in runs)
        listed = ", ".join(f"{r:.2f}x" for r in ratios)
        print(f"| {name} | {rates:.0f} | {statistics.median(ratios):.2f}x | {listed} |",
              flush=True)


def quality_section(args: argparse.Namespace) -> None:
    images, labels = mnist("train")
    test_images, test_labels = mnist("test")
    test_images, test_labels = test_images[: args.test], test_labels[: args.test]
    arch = (args.levels, args.depth, args.hidden)
    betas = tuple(float(b) for b in args.betas.split(","))

    print(f"\n## After {args.train_steps} steps (batch {args.batch}, Adam 1e-3), "
          f"bpd on {len(test_images)} MNIST test images, non-finite of {args.samples} samples",
          flush=True)
    print(f"before: {_machine(args.threads)}")
    print("| seed | model | p_0 bpd | digit bpd | non-finite T=0.7 | non-finite T=1.0 | "
          "train s | training loss, mean per 50 steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    first = None
    for seed in (int(s) for s in args.seeds.split(",")):
        trained = quality.train_seed(seed, images, labels, arch, args.train_steps, args.batch,
                                     betas)
        first = first or trained
        scores = quality.test_bpd(trained, test_images, test_labels)
        cold = quality.non_finite_samples(trained, 0.7, args.samples)
        warm = quality.non_finite_samples(trained, 1.0, args.samples)
        for name in (*trained.tzk, "normflows"):
            base = quality.bits(scores[f"{name} p_0"]) if name in trained.tzk else "-"
            print(f"| {seed} | {name} | {base} | {quality.bits(scores[f'{name} digit'])} | "
                  f"{cold[name]} | {warm[name]} | {trained.seconds[name]:.0f} | "
                  f"{quality.curve(trained.losses[name])} |", flush=True)

    seconds = quality.score_seconds(first.default, test_images[: args.batch], rounds=7)
    print(f"\nscore a batch of {args.batch}: " + ", ".join(
        f"{k} conditions {1e3 * s:.0f} ms" for k, s in seconds.items())
        + f"; 100 / 1 = {seconds[100] / seconds[1]:.2f}", flush=True)
    rates = quality.sampling_rates(first, rounds=5, batch=args.batch)
    print(f"sampling at T=1, batch {args.batch}: tzk {rates['tzk']:.0f} images/s, "
          f"normflows {rates['normflows']:.0f} images/s; {_machine(args.threads)}", flush=True)


def main() -> None:
    args = _arguments()
    # normflows calls the deprecated torch.lu; its warning says nothing about the benchmark.
    warnings.filterwarnings("ignore", message="torch.lu is deprecated")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sections = args.sections.split(",")
    if "throughput" in sections:
        if args.processes > 1:
            throughput_processes(args)
        else:
            throughput(args)
    if "quality" in sections:
        quality_section(args)


if __name__ == "__main__":
    main()
