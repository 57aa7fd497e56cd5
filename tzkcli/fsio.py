"""Crash-safe file writing and exclusive locks, shared by the store and the run directory.

Two promises hold for every artifact tzk writes (store, checkpoint, model, report):

- **all or nothing**: it is written under a temporary name in the same directory, flushed and
  fsync'ed, then renamed over the old one (``os.replace`` is atomic on POSIX). A process killed
  at any moment, SIGKILL included, leaves either the old file or the complete new one, plus at
  most a stale ``.tmp-*`` file. Writers that hold the artifact's lock (the store, checkpoints)
  remove such leftovers with :func:`remove_stale_temporaries`; other leftovers stay until
  removed by hand, since a writer without the lock cannot tell them from another's live file.
- **one writer**: a writer holds an exclusive ``flock`` on a lock file beside the artifact for
  as long as it writes; a second writer fails at once with :class:`~tzkcli.errors.BusyError`.
  The kernel drops the lock when the holder dies, so a killed writer never leaves it stuck.

Warning:
    ``flock`` locks are advisory and may not work on some network file systems (old NFS).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tzkcli.errors import BadInputError, BusyError, RunFailedError

TMP_PREFIX = ".tmp-"


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_error(path: Path, error: OSError) -> RunFailedError | BadInputError:
    """Translate an ``OSError`` raised while writing ``path`` into a one-line tzk error."""
    if error.errno == errno.ENOSPC:
        return RunFailedError(f"{path}: no space left on device; the previous version is intact")
    reason = error.strerror or " ".join(str(error).split())[:160] or type(error).__name__
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInputError(f"{path}: not writable ({reason}); expected a writable path")
    return RunFailedError(f"{path}: write failed ({reason}); the previous version is intact")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, stem: str) -> None:
    """Delete ``.tmp-STEM*`` files left by writers that were killed."""
    for stale in directory.glob(f"{TMP_PREFIX}{stem}*"):
        with contextlib.suppress(OSError):
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale)
            else:
                stale.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The caller writes the complete new file to the yielded path (with any library). If the
    block raises, the temporary file is removed and ``path`` is untouched. ``OSError`` from the
    block becomes a :class:`RunFailedError` or :class:`BadInputError` naming ``path``.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=directory)
    os.close(fd)
    temporary = Path(name)
    try:
        os.chmod(temporary, file_mode())
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_dir(directory)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise write_error(path, error) from error
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` all or nothing."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """Hold an exclusive lock on ``TARGET.lock`` (``TARGET/.lock`` for a directory).

    Raises:
        BusyError: another process holds it; the message names ``target`` and the holder's pid.
    """
    target = Path(target)
    lock_path = target / ".lock" if target.is_dir() else target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(lock_path, error) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise BusyError(
                f"{target}: {what} is in use by another tzk process (pid {holder}); "
                "expected no other writer"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        yield lock_path
    finally:
        os.close(fd)
