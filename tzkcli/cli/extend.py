"""``tzk extend``: add conditions (classes, attributes, datasets) to a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tzkcli.cli.common import guarded, print_json, stderr, stdout


def register(app: typer.Typer) -> None:
    app.command("extend")(extend_command)


@guarded
def extend_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory (tzk train)."),
    condition: Optional[list[str]] = typer.Option(
        None, "--condition", help="kind=value, or kind for every value the model lacks; "
        "repeatable (optional with --calibrate).", show_default=False),
    store: Optional[Path] = typer.Option(
        None, "--store", help="Store to fit on \\[default: the run's training store].",
        show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write to this new run directory \\[default: a new checkpoint in "
        "RUN].", show_default=False),
    refine_steps: int = typer.Option(0, "--refine-steps", help="Gradient steps on the new "
                                     "conditions after the closed-form fit."),
    finetune: bool = typer.Option(False, "--finetune", help="Train every parameter with the "
                                  "full objective for --refine-steps steps (unfreezes all)."),
    prior: Optional[list[str]] = typer.Option(
        None, "--prior", help="Prior form of a new kind, KIND=gaussian or KIND=bottleneck:Q; "
        "repeatable.", show_default=False),
    split: str = typer.Option("train", "--split", help="Split to fit on; 'all' for every "
                              "image."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise and the batch order."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per flow pass and step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate \\[default: 1e-2 "
                                       "refine, 1e-4 fine-tune].", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    checkpoint: str = typer.Option("latest", "--checkpoint",
                                   help="latest, best, or a checkpoint name to extend."),
    calibrate: int = typer.Option(0, "--calibrate", metavar="N", help="Refit every existing "
                                  "condition in closed form on up to N random images of the "
                                  "split (0: keep them frozen)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Add conditions (classes, attributes, datasets) to a trained model.

    The flow, p_0 and every existing condition stay frozen bit for bit; each new prior is
    fitted in closed form on its images' residuals (one flow pass), then optionally refined on
    its own parameters.

    --store may name a store ingested later: datasets the model lacks become dataset=
    conditions too. Rates of kinds that gain values are re-estimated from the store's counts.

    --calibrate N refits the old conditions too, on N images, so that trained and new priors
    are fits of the same estimator (a new dataset no longer outscores weakly trained ones);
    the flow and p_0 stay frozen. It runs without --condition as well.

    Writes checkpoint step-N-extend-K (all or nothing, holding the run lock) in RUN or --out.
    Exit codes: 2 usage, 3 bad input, 4 run in use, 5 fine-tune diverged. See
    docs/commands.md.
    """
    from tzkcli.extension import ExtendOptions, extend_run
    from tzkcli.training.config import parse_prior_flags
    from tzkcli.training.distributed import choose_device

    options = ExtendOptions(
        conditions=condition or [], store=store, out=out, refine_steps=refine_steps,
        calibrate=calibrate, checkpoint=checkpoint,
        finetune=finetune, prior=parse_prior_flags(prior or []),
        split=None if split == "all" else split, seed=seed, batch_size=batch_size, lr=lr,
        device=choose_device(device),
    )
    result = extend_run(run, options)
    if json_output:
        print_json(result.to_json())
        return

    if result.finetuned:
        mode = "fine-tuned: the flow, p_0 and the old conditions were trained too (not frozen)"
    elif result.calibrated:
        mode = (f"calibrated: the flow and p_0 are unchanged, {len(result.calibrated)} old "
                f"conditions refitted, {result.frozen_conditions} unchanged")
    else:
        mode = (f"frozen: the flow, p_0 and the {result.frozen_conditions} old conditions are "
                "unchanged")
    stdout.print(f"extended {run} ({result.base}) from {result.store}; {mode}",
                 highlight=False)
    for added in result.conditions:
        why = f" (new dataset of {added.added_for})" if added.added_for else ""
        stdout.print(f"  {added.spec}{why}: {added.images} images, bpd {added.bpd:.4f} vs "
                     f"p_0 {added.bpd_base:.4f} (gain {added.gain:+.4f})", highlight=False)
    for fit in result.calibrated:
        stdout.print(f"  {fit.spec} (refitted): {fit.images} images, bpd {fit.bpd:.4f} vs "
                     f"{fit.bpd_before:.4f} before (gain {fit.gain:+.4f})", highlight=False)
    for spec in result.uncalibrated:
        stderr.print(f"not refitted {spec}: fewer than 2 of its images among the --calibrate "
                     "sample", highlight=False)
    for spec in result.skipped:
        stderr.print(f"skipped {spec}: fewer than 2 images in the split", highlight=False)
    stdout.print(f"wrote {result.run / 'checkpoints' / result.checkpoint}", highlight=False)
