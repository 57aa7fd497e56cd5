"""Two real tzk processes on one store or one run: one proceeds, the other fails at once with
exit code 4 and a message naming the holder; nothing is lost. Interrupting the holder
(SIGINT, SIGTERM) exits 130 with everything written so far intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.reliability.conftest import (Ledger, one_error_line, snapshot, start_tzk,
                                        temporaries)
from tzkcli.store import open_store
from tzkcli.training import checkpoint as ckpt

BUSY = 4
INTERRUPTED = 130


def wait_for_lock(lock: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the holder exited first: {process.communicate()[1]}")
        if lock.exists() and lock.read_text() == str(process.pid):
            return
        time.sleep(0.01)
    raise AssertionError("the holder never took the lock")


def second(tzk, *args: object) -> tuple[int, str, float]:
    started = time.monotonic()
    result = tzk(*args)
    return result.code, result.stderr, time.monotonic() - started


def test_two_ingests_on_one_store(store_copy: Path, sources: Path, tmp_path: Path, tzk,
                                  ledger: Ledger) -> None:
    # the first ingest blocks reading a FIFO in place of one source file, holding the lock
    root = tmp_path / "root"
    root.mkdir()
    for entry in sources.iterdir():
        if entry.name != "omniglot-small2.zip":
            os.symlink(entry, root / entry.name)
    os.mkfifo(root / "omniglot-small2.zip")
    before = store_copy.read_bytes()
    args = ["ingest", sources / "omniglot.toml", "--store", store_copy]
    first = start_tzk(*args, "--data-root", root)
    try:
        wait_for_lock(store_copy.with_name(store_copy.name + ".lock"), first)
        code, stderr, seconds = second(tzk, *args, "--data-root", sources)
        assert code == BUSY and seconds < 10
        line = one_error_line(stderr)
        assert f"pid {first.pid}" in line
        assert store_copy.read_bytes() == before
        ledger.tried("second ingest while another holds the store", "ingest",
                     f"refused in {seconds:.1f} s naming the holder's pid", code, message=line)

        first.send_signal(signal.SIGINT)
        _, first_err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == INTERRUPTED, first_err
    assert store_copy.read_bytes() == before and not temporaries(tmp_path)
    ledger.tried("SIGINT (Ctrl-C) while reading the sources", "ingest",
                 "interrupted; store byte for byte", first.returncode,
                 message=one_error_line(first_err))

    result = tzk(*args, "--data-root", sources)
    assert result.code == 0, result.stderr
    with open_store(store_copy) as store:
        assert "omniglot" in store.values("dataset")


def test_train_and_extend_on_one_run(run_copy: Path, full_store: Path, tzk,
                                     ledger: Ledger) -> None:
    run = run_copy
    lock = run / ".lock"
    extend = ["extend", run, "--store", full_store, "--condition", "label", "--device", "cpu"]

    trainer = start_tzk("train", "--resume", run, "--steps", "100000", "--quiet")
    try:
        wait_for_lock(lock, trainer)
        for command, args in (("extend", extend),
                              ("train --resume", ["train", "--resume", run, "--steps", "9"])):
            code, stderr, seconds = second(tzk, *args)
            assert code == BUSY and seconds < 10, stderr
            line = one_error_line(stderr)
            assert f"pid {trainer.pid}" in line
            ledger.tried("a second writer while tzk train holds the run", command,
                         f"refused in {seconds:.1f} s naming the holder's pid", code,
                         message=line)
        # SIGTERM once the loop runs (before it, the default action ends the process)
        metrics, size = run / "metrics.jsonl", (run / "metrics.jsonl").stat().st_size
        deadline = time.monotonic() + 120
        while '"type": "train"' not in metrics.read_text()[size:]:
            assert time.monotonic() < deadline and trainer.poll() is None
            time.sleep(0.05)
        trainer.send_signal(signal.SIGTERM)
        _, trainer_err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == INTERRUPTED, trainer_err
    for found in ckpt.list_checkpoints(run / "checkpoints"):
        ckpt.verify(found)
    ledger.tried("SIGTERM while training", "train --resume",
                 "checkpointed the last step, exit 130", trainer.returncode)

    before = snapshot(run)
    extender = start_tzk(*extend, "--refine-steps", "1000000")
    try:
        wait_for_lock(lock, extender)
        code, stderr, seconds = second(tzk, "train", "--resume", run, "--steps", "100")
        assert code == BUSY and seconds < 10, stderr
        line = one_error_line(stderr)
        ledger.tried("tzk train while tzk extend holds the run", "train --resume",
                     f"refused in {seconds:.1f} s naming the holder's pid", code, message=line)
    finally:
        extender.kill()
        extender.communicate()
    after = snapshot(run)
    assert after == before
    ledger.tried("SIGKILL of the extend holding the run", "extend", "killed; the run byte "
                 "for byte", extender.returncode)

    result = tzk(*extend)
    assert result.code == 0, result.stderr
