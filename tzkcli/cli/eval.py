"""``tzk eval``: bits/dim per condition, accuracy by the posterior, OOD AUROC, sample quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from tzkcli.cli.common import guarded, print_json, stderr, stdout


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


@guarded
def eval_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory (tzk train)."),
    store: Path = typer.Option(..., "--store", help="The store to evaluate on."),
    split: str = typer.Option("test", "--split", help="Split of the store; 'all' for every "
                              "image."),
    ood: Optional[list[Path]] = typer.Option(
        None, "--ood", help="A store the model never saw, for OOD AUROC; repeatable."),
    checkpoint: str = typer.Option("latest", "--checkpoint",
                                   help="latest, best, or a checkpoint name."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dequantisation noise and samples."),
    samples: int = typer.Option(16, "--samples", help="Samples per condition for the sample "
                                "accuracy; 0 skips it."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per flow pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Evaluate RUN on a store: bpd per condition, accuracy, OOD AUROC, sample accuracy.

    bpd under p_0 and under every condition's own prior with the knowledge gain, accuracy and
    confusion per kind by the posterior, AUROC against each --ood store by log p_0 and by the
    knowledge score, and the posterior's accuracy on the model's own conditional samples.

    Results are also written to RUN/eval/CHECKPOINT-SPLIT.json. Same inputs and seed, same
    numbers. Images of datasets the model does not know are left out, and the output says so.
    Exit codes: 2 usage, 3 bad input (not a run, a store of another shape or of none of the
    model's datasets). See docs/commands.md.
    """
    from tzkcli.errors import UsageError

    for flag, value, lowest in (("--samples", samples, 0), ("--batch-size", batch_size, 1)):
        if value < lowest:
            raise UsageError(f"{flag} {value}: expected {lowest} or more")
    from tzkcli.evaluation import EvalOptions, evaluate, open_run, write_results
    from tzkcli.training.distributed import choose_device

    opened = open_run(run, checkpoint)
    options = EvalOptions(split=None if split == "all" else split, ood=list(ood or []),
                          seed=seed, batch_size=batch_size, samples=samples,
                          device=choose_device(device))
    report = evaluate(opened.model, store, options)
    report = {"run": str(run), "checkpoint": opened.checkpoint} | report
    path = write_results(run, opened.checkpoint, options.split, report)
    if report["left_out"]:
        counts = ", ".join(f"{n} of {name}" for name, n in report["left_out"].items())
        stderr.print(f"note: left out {counts}: datasets the model does not know (tzk extend "
                     "--condition dataset adds them)", highlight=False)

    if json_output:
        from tzkcli.evaluation.report import finite

        print_json(finite(report))
    else:
        _print_report(report)
    stderr.print(f"wrote {path}", highlight=False)


def _print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    bpd = report["bpd"]
    stdout.print(
        f"{report['run']} ({report['checkpoint']}) on {report['store']}, split "
        f"{report['split'] or 'all'}: {report['images']} images; bpd under p_0 "
        f"{bpd['joint']:.4f} (prior {bpd['parts']['prior']:.4f} + ladj "
        f"{bpd['parts']['ladj']:.4f} + dequantisation {bpd['parts']['dequantisation']:g}; "
        f"n_bits {report['n_bits']}, uniform seeded dequantisation, D {report['dims']})")

    table = Table(title="bits/dim by condition")
    for column in ("condition", "n", "p_0", "own prior", "gain"):
        table.add_column(column, justify="left" if column == "condition" else "right")
    for spec, row in bpd["by_condition"].items():
        table.add_row(spec, str(row["n"]), f"{row['joint']:.4f}", f"{row['conditional']:.4f}",
                      f"{row['gain']:+.4f}")
    stdout.print(table)

    sampled = report.get("sample_accuracy", {})
    table = Table(title="classification by the posterior")
    for column in ("kind", "accuracy", "on own samples"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, accuracy in report["accuracy"].items():
        own = sampled.get(kind, {}).get("mean")
        table.add_row(kind, _f(accuracy), _f(own))
    stdout.print(table)

    if report["ood_auroc"]:
        table = Table(title="out of distribution: AUROC (1 = separated, 0.5 = chance)")
        for column in ("store", "images", "by log p_0", "by knowledge"):
            table.add_column(column, justify="left" if column == "store" else "right")
        for name, row in report["ood_auroc"].items():
            table.add_row(name, str(row["images"]), _f(row["log_p0"]), _f(row["knowledge"]))
        stdout.print(table)


def _f(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"
