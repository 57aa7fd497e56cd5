"""``tzk ingest``: build or extend a store from source manifests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from tzkcli.cli.common import guarded, print_json, stderr, stdout
from tzkcli.errors import UsageError

if TYPE_CHECKING:
    from rich.progress import Progress

    from tzkcli.store import IngestReport

DATA_ROOT_ENV = "TZK_DATA_ROOT"


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_command)


def _data_root(flag: Optional[Path]) -> Path:
    if flag is not None:
        return flag
    value = os.environ.get(DATA_ROOT_ENV)
    if value:
        return Path(value)
    raise UsageError(
        f"--data-root: not given and {DATA_ROOT_ENV} is not set; expected the folder the "
        "manifests' paths are relative to"
    )


@guarded
def ingest_command(
    manifests: list[Path] = typer.Argument(..., metavar="MANIFEST...",
                                           help="Source manifests (TOML), one per dataset."),
    store: Path = typer.Option(..., "--store", help="The store to create or append to (HDF5)."),
    shape: Optional[str] = typer.Option(
        None, "--shape", metavar="CxHxW",
        help="Image shape of a new store (default 1x32x32); an existing store keeps its own.",
    ),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", metavar="DIR",
        help=f"Folder the manifests' paths are relative to (default: ${DATA_ROOT_ENV}).",
    ),
    replace: bool = typer.Option(
        False, "--replace", help="Re-ingest sources already in the store, in place.",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a store from MANIFEST files, or append their sources to an existing store.

    The store is written all or nothing: an interrupted ingest leaves the previous store as it
    was. A source already in the store with the same manifest and files is left unchanged;
    with other content it is an error unless --replace. Another ingest running on the same
    store makes this one fail at once (exit 4). Manifest format: docs/manifests.md.
    """
    from tzkcli.store import ingest, load_manifest, parse_shape

    root = _data_root(data_root)
    parsed_shape = parse_shape(shape) if shape is not None else None
    loaded = [load_manifest(path) for path in manifests]
    with _progress() as progress:
        report = ingest(loaded, store, root, shape=parsed_shape, replace=replace,
                        progress=progress)

    if json_output:
        print_json(_as_json(report))
        return
    for outcome in report.outcomes:
        splits = ", ".join(f"{name} {count:,}" for name, count in outcome.splits.items())
        note = (f"; {outcome.dropped_duplicates:,} duplicates dropped"
                if outcome.dropped_duplicates else "")
        verb = {"added": "added", "replaced": "replaced",
                "unchanged": "already in the store, unchanged:"}[outcome.action]
        stdout.print(f"{outcome.name}: {verb} {outcome.images:,} images ({splits}){note}")
    shape_text = "x".join(str(s) for s in report.shape)
    if report.written:
        stdout.print(f"wrote {report.path}: {report.images:,} images, shape {shape_text}, "
                     f"digest {report.digest}")
    else:
        stdout.print(f"{report.path}: nothing to do ({report.images:,} images, digest "
                     f"{report.digest})")


def _as_json(report: IngestReport) -> dict[str, Any]:
    return {
        "store": str(report.path),
        "written": report.written,
        "shape": list(report.shape),
        "images": report.images,
        "digest": report.digest,
        "sources": [
            {"name": o.name, "action": o.action, "images": o.images, "splits": o.splits,
             "dropped_duplicates": o.dropped_duplicates}
            for o in report.outcomes
        ],
    }


class _progress:
    """A Rich progress display on stderr, only when stderr is a terminal."""

    _progress: Progress | None

    def __enter__(self) -> Callable[[str, int, int], None] | None:
        self._progress = None
        if not stderr.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), console=stderr, transient=True)
        self._progress.start()
        self._tasks: dict[str, int] = {}
        return self.update

    def update(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
