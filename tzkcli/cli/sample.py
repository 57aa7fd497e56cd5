"""``tzk sample``: images from the joint model, a condition, a composition or a mixture."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tzkcli.cli.common import guarded, print_json, stderr, stdout


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)


@guarded
def sample_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory (tzk train)."),
    out: str = typer.Option(..., "--out", help="FILE.png (a grid), FILE.npy or FILE.h5 (raw "
                            "uint8 images), or - for .npy on stdout."),
    label: Optional[str] = typer.Option(
        None, "--class", help="A label value: 3 resolves to the only matching value (e.g. "
        "mnist/3); mnist/3 is exact.", show_default=False),
    condition: Optional[list[str]] = typer.Option(
        None, "--condition", help="kind=value; repeatable (composed).", show_default=False),
    mixture: Optional[str] = typer.Option(
        None, "--mixture", help="KIND: draw each image's value from the rates first.",
        show_default=False),
    n: int = typer.Option(64, "-n", help="Images (per row with --grid-by)."),
    temperature: float = typer.Option(0.7, "--temperature", help="Scale of every standard "
                                      "deviation (0: the prior's mean)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same images."),
    grid_by: Optional[str] = typer.Option(
        None, "--grid-by", help="KIND: one labelled row per value of the kind.",
        show_default=False),
    checkpoint: str = typer.Option("latest", "--checkpoint",
                                   help="latest, best, or a checkpoint name."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="Print the paths and conditions "
                                     "as JSON."),
) -> None:
    """Draw images from the model: joint, conditional, composed or a mixture.

    p_0 with no condition, one condition, the composition of
    several (--class, --condition), or a mixture over a kind; write a PNG grid or the raw
    images. With --out - the .npy goes to stdout and every message to stderr.

    Exit codes: 2 usage (-n below 1, negative temperature, unknown suffix), 3 bad input
    (unknown condition or kind, unwritable path, not a run). See docs/commands.md.
    """
    from tzkcli.errors import UsageError
    from tzkcli.evaluation.samples import check_output, check_sampling

    check_sampling(n, temperature)
    suffix = check_output(out)
    if suffix == "-" and json_output:
        raise UsageError("--json with --out -: stdout carries the images; expected one of them")

    from tzkcli.evaluation import open_run
    from tzkcli.evaluation.samples import draw, grid_png, resolve_class, write_array
    from tzkcli.training.distributed import choose_device

    opened = open_run(run, checkpoint)
    model = opened.model.place(choose_device(device))
    specs = list(condition or [])
    if label is not None:
        specs.insert(0, resolve_class(model.registry, label))
    drawn = draw(model, specs, n, temperature, seed, mixture, grid_by)
    console = stderr if suffix == "-" else stdout
    for note in drawn.notes:
        stderr.print(f"note: {note}", highlight=False)

    if suffix == "-":
        import numpy as np

        np.save(sys.stdout.buffer, drawn.images.numpy())
        sys.stdout.buffer.flush()
    elif suffix == ".png":
        grid_png(drawn, Path(out))
    else:
        write_array(Path(out), ".npy" if suffix == ".npy" else ".h5", drawn.images.numpy(),
                    "images", drawn.conditions,
                    {"run": str(run), "checkpoint": opened.checkpoint, "seed": seed,
                     "temperature": temperature})

    where = "stdout" if suffix == "-" else out
    if json_output:
        print_json({"paths": [where], "conditions": drawn.rows, "images": len(drawn.images),
                    "per_row": drawn.per_row, "temperature": temperature, "seed": seed,
                    "checkpoint": opened.checkpoint, "notes": drawn.notes})
        return
    shape = "x".join(str(s) for s in drawn.images.shape[1:])
    console.print(f"wrote {where}: {len(drawn.images)} images of {shape} from "
                  f"{'; '.join(drawn.rows)} at temperature {temperature:g}, seed {seed}",
                  highlight=False)
