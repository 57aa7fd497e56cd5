"""The exceptions tzk raises for problems a user can fix, and their exit codes.

Every error the library raises on purpose derives from :class:`TzkError`. Its message is one
line that names the input (file, manifest field, HDF5 key, flag), the value found and what was
expected. The command line prints that line and exits with the class's ``exit_code``:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     success
1     an unexpected internal error (a bug: please report it with the traceback)
2     usage error: unknown flag, missing argument, malformed option value
3     bad input: a missing, corrupt or mismatching file, store, manifest, run
4     busy: another tzk process holds the store or run directory
5     the run failed: training diverged, the disk filled up, a write failed
130   interrupted (Ctrl-C or SIGTERM); what was already written stays intact
====  ==========================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_BUSY = 4
EXIT_RUN_FAILED = 5
EXIT_INTERRUPTED = 130


class TzkError(Exception):
    """Base of every deliberate tzk error; ``str(error)`` is the one-line message."""

    exit_code = EXIT_BAD_INPUT


class UsageError(TzkError):
    """Options that contradict each other or name nothing valid."""

    exit_code = EXIT_USAGE


class BadInputError(TzkError):
    """A file, store, manifest, config or run that is missing, corrupt or does not fit."""

    exit_code = EXIT_BAD_INPUT


class BusyError(TzkError):
    """Another process holds the lock of the store or run directory."""

    exit_code = EXIT_BUSY


class RunFailedError(TzkError):
    """A run that started but could not finish (divergence, no space left, a failed write)."""

    exit_code = EXIT_RUN_FAILED
