"""A full disk and a read-only file system under real writes (small tmpfs and bind mounts).

Each write of a store, checkpoint, model, image file or result must fail with one line that
says what happened (exit 5 for no space, 3 for a path that is not writable), leave the
previous artifact as it was, and leave nothing half-written. Mounting needs root with
CAP_SYS_ADMIN; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import Ledger, Mounts, one_error_line, snapshot, temporaries
from tzkcli.training import checkpoint as ckpt

NO_SPACE = 5
NOT_WRITABLE = 3


def folder_bytes(folder: Path) -> int:
    """Bytes ``folder`` takes on a tmpfs: whole 4 KiB pages per file."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def grow(point: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


def test_disk_full_during_ingest(weak_store: Path, sources: Path, tmp_path: Path,
                                 mounts: Mounts, tzk, ledger: Ledger) -> None:
    size = weak_store.stat().st_size
    disk = mounts.tmpfs(tmp_path / "disk", size + 64 * 1024)
    store = disk / "store.h5"
    shutil.copyfile(weak_store, store)
    before = store.read_bytes()

    result = tzk("ingest", sources / "omniglot.toml", "--store", store, "--data-root", sources)
    assert result.code == NO_SPACE
    line = one_error_line(result.stderr)
    assert "no space left" in line and str(store) in line and "intact" in line
    assert store.read_bytes() == before and not temporaries(disk)
    ledger.tried("disk full while writing the new store", "ingest", "refused, old store "
                 "byte for byte, temporary removed", result.code, message=line)

    grow(disk, 8 * size)
    assert tzk("ingest", sources / "omniglot.toml", "--store", store, "--data-root",
               sources).code == 0
    ledger.tried("ingest again once there is space", "ingest", "completed", 0)


def test_disk_full_during_a_checkpoint(trained_run: Path, tmp_path: Path, mounts: Mounts,
                                       tzk, ledger: Ledger) -> None:
    checkpoint = ckpt.list_checkpoints(trained_run / "checkpoints")[-1].path
    room = folder_bytes(trained_run) + folder_bytes(checkpoint) // 2
    disk = mounts.tmpfs(tmp_path / "disk", room)
    run = disk / "run"
    shutil.copytree(trained_run, run)
    kept = {c.name: snapshot(c.path) for c in ckpt.list_checkpoints(run / "checkpoints")}

    result = tzk("train", "--resume", run, "--steps", "12", "--checkpoint-every", "1",
                 "--quiet")
    assert result.code == NO_SPACE, result.stderr
    line = one_error_line(result.stderr)
    assert "no space left" in line
    survivors = ckpt.list_checkpoints(run / "checkpoints")
    for found in survivors:
        ckpt.verify(found)
    for name, files in kept.items():  # pruning may remove old ones; none is altered
        if (run / "checkpoints" / name).is_dir():
            assert snapshot(run / "checkpoints" / name) == files
    assert not [p for p in temporaries(run) if p.is_dir()]
    ledger.tried("disk full while writing a checkpoint", "train --resume",
                 "stopped; every checkpoint left verifies", result.code, message=line)

    grow(disk, 8 * room)
    again = tzk("train", "--resume", run, "--steps", "12", "--checkpoint-every", "4",
                "--quiet")
    assert again.code == 0, again.stderr
    assert ckpt.list_checkpoints(run / "checkpoints")[-1].step == 12
    ledger.tried("resume once there is space", "train --resume", "completed to step 12", 0)


def test_disk_full_during_extend_and_sample(trained_run: Path, full_store: Path,
                                            tmp_path: Path, mounts: Mounts, tzk,
                                            ledger: Ledger) -> None:
    disk = mounts.tmpfs(tmp_path / "disk", folder_bytes(trained_run) + 16 * 1024)
    run = disk / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)

    result = tzk("extend", run, "--store", full_store, "--condition", "label",
                 "--device", "cpu")
    assert result.code == NO_SPACE, result.stderr
    line = one_error_line(result.stderr)
    assert "no space left" in line
    assert snapshot(run) == before and not temporaries(run)
    ledger.tried("disk full while writing the extension checkpoint", "extend",
                 "refused; the run byte for byte", result.code, message=line)

    filler = disk / "filler"
    out = disk / "grid.png"
    out.write_bytes(b"old image")
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - 4096))
    result = tzk("sample", run, "--out", out, "-n", "16", "--device", "cpu")
    assert result.code == NO_SPACE, result.stderr
    line = one_error_line(result.stderr)
    assert "no space left" in line and out.read_bytes() == b"old image"
    assert not temporaries(disk)
    ledger.tried("disk full while writing the image grid", "sample",
                 "refused; the previous file byte for byte", result.code, message=line)
    for suffix in (".npy", ".h5"):
        result = tzk("sample", run, "--out", disk / f"images{suffix}", "-n", "16",
                     "--device", "cpu")
        assert result.code == NO_SPACE, result.stderr
        assert "no space left" in one_error_line(result.stderr)
        assert not (disk / f"images{suffix}").exists() and not temporaries(disk)
        ledger.tried(f"disk full while writing raw images ({suffix})", "sample",
                     "refused; nothing half-written", result.code)


def test_read_only_store_and_run(weak_store: Path, trained_run: Path, full_store: Path,
                                 sources: Path, tmp_path: Path, mounts: Mounts, tzk,
                                 ledger: Ledger) -> None:
    source = tmp_path / "source"
    source.mkdir()
    shutil.copyfile(weak_store, source / "store.h5")
    shutil.copytree(trained_run, source / "run")
    frozen = mounts.read_only(source, tmp_path / "frozen")
    store, run = frozen / "store.h5", frozen / "run"
    before_store, before_run = store.read_bytes(), snapshot(run)

    cases = [
        ("ingest", ["ingest", sources / "omniglot.toml", "--store", store, "--data-root",
                    sources]),
        ("train --resume", ["train", "--resume", run, "--steps", "6", "--quiet"]),
        ("train --out", ["train", "--store", weak_store, "--out", frozen / "new-run",
                         "--steps", "2", "--levels", "2", "--flow-steps", "2", "--hidden",
                         "16", "--quiet"]),
        ("extend", ["extend", run, "--store", full_store, "--condition", "label",
                    "--device", "cpu"]),
        ("sample", ["sample", run, "--out", frozen / "grid.png", "-n", "4", "--device",
                    "cpu"]),
        ("eval", ["eval", run, "--store", weak_store, "--samples", "0", "--device", "cpu"]),
    ]
    for command, args in cases:
        result = tzk(*args)
        assert result.code == NOT_WRITABLE, (command, result.stderr)
        line = one_error_line(result.stderr)
        assert "not writable" in line or "read-only" in line.lower(), line
        ledger.tried("read-only file system", command, "refused at once, one line",
                     result.code, message=line)
    assert store.read_bytes() == before_store and snapshot(run) == before_run

    result = tzk("info", store, "--verify")
    assert result.code == 0, result.stderr
    ledger.tried("read-only store (reading only)", "info --verify", "worked", 0)


def test_immutable_store_when_mounts_are_missing(weak_store: Path, sources: Path,
                                                 tmp_path: Path, tzk, ledger: Ledger) -> None:
    """``chattr +i`` also stops root; a store made immutable is refused in one line."""
    store = tmp_path / "store.h5"
    shutil.copyfile(weak_store, store)
    done = subprocess.run(["chattr", "+i", str(store)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"chattr +i not permitted here ({done.stderr.strip()})")
    try:
        result = tzk("ingest", sources / "omniglot.toml", "--store", store, "--data-root",
                     sources)
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)
    assert result.code in (NOT_WRITABLE, NO_SPACE), result.stderr
    line = one_error_line(result.stderr)
    assert store.read_bytes() == weak_store.read_bytes()
    ledger.tried("immutable store file (chattr +i)", "ingest", "refused, store unchanged",
                 result.code, message=line)


def test_a_write_error_without_errno_still_says_why() -> None:
    """numpy and torch raise OSErrors without errno: the message must not read "(None)"."""
    from tzkcli.fsio import write_error

    message = str(write_error(Path("out.npy"), OSError("fwrite failed")))
    assert message == "out.npy: write failed (fwrite failed); the previous version is intact"
