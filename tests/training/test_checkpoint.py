"""Checkpoints: all or nothing, integrity verified, pruning keeps the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tzkcli.errors import BadInputError
from tzkcli.training import checkpoint as ckpt


def _save_model(path: Path) -> None:
    path.mkdir()
    torch.save({"w": torch.arange(1000.0)}, path / "weights.pt")


def _write(directory: Path, step: int) -> ckpt.Checkpoint:
    return ckpt.write_checkpoint(directory, step, _save_model, {"step": step, "x": [1, 2]})


def test_written_checkpoint_verifies_and_loads(tmp_path: Path) -> None:
    written = _write(tmp_path, 7)

    assert written.name == "step-00000007"
    assert ckpt.load_state(written)["step"] == 7
    meta = json.loads((written.path / "integrity.json").read_text())
    assert set(meta["files"]) == {"model/weights.pt", "state.pt"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_truncated_file_is_named_and_not_loaded(tmp_path: Path) -> None:
    written = _write(tmp_path, 1)
    target = written.path / "model" / "weights.pt"
    target.write_bytes(target.read_bytes()[:100])

    with pytest.raises(BadInputError, match=r"weights.pt: truncated or altered"):
        ckpt.load_state(written)


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    written = _write(tmp_path, 1)
    target = written.path / "state.pt"
    data = bytearray(target.read_bytes())
    data[-30] ^= 0xFF
    target.write_bytes(bytes(data))

    with pytest.raises(BadInputError, match=r"state.pt: corrupt checkpoint file"):
        ckpt.load_state(written)


def test_missing_integrity_record_is_bad_input(tmp_path: Path) -> None:
    written = _write(tmp_path, 1)
    (written.path / "integrity.json").unlink()
    with pytest.raises(BadInputError, match="no integrity.json"):
        ckpt.verify(written)


def test_failed_write_leaves_previous_checkpoints(tmp_path: Path) -> None:
    _write(tmp_path, 1)

    def broken(path: Path) -> None:
        path.mkdir()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        ckpt.write_checkpoint(tmp_path, 2, broken, {})
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_prune_keeps_last_n_and_best(tmp_path: Path) -> None:
    for step in range(1, 7):
        _write(tmp_path, step)
    ckpt.prune(tmp_path, keep_last=2, best="step-00000002")

    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 5, 6]


def test_rng_state_round_trip() -> None:
    state = ckpt.capture_rng()
    first = torch.rand(5)
    ckpt.restore_rng(state)
    assert torch.equal(torch.rand(5), first)
