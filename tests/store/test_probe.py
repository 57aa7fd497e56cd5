"""The forked probe of ``open_store``: Ctrl-C during its fork is not lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tzkcli.store import reader

# os.register_at_fork cannot be undone: one handler for the session, armed by this flag.
_armed = {"interrupt": False}


def _interrupt_in_the_fork_callback() -> None:
    if _armed["interrupt"]:
        _armed["interrupt"] = False
        os.kill(os.getpid(), signal.SIGINT)
        # time for a thread that does not block SIGINT to take it (a handler would then run
        # in this callback at the latest when the sleep returns)
        time.sleep(0.05)


os.register_at_fork(after_in_parent=_interrupt_in_the_fork_callback)


@pytest.mark.parametrize("threads", [0, 1], ids=["one thread", "with another thread"])
def test_an_interrupt_during_the_probe_fork_is_raised_not_swallowed(tmp_path: Path,
                                                                    threads: int) -> None:
    # A SIGINT that lands while Python runs the at-fork callbacks raised KeyboardInterrupt
    # inside one of them, where it is printed as "Exception ignored" and lost: the ingest
    # then blocked reading a FIFO with the user's Ctrl-C gone. With another thread alive
    # (torch's workers in a real run) blocking the signal in this thread did not help: the
    # kernel delivered it to the other thread and Python still ran the handler here.
    path = tmp_path / "not-hdf5.h5"
    path.write_bytes(b"not an HDF5 file")  # the child fails in Python: exit 1, no crash
    handler = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    helpers = [threading.Thread(target=stop.wait) for _ in range(threads)]
    for helper in helpers:
        helper.start()
    _armed["interrupt"] = True

    try:
        with pytest.raises(KeyboardInterrupt):
            reader.probe_open(path)
    finally:
        stop.set()
        for helper in helpers:
            helper.join()

    assert signal.getsignal(signal.SIGINT) is handler
