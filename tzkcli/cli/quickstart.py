"""``tzk quickstart``: ingest, train, extend, sample, evaluate and report in one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from tzkcli.cli.common import guarded, stderr, stdout

DEFAULT_OUT = Path("tzk-quickstart")
PROGRESS_EVERY_S = 5.0


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)


@guarded
def quickstart_command(
    out: Path = typer.Option(DEFAULT_OUT, "--out", metavar="DIR",
                             help="Folder for the stores, the run and the report."),
    time_budget: float = typer.Option(
        10.0, "--time-budget", metavar="MINUTES",
        help="Minutes for the whole pipeline; training takes about 55% of it."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", metavar="DIR",
        help="Folder of the real datasets \\[default: $TZK_DATA_ROOT, else ../shared/data "
        "beside the checkout, else the sample shipped with tzk].", show_default=False),
    sample: bool = typer.Option(False, "--sample", help="Use the real sample shipped with tzk "
                                "(1.2 MB) even where a data root is found."),
    config_file: Optional[Path] = typer.Option(
        None, "--config", metavar="FILE", help="TOML file of tzk train fields that override "
        "the quickstart's model and optimisation (e.g. levels = 2).", show_default=False),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue DIR: skip finished stages, resume training."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when present), cpu, "
                               "cuda or cuda:N."),
) -> None:
    """Run the main job on the bundled default: MNIST and Omniglot, end to end.

    Stages: ingest (three stores) -> train (a modest Glow on MNIST and the Omniglot atlas,
    knowing the dataset and MNIST's label) -> extend (Omniglot and its alphabets; the flow
    frozen) -> sample (grids at two temperatures) -> eval (bpd, knowledge gain, accuracy,
    OOD) -> report (DIR/run/report.html, named on the last line).

    The default budget of 10 minutes finishes in about 10 minutes on 2 CPU cores; a GPU is
    used when present. An existing, non-empty DIR is refused unless --resume. Progress goes to
    stderr. Exit codes: 2 usage, 3 bad input, 4 busy, 5 training diverged, 130 interrupted
    (continue with --resume). See docs/quickstart.md.
    """
    from tzkcli.quickstart import QuickstartOptions, describe, find_data, quickstart
    from tzkcli.training.config import read_config_file

    train = read_config_file(config_file) if config_file is not None else {}
    options = QuickstartOptions(out=out, time_budget=time_budget, data_root=data_root,
                                resume=resume, sample=sample, device=device, train=train)
    printer = _Printer()
    if not resume:
        stderr.print(describe(find_data(data_root, sample=sample)), highlight=False)
    result = quickstart(options, printer)

    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
    stderr.print(f"done in {result.total_seconds / 60:.1f} minutes ({timings})",
                 highlight=False)
    stdout.print(f"report: {result.report}", highlight=False)


class _Printer:
    """Plain progress lines on stderr: stage headings, what was written, training records
    (as tzk train prints them), and other progress at most every few seconds."""

    def __init__(self) -> None:
        self.last = 0.0
        self.number = 0

    def __call__(self, event: Any) -> None:
        from tzkcli.quickstart import STAGES

        if event.kind == "start":
            self.number = STAGES.index(event.stage) + 1
            stderr.print(f"[{self.number}/{len(STAGES)}] {event.stage}: {event.text}",
                         highlight=False)
        elif event.kind == "skip":
            number = STAGES.index(event.stage) + 1
            stderr.print(f"[{number}/{len(STAGES)}] {event.stage}: skipped ({event.text})",
                         highlight=False)
        elif event.kind == "done":
            stderr.print(f"  {event.stage} done in {event.seconds:.0f} s", highlight=False)
        elif event.kind == "wrote":
            stderr.print(f"  wrote {event.text}", highlight=False)
        elif event.kind == "note":
            stderr.print(f"  {event.text}", highlight=False)
        elif event.kind == "record":
            self._record(event.record or {})
        elif event.kind == "progress":
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY_S or event.done == event.total:
                self.last = now
                stderr.print(f"  {event.text}: {event.done:,}/{event.total:,}", highlight=False)

    def _record(self, record: dict[str, Any]) -> None:
        from tzkcli.cli.train import _describe, _f

        kind = record.get("type")
        if kind == "train":
            now = time.monotonic()
            if now - self.last < PROGRESS_EVERY_S and record.get("step") != 1:
                return
            self.last = now
            stderr.print(f"  step {record['step']}  bpd {_f(record.get('bpd'))}  "
                         f"{_f(record.get('images_per_s'), 1)} img/s", highlight=False)
        elif kind in ("val", "skip", "recover", "resume", "actnorm_init"):
            stderr.print(f"  {_describe(record)}", highlight=False)
