"""The forked probe of ``open_store``: Ctrl-C during its fork is not lost."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tzkcli.store import reader

# os.register_at_fork cannot be undone: one handler for the session, armed by this flag.
_armed = {"interrupt": False}


def _interrupt_in_the_fork_callback() -> None:
    if _armed["interrupt"]:
        _armed["interrupt"] = False
        os.kill(os.getpid(), signal.SIGINT)


os.register_at_fork(after_in_parent=_interrupt_in_the_fork_callback)


def test_an_interrupt_during_the_probe_fork_is_raised_not_swallowed(tmp_path: Path) -> None:
    # A SIGINT that lands while Python runs the at-fork callbacks raised KeyboardInterrupt
    # inside one of them, where it is printed as "Exception ignored" and lost: the ingest
    # then blocked reading a FIFO with the user's Ctrl-C gone.
    path = tmp_path / "not-hdf5.h5"
    path.write_bytes(b"not an HDF5 file")  # the child fails in Python: exit 1, no crash
    _armed["interrupt"] = True

    with pytest.raises(KeyboardInterrupt):
        reader.probe_open(path)

    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()
