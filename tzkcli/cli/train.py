"""``tzk train``: train a TzK model on a store, or resume a run."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from tzkcli.cli.common import guarded, stderr, stdout
from tzkcli.errors import UsageError

PANEL_BUDGET = "Budget"
PANEL_MODEL = "Model"
PANEL_OPT = "Optimisation"
PANEL_DATA = "Data"
PANEL_RUN = "Run and reporting"


def _opt(help_text: str, panel: str, *names: str) -> Any:
    help_text = help_text.replace("[default:", "\\[default:")
    return typer.Option(None, *names, help=help_text, rich_help_panel=panel, show_default=False)


def train(
    store: Optional[Path] = typer.Option(
        None, "--store", help="The store to train on (made by tzk ingest).", show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", help="New run directory to create.", show_default=False),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue this run from its latest checkpoint.",
        show_default=False),
    config_file: Optional[Path] = typer.Option(
        None, "--config", help="TOML file of training fields (flags override it).",
        show_default=False),
    steps: Optional[int] = _opt("Total optimiser steps [default: 1000].", PANEL_BUDGET),
    epochs: Optional[float] = _opt("Passes over the training split.", PANEL_BUDGET),
    time_budget: Optional[float] = _opt("Wall-clock minutes for this invocation.",
                                        PANEL_BUDGET),
    levels: Optional[int] = _opt("Glow levels L [default: 3].", PANEL_MODEL),
    flow_steps: Optional[int] = _opt("Flow steps K per level [default: 8].", PANEL_MODEL),
    hidden: Optional[int] = _opt("Hidden channels of coupling networks [default: 128].",
                                 PANEL_MODEL),
    coupling: Optional[str] = _opt("affine or additive [default: affine].", PANEL_MODEL),
    scale_floor: Optional[float] = _opt("Floor f of the affine coupling's scale, in [0, 1): "
                                        "each coupling contracts by at most 1/f "
                                        "[default: 0.05].", PANEL_MODEL),
    n_bits: Optional[int] = _opt("Bits kept per pixel, 1-8 [default: 8].", PANEL_MODEL),
    prior: Optional[list[str]] = typer.Option(
        None, "--prior", help="Prior form of a kind, KIND=gaussian or KIND=bottleneck:Q; "
        "repeatable \\[default: gaussian].", rich_help_panel=PANEL_MODEL, show_default=False),
    beta: Optional[float] = _opt("Weight of the classification term [default: 0.01].",
                                 PANEL_OPT),
    impute: Optional[str] = _opt("Unknown knowledge: posterior, prior or none "
                                 "[default: posterior].", PANEL_OPT),
    optimizer: Optional[str] = _opt("adam or adamax [default: adam].", PANEL_OPT),
    lr: Optional[float] = _opt("Learning rate [default: 0.001].", PANEL_OPT),
    warmup: Optional[int] = _opt("Linear learning-rate warmup steps [default: 200].",
                                 PANEL_OPT),
    grad_clip: Optional[float] = _opt("Gradient-norm clip, 0 for none [default: 50].",
                                      PANEL_OPT),
    batch_size: Optional[int] = _opt("Global batch size [default: 64].", PANEL_OPT),
    weight_decay: Optional[float] = _opt("Weight decay [default: 0].", PANEL_OPT),
    max_bad_steps: Optional[int] = _opt("Non-finite steps in a row before restoring the last "
                                        "good state [default: 3].", PANEL_OPT),
    bad_lr_factor: Optional[float] = _opt("Learning-rate factor on each restore "
                                          "[default: 0.1].", PANEL_OPT),
    max_recoveries: Optional[int] = _opt("Restores before the run fails with exit code 5 "
                                         "[default: 1].", PANEL_OPT),
    kinds: Optional[str] = _opt("Kinds to learn besides dataset, comma-separated; the others "
                                "can be added later by tzk extend [default: every kind].",
                                PANEL_DATA),
    balance: Optional[str] = _opt("none, or dataset for equal draws per dataset "
                                  "[default: none].", PANEL_DATA),
    label_fraction: Optional[float] = _opt("Fraction of images per dataset that keep their "
                                           "labels [default: 1].", PANEL_DATA),
    seed: Optional[int] = _opt("Seed of initialisation, data order and label hiding "
                               "[default: 0].", PANEL_DATA),
    train_split: Optional[str] = _opt("Split to train on [default: train].", PANEL_DATA),
    val_split: Optional[str] = _opt("Split to validate on [default: test].", PANEL_DATA),
    val_images: Optional[int] = _opt("Validation images, split evenly over datasets, 0 for "
                                     "none [default: 2000].", PANEL_DATA),
    workers: Optional[int] = _opt("Data-loading worker processes [default: 0].", PANEL_DATA),
    device: Optional[str] = _opt("auto, cpu, cuda or cuda:N [default: auto].", PANEL_RUN),
    precision: Optional[str] = _opt("float32, or bf16 for the coupling networks only "
                                    "[default: float32].", PANEL_RUN),
    log_every: Optional[int] = _opt("Steps between metrics records [default: 10].", PANEL_RUN),
    val_every: Optional[int] = _opt("Steps between validations [default: 500].", PANEL_RUN),
    checkpoint_every: Optional[int] = _opt("Steps between checkpoints [default: 500].",
                                           PANEL_RUN),
    keep_last: Optional[int] = _opt("Checkpoints kept besides the best [default: 3].",
                                    PANEL_RUN),
    quiet: bool = typer.Option(False, "--quiet", rich_help_panel=PANEL_RUN,
                               help="No progress on stderr (errors only); the result line "
                               "still goes to stdout."),
) -> None:
    """Train a TzK model by maximum likelihood, or resume a run.

    New run: tzk train --store STORE --out RUN \\[--config FILE] \\[flags]

    Resume: tzk train --resume RUN \\[--steps N] (budget, reporting and device flags only)

    Under torchrun each process trains on its share of every global batch (DDP); rank 0 writes.

    Exit codes: 3 bad input, 4 run in use, 5 diverged. See docs/training.md.
    """
    flags: dict[str, Any] = {
        "steps": steps, "epochs": epochs, "time_budget": time_budget, "levels": levels,
        "flow_steps": flow_steps, "hidden": hidden, "coupling": coupling,
        "scale_floor": scale_floor, "n_bits": n_bits,
        "beta": beta, "impute": impute, "optimizer": optimizer, "lr": lr, "warmup": warmup,
        "grad_clip": grad_clip, "batch_size": batch_size, "weight_decay": weight_decay,
        "max_bad_steps": max_bad_steps, "bad_lr_factor": bad_lr_factor,
        "max_recoveries": max_recoveries, "kinds": kinds, "balance": balance,
        "label_fraction": label_fraction, "seed": seed, "train_split": train_split,
        "val_split": val_split, "val_images": val_images, "workers": workers,
        "device": device, "precision": precision, "log_every": log_every,
        "val_every": val_every, "checkpoint_every": checkpoint_every, "keep_last": keep_last,
        "quiet": quiet or None,
    }
    _run(store, out, resume, config_file, prior, flags)


@guarded
def _run(
    store: Path | None,
    out: Path | None,
    resume: Path | None,
    config_file: Path | None,
    prior: list[str] | None,
    flags: dict[str, Any],
) -> None:
    from tzkcli.training.config import parse_prior_flags, read_config_file, resolve

    if prior:
        flags["prior"] = parse_prior_flags(prior)
    if resume is not None:
        if out is not None or config_file is not None or prior:
            raise UsageError(f"--resume {resume}: takes no --out, --config or --prior; "
                             "expected only budget, reporting and device flags")
        from tzkcli.training.loop import resume_run

        with _Progress(bool(flags["quiet"])) as progress:
            result = resume_run(resume, flags, store=store, on_record=progress.record)
    else:
        if store is None or out is None:
            missing = "--store" if store is None else "--out"
            raise UsageError(f"{missing}: missing; expected tzk train --store STORE --out RUN "
                             "or tzk train --resume RUN")
        from tzkcli.training.loop import start_run

        file_values = read_config_file(config_file) if config_file is not None else {}
        config = resolve(file_values, flags, str(config_file))
        with _Progress(config.quiet) as progress:
            result = start_run(store, out, config, on_record=progress.record)
    best = "none" if result.best_bpd is None else f"{result.best} ({result.best_bpd:.4f} bpd)"
    stdout.print(f"stopped at step {result.step} ({result.stop_reason}); latest "
                 f"{result.latest}; best {best}", highlight=False)


class _Progress:
    """Rich progress on a terminal, one plain line per record otherwise, nothing if quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live = not quiet and sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.started = time.monotonic()

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                console=stderr, transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def record(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        kind = record.get("type")
        if kind == "start" and self.bar is not None:
            total = record["total_steps"] if record["total_steps"] < 2**61 else None
            self.task = self.bar.add_task("train", total=total, completed=record["step"],
                                          status="")
        if kind == "train":
            status = (f"bpd {_f(record.get('bpd'))}  {_f(record.get('images_per_s'), 1)} img/s")
            if self.bar is not None and self.task is not None:
                self.bar.update(self.task, completed=record["step"], status=status)
            else:
                stderr.print(f"step {record['step']}  loss {_f(record.get('loss'))}  {status}  "
                             f"lr {record['lr']:.3g}", highlight=False)
        elif kind in ("val", "skip", "recover", "checkpoint", "actnorm_init", "resume"):
            stderr.print(_describe(record), highlight=False)

    def __call__(self, record: dict[str, Any]) -> None:
        self.record(record)


def _f(value: Any, digits: int = 4) -> str:
    return "nan" if value is None else f"{value:.{digits}f}"


def _describe(record: dict[str, Any]) -> str:
    kind = record["type"]
    if kind == "val":
        parts = "  ".join(f"{name} {_f(v['bpd_base'])}/{_f(v['bpd_dataset'])}"
                          for name, v in record["datasets"].items())
        return f"val step {record['step']}: bpd p_0 {_f(record['bpd_base'])}  (p_0/own) {parts}"
    if kind == "skip":
        return f"step {record['step']} skipped: {record['reason']}"
    if kind == "recover":
        return (f"restored step {record['step']}, learning rate x {record['lr_scale']:g}")
    if kind == "checkpoint":
        return f"checkpoint {record['name']}"
    if kind == "resume":
        return f"resumed from {record['checkpoint']} at step {record['step']}"
    return f"actnorm initialised on {record['images']} images"


def register(app: typer.Typer) -> None:
    app.command("train")(train)
