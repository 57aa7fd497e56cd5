"""The command line as a whole: help, version, exit codes, start-up cost."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import run_tzk_process
from tzkcli import __version__


def test_version(tzk):
    result = tzk("--version")
    assert result.code == 0
    assert result.stdout.strip() == f"tzk {__version__}"


def test_help_lists_every_command(tzk):
    from tzkcli.cli import app

    result = tzk("--help")
    assert result.code == 0
    names = [command.name or command.callback.__name__ for command in app.registered_commands]
    for name in names:
        assert name in result.stdout


def test_command_help_reflows_its_paragraphs_to_the_terminal_width():
    # The docstring breaks "each new prior is" and "fitted in closed form" across two lines;
    # a 200-column terminal shows the whole paragraph on one line.
    import os

    wide = run_tzk_process("extend", "--help", env={**os.environ, "COLUMNS": "200"})
    assert wide.code == 0
    assert any("each new prior is fitted in closed form" in line
               for line in wide.stdout.splitlines())


def test_top_level_help_lists_the_exit_codes(tzk):
    result = tzk("--help")
    assert result.code == 0
    text = " ".join(result.stdout.split())  # whatever the terminal's width
    assert "Exit codes: 0 success, 1 internal error, 2 usage error, 3 bad input" in text
    assert "5 run failed, 130 interrupted" in text


def test_unknown_command_is_a_usage_error(tzk):
    result = tzk("no-such-command")
    assert result.code == 2
    assert "no-such-command" in result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys; from tzkcli.cli import main; rc = main(['--help']);"
        " assert 'torch' not in sys.modules and 'h5py' not in sys.modules, 'heavy import';"
        " sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_python_m_tzkcli_runs():
    result = run_tzk_process("--version")
    assert result.code == 0
    assert __version__ in result.stdout
