"""Assemble the report of a run from what the run directory and its stores hold.

Sections, each from the artifact that another stage wrote (nothing is recomputed here):

- *data*: per store the run used, images per dataset, split and kind, and real images;
- *training*: bpd against step and training time, under ``p_0`` and each dataset's prior
  (``metrics.jsonl``);
- *results*: the bpd and knowledge-gain table, classification, out-of-distribution scores
  (the eval results in the run directory; the last validation when eval has not run);
- *classification*: confusion matrices per kind (the eval results);
- *samples*: the sample grids indexed in ``RUN/samples/`` (drawn through ``tzk sample``'s
  library when the run has none yet and ``samples`` is true);
- *configuration*: the resolved training configuration and the run record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tzkcli import __version__, fsio
from tzkcli.report import figures, page
from tzkcli.report.data import StoreSummary, summarise_store
from tzkcli.report.history import History, Series, read_history
from tzkcli.report.results import confusion_parts, eval_parts, read_eval_results
from tzkcli.report.samples import SAMPLES_DIR, read_sample_index, write_sample_grids

REPORT_NAME = "report.html"


@dataclass
class ReportResult:
    """What :func:`write_report` wrote: the page, its size, its sections and images."""

    path: Path
    bytes: int
    sections: list[str]
    images: int
    notes: list[str]


def write_report(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 samples: bool = True, device: str = "auto") -> ReportResult:
    """Write the report of ``run`` to ``out`` (default ``RUN/report.html``) all or nothing.

    With ``samples`` and no grids in ``RUN/samples/`` yet, they are drawn first (on
    ``device``) from the latest checkpoint.

    Raises:
        BadInputError: ``run`` is not a tzk run (no ``run.json`` or ``metrics.jsonl``).
        RunFailedError: the page could not be written; any previous page is intact.
    """
    run = Path(run)
    target = Path(out) if out is not None else run / REPORT_NAME
    _run_record(run)
    if samples and read_sample_index(run) is None:
        write_sample_grids(run, device=device)
    text, sections, notes = build_report(run)
    fsio.atomic_write_text(target, text)
    return ReportResult(target, len(text.encode("utf-8")), [s.title for s in sections],
                        text.count("<img "), notes)


def build_report(run: Path) -> tuple[str, list[page.Section], list[str]]:
    """The page of ``run``, its sections, and notes on what it could not show (and why)."""
    record = _run_record(run)
    history = read_history(run)
    evaluations = read_eval_results(run)
    notes: list[str] = []
    stores = _stores(run, record, history, evaluations, notes)

    sections = [
        _data_section(stores, notes),
        _training_section(history),
        _results_section(history, evaluations),
        _classification_section(evaluations, notes),
        _samples_section(run, notes),
        _configuration_section(history, record),
    ]
    name = run.resolve().name
    lead = (f"Run {run.resolve()} · status {record.get('status', '?')} at step "
            f"{record.get('step', '?')} · written by tzk {__version__} on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return page.render(f"tzk report: {name}", lead, sections), sections, notes


def _run_record(run: Path) -> dict[str, Any]:
    """``RUN/run.json``, read as ``tzk eval`` and ``tzk sample`` read it."""
    from tzkcli.evaluation.runs import read_run_record

    return read_run_record(run)


def _stores(run: Path, record: dict[str, Any], history: History,
            evaluations: list[tuple[Path, dict[str, Any]]],
            notes: list[str]) -> list[StoreSummary]:
    """Summaries of the stores the run names (trained on, extended from, evaluated on) that
    are still where it says."""
    named = [record.get("store"), history.store.get("path")]
    named.extend(_extension_stores(run))
    named.extend(result.get("store") for _, result in evaluations)
    paths: list[str] = []
    for value in named:
        if isinstance(value, str) and value not in paths:
            paths.append(value)
    summaries = []
    for value in paths:
        path = Path(value)
        if not path.is_file():
            notes.append(f"store {path} named by the run is not there any more")
            continue
        summary = summarise_store(path)
        if all(s.digest != summary.digest for s in summaries):
            summaries.append(summary)
    return summaries


def _extension_stores(run: Path) -> list[str]:
    """The stores that ``tzk extend`` fitted this run's new conditions on."""
    found = []
    for path in sorted((run / "checkpoints").glob("*/extension.json")):
        try:
            store = json.loads(path.read_text(encoding="utf-8")).get("store")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(store, str):
            found.append(store)
    return found


# data --------------------------------------------------------------------------------------

def _data_section(stores: list[StoreSummary], notes: list[str]) -> page.Section:
    section = page.Section("data", "Data")
    if not stores:
        section.add(page.paragraph("The run's store could not be found: "
                                   + "; ".join(notes)))
    for summary in stores:
        shape = "×".join(str(s) for s in summary.shape)
        section.heading(f"Store {summary.path.name}")
        section.add(page.paragraph(f"{summary.path} · {int(summary.counts.sum()):,} images of "
                                   f"{shape} · digest {summary.digest[:16]}…"))
        section.add(page.image(figures.counts_chart(summary.datasets, summary.splits,
                                                    summary.counts),
                               "images per dataset and split", plot=True))
        section.add(_counts_table(summary))
        section.heading("Real images from each dataset")
        for name in summary.datasets:
            examples = summary.examples[name]
            section.add(page.image(figures.image_grid(examples, columns=8), f"images of {name}",
                                   f"{name}: {len(examples)} images chosen at random"))
    return section


def _counts_table(summary: StoreSummary) -> str:
    headers = ["dataset", *summary.splits, "total"]
    for kind in summary.kinds:
        headers.append(f"{kind}: values")
        headers.append(f"{kind}: known")
    rows = []
    for i, name in enumerate(summary.datasets):
        row: list[Any] = [name, *map(int, summary.counts[i]), int(summary.counts[i].sum())]
        for kind in summary.kinds:
            values = int(summary.n_values[kind][i])
            known = int(summary.known[kind][i].sum())
            row.extend([values, known] if values else ["n/a", "n/a"])
        rows.append(row)
    return page.table(headers, rows)


# training ----------------------------------------------------------------------------------

def _training_section(history: History) -> page.Section:
    section = page.Section("training", "Training")
    minutes = history.train_seconds / 60
    end = history.end or {}
    device = history.device or "?"
    section.add(page.paragraph(
        f"{len(history.train.steps)} training records up to step "
        f"{history.train.steps[-1] if history.train.steps else 0}, {minutes:.1f} minutes of "
        f"optimiser steps on {device}; stopped by {end.get('reason', 'nothing yet')}. "
        "Time counts optimiser steps only (from the logged throughput), not validation or "
        "checkpoints."))

    curves = [_curve("training batches, p_0", history.train, "#999999", width=1.0, alpha=0.7)]
    if history.val.steps:
        curves.append(_curve("validation, all datasets, p_0", history.val, "#000000", width=2.0))
    for i, name in enumerate(sorted(history.val_base)):
        colour = figures.PALETTE[i % len(figures.PALETTE)]
        curves.append(_curve(f"{name}, p_0", history.val_base[name], colour))
        curves.append(_curve(f"{name}, own prior (dataset={name})", history.val_own[name],
                             colour, style="--"))
    section.add(page.image(figures.training_curves(curves, "bits per dimension during training"),
                           "training curves", "Validation bpd of each dataset under the joint "
                           "prior p_0 (solid) and under its own dataset prior (dashed); the grey "
                           "line is the training batches' bpd under p_0.", plot=True))
    return section


def _curve(label: str, series: Series, colour: str, style: str = "-", width: float = 1.5,
           alpha: float = 1.0) -> figures.Curve:
    steps, seconds, bpd = series.arrays()
    return figures.Curve(label, steps, seconds, bpd, colour, style, width, alpha)


# results -----------------------------------------------------------------------------------

def _results_section(history: History,
                     evaluations: list[tuple[Path, dict[str, Any]]]) -> page.Section:
    section = page.Section("results", "bpd and knowledge gain")
    section.add(page.paragraph(
        f"bpd at n_bits = {history.config.get('n_bits')} with uniform dequantisation; knowledge "
        "gain = bpd under p_0 − bpd under the condition's own prior (positive: the knowledge "
        "gives a tighter model of its images)."))
    for path, result in evaluations:
        section.add(*eval_parts(path, result))
    if not evaluations:
        section.add(_validation_table(history))
    return section


def _validation_table(history: History) -> str:
    last = history.last_val
    if last is None:
        return page.paragraph("No tzk eval results and no validation record yet.")
    rows = []
    for name, parts in last.get("datasets", {}).items():
        base, own = parts.get("bpd_base"), parts.get("bpd_dataset")
        gain = base - own if base is not None and own is not None else None
        rows.append([f"dataset={name}", parts.get("images"), base, own,
                     page.cell(gain, tone=None if gain is None else
                               ("good" if gain > 0 else "bad"))])
    note = page.paragraph(f"No tzk eval results yet: the last validation (step {last['step']}) "
                          "of training on its validation subset.")
    return note + page.table(["condition", "images", "bpd p_0", "bpd own prior",
                              "knowledge gain"], rows)


def _classification_section(evaluations: list[tuple[Path, dict[str, Any]]],
                            notes: list[str]) -> page.Section:
    section = page.Section("classification", "Confusion matrices")
    for path, result in evaluations:
        section.add(*confusion_parts(path, result))
    if not section.parts:
        notes.append("no confusion matrix: run tzk eval on the run first")
        section.add(page.paragraph("No tzk eval results with a kind of 2 to 60 values yet."))
    return section


def _samples_section(run: Path, notes: list[str]) -> page.Section:
    section = page.Section("samples", "Samples")
    index = read_sample_index(run)
    if index is None:
        notes.append("no sample grids: the run has no samples/index.json")
        return section.add(page.paragraph("No sample grids yet (tzk report draws them unless "
                                          "--no-samples)."))
    section.add(page.paragraph(
        f"From checkpoint {index.get('checkpoint')}, seed {index.get('seed')}: at each "
        "temperature (the scale of every prior standard deviation), the joint p_0, one row per "
        "dataset, and one row per value of every other kind."))
    folder = run / SAMPLES_DIR
    for temperature in sorted({g["temperature"] for g in index["grids"]}):
        section.heading(f"Temperature {temperature:g}")
        for grid in (g for g in index["grids"] if g["temperature"] == temperature):
            png = (folder / grid["file"]).read_bytes()
            section.add(page.image(png, f"samples: {grid['title']} at {temperature:g}",
                                   f"{grid['title']}, temperature {temperature:g}",
                                   width=min(2 * page.png_width(png), 1100)))
    return section


# configuration -----------------------------------------------------------------------------

def _configuration_section(history: History, record: dict[str, Any]) -> page.Section:
    section = page.Section("configuration", "Configuration")
    config = dict(history.config)
    prior = config.pop("prior", {}) or {}
    config["prior"] = ", ".join(f"{k}={v}" for k, v in sorted(prior.items())) or "gaussian"
    section.heading("Training configuration (resolved)")
    section.add(page.table(["field", "value"], [[k, _text(v)] for k, v in config.items()]))
    section.heading("Run record (run.json)")
    section.add(page.table(["field", "value"], [[k, _text(v)] for k, v in record.items()]))
    return section


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)
