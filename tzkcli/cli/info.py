"""``tzk info``: what a store holds: shape, counts per dataset and split, kinds, sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tzkcli.cli.common import guarded, print_json, stdout
from tzkcli.errors import BadInputError

TOP_VALUES = 3


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)


@guarded
def info_command(
    store: Path = typer.Argument(..., metavar="STORE", help="The store (HDF5) to describe."),
    json_output: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Recompute the content digest from every image and compare.",
    ),
) -> None:
    """Describe STORE: shape, format version, digest, images per dataset and split, the
    kinds with their number of values and most common ones, and the sources.

    With --verify the digest is recomputed; a mismatch is an error (exit 3).
    """
    from tzkcli.store import open_store

    with open_store(store) as opened:
        description = describe(opened)
        if verify:
            recomputed = opened.compute_digest()
            if recomputed != opened.digest:
                raise BadInputError(
                    f"{store}: digest mismatch: recomputed {recomputed}, stored {opened.digest}; "
                    "expected equal (the store is damaged)"
                )
            description["verified"] = True

    if json_output:
        print_json(description)
    else:
        _print_tables(description)


def describe(store: Any) -> dict[str, Any]:
    """The store's description as plain data (the ``--json`` document)."""
    import numpy as np

    datasets = store.values("dataset")
    dataset_codes = store.codes("dataset")
    split_codes = store.split_codes
    counts: dict[str, dict[str, int]] = {}
    for d, name in enumerate(datasets):
        mine = split_codes[dataset_codes == d]
        per_split = np.bincount(mine, minlength=len(store.split_names))
        counts[name] = {s: int(c) for s, c in zip(store.split_names, per_split) if c}

    kinds, details = {}, {}
    for kind in store.kinds:
        values = store.values(kind)
        codes = store.codes(kind)
        frequency = np.bincount(codes[codes >= 0], minlength=len(values))
        top = np.argsort(-frequency, kind="stable")[:TOP_VALUES]
        kinds[kind] = len(values)
        details[kind] = {
            "values": len(values),
            "unknown": int((codes < 0).sum()),
            "datasets": [datasets[d] for d in np.flatnonzero(store.domain(kind).any(axis=1))],
            "most_common": [[values[i], int(frequency[i])] for i in top if frequency[i]],
        }

    return {
        "store": str(store.path),
        "format_version": store.format_version,
        "shape": list(store.shape),
        "images": len(store),
        "digest": store.digest,
        "datasets": counts,
        "kinds": kinds,
        "kind_details": details,
        "splits": store.split_names,
        "sources": [
            {"name": s.name, "manifest": s.origin, "rows": list(s.rows),
             "files": s.files, "fingerprint": s.fingerprint}
            for s in store.sources
        ],
    }


def _print_tables(description: dict[str, Any]) -> None:
    from rich.table import Table

    shape = "x".join(str(s) for s in description["shape"])
    stdout.print(f"[bold]{description['store']}[/bold]: {description['images']:,} images of "
                 f"{shape}, format version {description['format_version']}")
    stdout.print(f"digest {description['digest']}"
                 + (" (verified)" if description.get("verified") else ""))

    splits = description["splits"]
    table = Table(title="Images per dataset and split", title_justify="left")
    table.add_column("dataset")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for name, per_split in description["datasets"].items():
        cells = [f"{per_split.get(s, 0):,}" for s in splits]
        table.add_row(name, *cells, f"{sum(per_split.values()):,}")
    stdout.print(table)

    table = Table(title="Kinds", title_justify="left")
    for column in ("kind", "values", "unknown", "datasets", "most common"):
        table.add_column(column, justify="right" if column in ("values", "unknown") else "left")
    for kind, detail in description["kind_details"].items():
        common = ", ".join(f"{v} ({c:,})" for v, c in detail["most_common"])
        table.add_row(kind, f"{detail['values']:,}", f"{detail['unknown']:,}",
                      ", ".join(detail["datasets"]), common)
    stdout.print(table)

    table = Table(title="Sources", title_justify="left")
    for column in ("name", "rows", "manifest", "files (sha256)"):
        table.add_column(column)
    for source in description["sources"]:
        start, stop = source["rows"]
        files = "\n".join(f"{Path(f['path']).name} ({f['sha256'][:12]})"
                          for f in source["files"])
        table.add_row(source["name"], f"{start:,}-{stop:,}", source["manifest"], files)
    stdout.print(table)
