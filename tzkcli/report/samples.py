"""Sample grids of a run: drawn by ``tzk sample``'s library, indexed in ``RUN/samples/``.

:func:`write_sample_grids` draws, at each temperature, one grid from the joint ``p_0``, one
with a row per dataset, and one with a row per value of every other kind (each class), through
:func:`tzkcli.evaluation.samples.draw` and :func:`~tzkcli.evaluation.samples.grid_png`, and
records them in ``RUN/samples/index.json``::

    {"checkpoint": "step-00000300-extend-1", "seed": 0, "per_row": 8,
     "grids": [{"file": "p_0-t0.7.png", "title": "joint p_0", "kind": null,
                "temperature": 0.7, "rows": ["p_0"]}, ...]}

The report embeds the grids that index names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tzkcli import fsio
from tzkcli.errors import BadInputError

SAMPLES_DIR = "samples"
INDEX = "index.json"
TEMPERATURES = (0.7, 1.0)
PER_ROW = 8
JOINT_IMAGES = 36
MAX_ROWS = 24
Progress = Callable[[str, int, int], None]


def write_sample_grids(run: str | os.PathLike[str], temperatures: Sequence[float] = TEMPERATURES,
                       per_row: int = PER_ROW, seed: int = 0, checkpoint: str = "latest",
                       device: str = "auto", progress: Progress | None = None) -> Path:
    """Draw the report's grids from checkpoint ``checkpoint`` of ``run``; return the index.

    Kinds with more than ``MAX_ROWS`` values (e.g. Omniglot characters) get a grid of their
    first ``MAX_ROWS`` values, and its title says so.

    Raises:
        BadInputError: not a run, or a checkpoint that fails verification.
    """
    from tzkcli.evaluation import open_run
    from tzkcli.evaluation.samples import draw, grid_png
    from tzkcli.training.distributed import choose_device

    run = Path(run)
    opened = open_run(run, checkpoint)
    model = opened.model.place(choose_device(device))
    folder = run / SAMPLES_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise fsio.write_error(folder, error) from error

    plan = _plan(model.registry)
    grids: list[dict[str, Any]] = []
    total = len(plan) * len(temperatures)
    for temperature in temperatures:
        for title, kind, conditions in plan:
            count = JOINT_IMAGES if kind is None else per_row
            drawn = _draw(draw, model, kind, conditions, count, temperature, seed)
            name = f"{kind or 'p_0'}-t{temperature:g}.png"
            grid_png(drawn, folder / name)
            grids.append({"file": name, "title": title, "kind": kind,
                          "temperature": temperature, "rows": drawn.rows,
                          "notes": drawn.notes})
            if progress is not None:
                progress("samples", len(grids), total)

    index = {"checkpoint": opened.checkpoint, "seed": seed, "per_row": per_row,
             "grids": grids}
    fsio.atomic_write_text(folder / INDEX, json.dumps(index, indent=2) + "\n")
    return folder / INDEX


def _plan(registry: Any) -> list[tuple[str, str | None, list[str] | None]]:
    """``(title, kind, conditions)``: the joint, the datasets, then every other kind."""
    plan: list[tuple[str, str | None, list[str] | None]] = [("joint p_0", None, None)]
    for kind in registry.kinds:
        specs = [registry.condition(i).spec for i in registry.condition_indices(kind)]
        if not specs:
            continue
        title = f"one row per {kind}"
        if len(specs) > MAX_ROWS:
            title += f" (the first {MAX_ROWS} of {len(specs)})"
        plan.append((title, kind, specs[:MAX_ROWS]))
    return plan


def _draw(draw: Any, model: Any, kind: str | None, conditions: list[str] | None, n: int,
          temperature: float, seed: int) -> Any:
    """One grid: ``grid_by`` when the kind is drawn whole, else one draw per row, joined."""
    if kind is None:
        return draw(model, (), n, temperature, seed)
    if len(conditions or []) == len(model.registry.condition_indices(kind)):
        return draw(model, (), n, temperature, seed, grid_by=kind)

    import torch

    parts = [draw(model, [spec], n, temperature, seed) for spec in conditions or []]
    joined = parts[0]
    joined.images = torch.cat([p.images for p in parts])
    joined.rows = [p.rows[0] for p in parts]
    joined.conditions = [c for p in parts for c in p.conditions]
    joined.notes = list(dict.fromkeys(n for p in parts for n in p.notes))
    return joined


def read_sample_index(run: Path) -> dict[str, Any] | None:
    """``RUN/samples/index.json``, or None when the run has no grids yet.

    Raises:
        BadInputError: the index is not JSON, or names a grid that is not there.
    """
    path = Path(run) / SAMPLES_DIR / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        grids = list(index["grids"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"{path}: unreadable sample index ({error}); expected the index "
                            "written by tzk report or tzk quickstart") from None
    for grid in grids:
        if not (path.parent / str(grid.get("file"))).is_file():
            raise BadInputError(f"{path}: names {grid.get('file')!r}, which is not in "
                                f"{path.parent}; expected every grid it names")
    return index
