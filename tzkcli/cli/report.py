"""``tzk report``: write the HTML report of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tzkcli.cli.common import guarded, print_json, stderr, stdout


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)


@guarded
def report_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory (made by tzk train)."),
    out: Optional[Path] = typer.Option(
        None, "--out", metavar="FILE",
        help="Where to write the page \\[default: RUN/report.html].",
        show_default=False),
    samples: bool = typer.Option(True, "--samples/--no-samples",
                                 help="Draw the sample grids first when RUN has none yet."),
    device: str = typer.Option("auto", "--device", help="Where to draw samples: auto, cpu, "
                               "cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a self-contained HTML page (images embedded) about RUN.

    It shows the data (images per dataset, split and kind; real images), the training curves
    (bpd against step and time, under p_0 and each dataset's prior), the bpd and knowledge-gain
    table, confusion matrices and out-of-distribution scores (from tzk eval), sample grids
    from the joint, each dataset and each class at two temperatures (drawn into RUN/samples/
    when the run has none yet), and the configuration. The page is written all or nothing; it loads
    nothing from the network. Exit codes: 3 not a run.
    """
    from tzkcli.report import write_report

    result = write_report(run, out, samples=samples, device=device)
    for note in result.notes:
        stderr.print(f"note: {note}", highlight=False)
    if json_output:
        print_json({"report": str(result.path), "bytes": result.bytes, "images": result.images,
                    "sections": result.sections, "notes": result.notes})
        return
    stdout.print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.images} images; "
                 f"{', '.join(result.sections)})", highlight=False)
