"""What every command shares: the consoles, error reporting and exit codes.

Results go to stdout (or ``--json``); progress, logs and errors go to stderr. A
:class:`~tzkcli.errors.TzkError` becomes one red ``Error:`` line on stderr and its exit code.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from tzkcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TzkError

F = TypeVar("F", bound=Callable[..., Any])


def reflowed(doc: str) -> str:
    """A command's docstring as help text: paragraphs kept, the line breaks inside them
    joined, so that Rich wraps each paragraph to the terminal's width.

    Typer's ``rich`` markup mode keeps every hard line break after the first paragraph, so a
    docstring wrapped at 100 columns would print ragged in any other width.
    """
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """Print one error line on stderr (red on a terminal, plain text otherwise)."""
    line = " ".join(str(message).split())
    stderr.print(f"[bold red]Error:[/bold red] {line}", markup=True, highlight=False)


def guarded(function: F) -> F:
    """Turn tzk errors raised by a command body into an error line and the error's exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except TzkError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted; what was already written is intact")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def run_app(app: typer.Typer, argv: list[str]) -> int:
    """Run a Typer app as the ``tzk`` program and return its exit code.

    Command bodies are wrapped by :func:`guarded`, which maps tzk errors and interrupts to
    their exit codes; usage errors exit 2 as Typer reports them. Anything else is a bug: its
    traceback is printed and the code is 1.
    """
    try:
        app(args=argv, prog_name="tzk")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print_error(str(done.code))
        return EXIT_INTERNAL
    except BrokenPipeError:
        return 0
    except Exception:  # a bug: show the traceback so that it can be reported
        import traceback

        traceback.print_exc()
        return EXIT_INTERNAL
    return 0
