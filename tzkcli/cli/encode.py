"""``tzk encode``: the low-dimensional codes of images under a bottleneck condition."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tzkcli.cli.common import guarded, print_json, stdout


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)


@guarded
def encode_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory (tzk train)."),
    store: Path = typer.Option(..., "--store", help="The store whose images to encode."),
    condition: str = typer.Option(..., "--condition", help="kind=value of a bottleneck kind."),
    out: str = typer.Option(..., "--out", help="FILE.npy (codes [n, q]) or FILE.h5 (codes, "
                            "rows)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only images of this split "
                                        "\\[default: every split].", show_default=False),
    all_images: bool = typer.Option(False, "--all-images", help="Every image of the split, "
                                    "not only those with the condition."),
    checkpoint: str = typer.Option("latest", "--checkpoint",
                                   help="latest, best, or a checkpoint name."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dequantisation noise."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per flow pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    r"""Write the low-dimensional codes of images under a bottleneck condition.

    The codes are E\[c | z] under the condition's prior, for the store's images that have the
    condition (every image of the split with --all-images).

    The .h5 file holds codes [n, q] and rows [n] (the store rows); .npy the codes only.
    Exit codes: 2 usage, 3 bad input (not a bottleneck, unknown condition, store of another
    shape, unwritable path). See docs/commands.md.
    """
    from tzkcli.errors import BadInputError, UsageError
    from tzkcli.evaluation.samples import ARRAY_SUFFIXES, check_output

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected 1 or more")
    suffix = check_output(out, ARRAY_SUFFIXES, allow_dash=False)

    from tzkcli.evaluation import open_run
    from tzkcli.evaluation.data import check_shape, model_codes, read_store
    from tzkcli.evaluation.evaluate import seeded
    from tzkcli.evaluation.samples import check_bottleneck, encode, write_array
    from tzkcli.training.distributed import choose_device

    opened = open_run(run, checkpoint)
    model = opened.model.place(choose_device(device))
    registry = model.registry
    chosen = registry.condition(check_bottleneck(registry, condition))
    view = read_store(store)
    check_shape(view, model)
    rows = view.rows(split)
    if not all_images:
        column = registry.kinds.index(chosen.kind)
        value = registry.values(chosen.kind).index(chosen.value)
        rows = rows[model_codes(view, registry)[rows, column] == value]
    if len(rows) == 0:
        raise BadInputError(f"--condition {chosen.spec}: no image of {store} has it; "
                            "expected images of the condition (or --all-images)")

    generator = seeded(seed, 0, model.priors.anchor.device)
    codes = encode(model, view, rows, chosen.spec, batch_size, generator)
    attrs = {"condition": chosen.spec, "run": str(run), "checkpoint": opened.checkpoint,
             "store": str(store), "store_digest": view.digest, "seed": seed}
    write_array(Path(out), ".npy" if suffix == ".npy" else ".h5", codes, "codes", None, attrs,
                {"rows": rows})

    result = {"path": out, "condition": chosen.spec, "images": int(len(rows)),
              "rank": int(codes.shape[1]), "checkpoint": opened.checkpoint}
    if json_output:
        print_json(result)
    else:
        stdout.print(f"wrote {out}: codes of {len(rows)} images under {chosen.spec} "
                     f"(rank {codes.shape[1]})", highlight=False)

