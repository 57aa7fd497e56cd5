"""Hostile and damaged files: truncated and bit-flipped stores, checkpoints and manifests,
pickles that would run code, huge declared dimensions, wrong dtypes, strange names, and a
crash of the HDF5 library itself.

Every case must end in one ``Error:`` line with exit code 3 (or, for a flip in bytes that
carry nothing, a clean success that still verifies), never a traceback, and must leave the
files it did not mean to write unchanged.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.reliability.conftest import Ledger, one_error_line, snapshot
from tzkcli.training import checkpoint as ckpt

BAD_INPUT = 3
FLIPS = [pytest.param(12, 1, id="default"),
         pytest.param(150, 2, id="slow", marks=pytest.mark.slow)]


def flipped(data: bytes, rng: random.Random) -> tuple[bytes, int]:
    at = rng.randrange(len(data))
    changed = bytearray(data)
    changed[at] ^= 1 << rng.randrange(8)
    return bytes(changed), at


@pytest.mark.parametrize("count,seed", FLIPS)
def test_truncated_and_flipped_stores(count: int, seed: int, weak_store: Path,
                                      tmp_path: Path, tzk, ledger: Ledger) -> None:
    rng = random.Random(seed)
    original = weak_store.read_bytes()
    for i in range(count):
        damaged = tmp_path / f"damaged-{i}.h5"
        if i % 3 == 0:
            damaged.write_bytes(original[:rng.randrange(len(original))])
            fault = "store truncated at a seeded length"
        else:
            data, _ = flipped(original, rng)
            damaged.write_bytes(data)
            fault = "store with one seeded bit flipped"
        result = tzk("info", damaged, "--verify")
        if result.code == 0:  # the flip hit bytes that carry nothing: content must verify
            assert "(verified)" in result.stdout
            ledger.tried(fault, "info --verify", "flip in unused bytes: the content "
                         "digest still verifies", 0)
            continue
        assert result.code == BAD_INPUT, result.stderr
        line = one_error_line(result.stderr)
        assert str(damaged) in line
        ledger.tried(fault, "info --verify", "refused, one line naming the file (and the "
                     "HDF5 key)", result.code, message=line)


def test_damaged_store_refused_by_train(weak_store: Path, tmp_path: Path, tzk,
                                        ledger: Ledger) -> None:
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(weak_store.read_bytes()[: weak_store.stat().st_size // 2])
    result = tzk("train", "--store", damaged, "--out", tmp_path / "run", "--steps", "1",
                 "--quiet")
    assert result.code == BAD_INPUT
    line = one_error_line(result.stderr)
    assert not (tmp_path / "run").exists()
    ledger.tried("store truncated at half", "train", "refused before the run directory "
                 "exists", result.code, message=line)


def test_huge_declared_dimensions_and_wrong_dtypes(weak_store: Path, tmp_path: Path, tzk,
                                                   ledger: Ledger) -> None:
    def variant(name: str, change) -> Path:
        path = tmp_path / f"{name}.h5"
        shutil.copyfile(weak_store, path)
        with h5py.File(path, "r+") as file:
            change(file)
        return path

    def huge(file) -> None:
        n = 10**9 - 1  # within the limit on N; nothing stored
        for key in ("images", "kinds/dataset/codes", "splits/codes"):
            old = file[key]
            del file[key]
            shape = (n, *old.shape[1:])
            chunks = (256, *old.shape[1:]) if key == "images" else (4096,)
            file.create_dataset(key, shape=shape, dtype=old.dtype, chunks=chunks)

    def too_wide(file) -> None:
        file.attrs["shape"] = np.array([1, 32, 10**6], dtype=np.int64)

    def float_images(file) -> None:
        images = file["images"][...].astype(np.float32)
        del file["images"]
        file.create_dataset("images", data=images)

    def int64_codes(file) -> None:
        codes = file["kinds/dataset/codes"][...].astype(np.int64)
        del file["kinds/dataset/codes"]
        file.create_dataset("kinds/dataset/codes", data=codes)

    def numeric_values(file) -> None:
        del file["kinds/dataset/values"]
        file.create_dataset("kinds/dataset/values", data=np.arange(2))

    cases = {"huge": (huge, "/images", "10^9 declared images, none stored"),
             "too_wide": (too_wide, "shape", "a declared side of 10^6"),
             "float_images": (float_images, "/images", "float32 images"),
             "int64_codes": (int64_codes, "/kinds/dataset/codes", "int64 codes"),
             "numeric_values": (numeric_values, "/kinds/dataset/values",
                                "a numeric vocabulary")}
    for name, (change, key, what) in cases.items():
        path = variant(name, change)
        for command in (["info", path], ["train", "--store", path, "--out",
                                         tmp_path / f"run-{name}", "--steps", "1"]):
            result = tzk(*command)
            assert result.code == BAD_INPUT, (name, result.stderr)
            line = one_error_line(result.stderr)
            assert key in line, line
            ledger.tried(f"store with {what} ({path.stat().st_size // 1024} KiB file)",
                         command[0],
                         "refused at open, one line naming the HDF5 key", result.code,
                         message=line)


def test_hdf5_crash_in_the_probe_does_not_kill_the_caller(weak_store: Path, tmp_path: Path,
                                                          monkeypatch, ledger: Ledger) -> None:
    """The probe child dies by a real SIGSEGV (as the HDF5 library would on a crafted file);
    the calling process gets one error and lives on."""
    from tzkcli.errors import BadInputError
    from tzkcli.store import open_store
    from tzkcli.store import reader

    path = tmp_path / "crafted.h5"
    shutil.copyfile(weak_store, path)
    def crash(_path: Path) -> None:
        faulthandler.disable()  # pytest's handler would print the child's stack
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(reader, "_probe_work", crash)
    with pytest.raises(BadInputError, match=r"crashed \(SIGSEGV\).*probe process") as error:
        open_store(path)
    assert "\n" not in str(error.value)
    ledger.tried("HDF5 library crash (SIGSEGV) opening a crafted store", "any store reader",
                 "the probe process died; the caller refused the file and lives on",
                 BAD_INPUT, message=str(error.value))

    monkeypatch.undo()
    with open_store(path) as store:  # the same file, probed afresh now that it is sound
        assert len(store) > 0


def checkpoint_of(run: Path) -> Path:
    record = json.loads((run / "run.json").read_text())
    return run / "checkpoints" / record["latest"]


def readers(run: Path, store: Path) -> list[tuple[str, list[object]]]:
    return [("sample", ["sample", run, "--out", run.parent / "grid.png", "-n", "4",
                        "--device", "cpu"]),
            ("eval", ["eval", run, "--store", store, "--samples", "0", "--device", "cpu"]),
            ("train --resume", ["train", "--resume", run, "--steps", "6", "--quiet"])]


@pytest.mark.parametrize("member", ["state.pt", "model/model.json", "integrity.json",
                                    "weights"])
def test_truncated_and_flipped_checkpoints(member: str, trained_run: Path, weak_store: Path,
                                           tmp_path: Path, tzk, ledger: Ledger) -> None:
    rng = random.Random(member)
    for damage in ("truncated", "flipped"):
        run = tmp_path / damage / "run"
        shutil.copytree(trained_run, run)
        checkpoint = checkpoint_of(run)
        if member == "weights":
            target = next((checkpoint / "model").glob("weights-*.pt"))
        else:
            target = checkpoint / member
        data = target.read_bytes()
        if damage == "truncated":
            target.write_bytes(data[:rng.randrange(len(data))])
        else:
            target.write_bytes(flipped(data, rng)[0])
        before = snapshot(run)
        for command, args in readers(run, weak_store):
            result = tzk(*args)
            assert result.code == BAD_INPUT, (command, result.stderr)
            line = one_error_line(result.stderr)
            assert target.name in line or checkpoint.name in line, line
            assert not (run.parent / "grid.png").exists()
            ledger.tried(f"checkpoint {member} {damage}", command, "refused, one line "
                         "naming the file; nothing loaded", result.code, message=line)
        after = snapshot(run)
        assert {k: v for k, v in after.items() if not k.startswith("eval")} == before


class Payload:
    """Unpickling this runs ``open(marker, "w")``: code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_code_running_pickle_is_refused_unexecuted(
        trained_run: Path, weak_store: Path, full_store: Path, tmp_path: Path, tzk,
        ledger: Ledger) -> None:
    import torch

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = checkpoint_of(run)
    marker = tmp_path / "pwned"

    # rewrite weights and state with the payload, and every hash that covers them, as a
    # careful attacker would: only the unpickling itself can stop it
    model_dir = checkpoint / "model"
    manifest = json.loads((model_dir / "model.json").read_text())
    weights = model_dir / manifest["weights"]["file"]
    state = torch.load(weights, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, weights)
    torch.save({"step": 4, "payload": Payload(marker)}, checkpoint / "state.pt")
    import hashlib

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest["weights"].update(sha256=digest, bytes=weights.stat().st_size)
    (model_dir / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    meta = json.loads((checkpoint / ckpt.INTEGRITY).read_text())
    for relative in meta["files"]:
        path = checkpoint / relative
        meta["files"][relative] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                   "bytes": path.stat().st_size}
    (checkpoint / ckpt.INTEGRITY).write_text(json.dumps(meta, indent=1))
    ckpt.verify(ckpt.Checkpoint(checkpoint, 4))  # the hashes all match

    cases = readers(run, weak_store) + [("extend", ["extend", run, "--store", full_store,
                                                    "--condition", "label", "--device",
                                                    "cpu"])]
    for command, args in cases:
        result = tzk(*args)
        assert result.code == BAD_INPUT, (command, result.stderr)
        line = one_error_line(result.stderr)
        assert not marker.exists(), f"{command} ran code from the checkpoint"
        ledger.tried("checkpoint whose pickles would run code (hashes forged to match)",
                     command, "refused by weights-only unpickling; the code never ran",
                     result.code, message=line)


@pytest.mark.parametrize("count,seed", [pytest.param(8, 1, id="default"),
                                        pytest.param(80, 2, id="slow",
                                                     marks=pytest.mark.slow)])
def test_truncated_and_flipped_manifests(count: int, seed: int, sources: Path,
                                         weak_store: Path, tmp_path: Path, tzk,
                                         ledger: Ledger) -> None:
    rng = random.Random(seed)
    original = (sources / "omniglot.toml").read_bytes()
    for i in range(count):
        manifest = tmp_path / f"manifest-{i}.toml"
        if i % 2 == 0:
            manifest.write_bytes(original[:rng.randrange(len(original))])
            fault = "manifest truncated at a seeded length"
        else:
            manifest.write_bytes(flipped(original, rng)[0])
            fault = "manifest with one seeded bit flipped"
        store = tmp_path / f"store-{i}.h5"
        shutil.copyfile(weak_store, store)
        before = store.read_bytes()
        result = tzk("ingest", manifest, "--store", store, "--data-root", sources)
        if result.code == 0:  # still a valid manifest (a flip in free text, say)
            assert tzk("info", store, "--verify").code == 0
            ledger.tried(fault, "ingest", "still a valid manifest: ingested, store "
                         "verifies", 0)
            continue
        assert result.code == BAD_INPUT, result.stderr
        line = one_error_line(result.stderr)
        assert store.read_bytes() == before
        ledger.tried(fault, "ingest", "refused, one line naming the manifest field; "
                     "store unchanged", result.code, message=line)


NAMES = ["../escape", "a/b", "con\x1bsole", "tab\there", "new\nline", "", "UPPER",
         "x" * 200, "dot.", "nul\x00l"]


def test_names_with_separators_and_control_characters(sources: Path, weak_store: Path,
                                                      trained_run: Path, tmp_path: Path,
                                                      tzk, ledger: Ledger) -> None:
    text = (sources / "omniglot.toml").read_text()
    store = tmp_path / "store.h5"
    shutil.copyfile(weak_store, store)
    before = store.read_bytes()
    for name in NAMES:
        manifest = tmp_path / "named.toml"
        escaped = json.dumps(name)  # a TOML basic string
        manifest.write_text(text.replace('name = "omniglot"', f"name = {escaped}"))
        result = tzk("ingest", manifest, "--store", store, "--data-root", sources)
        assert result.code == BAD_INPUT, (name, result.stderr)
        line = one_error_line(result.stderr)
        assert "\x1b" not in line and "\x00" not in line
        ledger.tried("dataset name with a path separator, control character or bad form",
                     "ingest", "refused, one printable line", result.code, message=line)
    assert store.read_bytes() == before

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for flag, value in [("--checkpoint", "../../etc"), ("--checkpoint", "/tmp"),
                        ("--checkpoint", ".tmp-step-1"), ("--condition", "label=\x1b[31m"),
                        ("--condition", "dataset=../x"), ("--class", "a/../../b")]:
        result = tzk("sample", run, "--out", tmp_path / "grid.png", "-n", "2", flag, value,
                     "--device", "cpu")
        assert result.code == BAD_INPUT, (flag, value, result.stderr)
        line = one_error_line(result.stderr)
        assert "\x1b" not in line
        assert not (tmp_path / "grid.png").exists()
        ledger.tried(f"{flag} with a path separator or control character", "sample",
                     "refused, one printable line", result.code, message=line)
