"""The ``tzk`` command line: one thin module per command over the importable library.

This is the only package of tzk that imports Typer or Rich. Command modules import nothing
heavy at module level (torch, h5py, numpy are imported inside the command body), so that
``tzk --help`` and ``tzk --version`` answer at once.
"""

from __future__ import annotations

import sys

import typer

from tzkcli import __version__
from tzkcli.cli.common import reflowed, run_app

app = typer.Typer(
    name="tzk",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tzk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Train conditional Glow flows (TzK) on several image datasets at once.

    Exit codes: 0 success, 1 internal error, 2 usage error, 3 bad input, 4 busy (another tzk
    process holds the store or run), 5 run failed, 130 interrupted.
    """


def _register() -> None:
    """Attach every command module that exists; each defines ``register(app)``."""
    import importlib
    import pkgutil

    import tzkcli.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "common" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tzkcli.cli.{info.name}")
        module.register(app)

    for command in app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = reflowed(command.callback.__doc__)
    app.registered_callback.help = reflowed(_root.__doc__ or "")


_register()


def main(argv: list[str] | None = None) -> int:
    """Run ``tzk`` with ``argv`` (default: ``sys.argv[1:]``) and return its exit code."""
    return run_app(app, sys.argv[1:] if argv is None else argv)
