"""Atomic writes and exclusive locks, with real processes where it matters."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from tzkcli.errors import BusyError, RunFailedError
from tzkcli.fsio import atomic_path, atomic_write_text, exclusive_lock


def test_atomic_write_replaces_the_whole_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_file_has_the_umask_mode(tmp_path):
    import os

    target = tmp_path / "a.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_disk_full_names_the_file_and_keeps_the_old(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RunFailedError, match="no space left.*intact"), atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old"


def test_second_holder_fails_at_once(tmp_path):
    target = tmp_path / "store.h5"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from tzkcli.fsio import exclusive_lock
        with exclusive_lock({str(target)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=f"pid {process.pid}"):
            with exclusive_lock(target, "store"):
                pass
    finally:
        process.kill()
        process.wait()
    with exclusive_lock(target, "store"):
        pass
