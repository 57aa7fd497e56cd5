"""``tzk sample`` as a user runs it: grids, raw images, stdout, seeds, classes, errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Result
from tests.evaluation.conftest import snapshot
from tzkcli.errors import BadInputError


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def label_run(weak_run: Path, full_store: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``weak_run`` extended with every label of ``full_store`` (library call)."""
    from tzkcli.extension import ExtendOptions, extend_run

    out = tmp_path_factory.mktemp("sample-runs") / "labels"
    extend_run(weak_run, ExtendOptions(["label"], store=full_store, out=out))
    return out


def test_png_grid_and_json(tzk, weak_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "joint.png"
    result = tzk("sample", weak_run, "-n", "9", "--out", out, "--json")
    assert result.code == 0, result.stderr
    import json

    document = json.loads(result.stdout)
    assert document["paths"] == [str(out)] and document["conditions"] == ["p_0"]
    with Image.open(out) as image:
        assert image.size == (3 * 34 + 2, 3 * 34 + 2)  # 3x3 images of 32 px, padding 2


def test_same_seed_same_images(tzk, label_run: Path, tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.npy" for name in ("a", "b", "c", "d")]
    runs = [("--class", "3", "--seed", "5"), ("--condition", "label=mnist/3", "--seed", "5"),
            ("--class", "mnist/3", "--seed", "6"), ("--class", "4", "--seed", "5")]
    for path, args in zip(paths, runs):
        result = tzk("sample", label_run, "-n", "4", *args, "--out", path)
        assert result.code == 0, result.stderr
        assert f"wrote {path}: 4 images of 1x32x32 from label=mnist/" in result.stdout
    a, b, c, d = (np.load(path) for path in paths)
    assert a.dtype == np.uint8 and a.shape == (4, 1, 32, 32)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_grid_by_kind_one_row_per_value(tzk, label_run: Path, tmp_path: Path) -> None:
    import h5py
    from PIL import Image

    h5 = tmp_path / "rows.h5"
    result = tzk("sample", label_run, "--grid-by", "label", "-n", "3", "--out", h5)
    assert result.code == 0, result.stderr
    with h5py.File(h5) as file:
        assert file["images"].shape == (30, 1, 32, 32)
        names = [n.decode() for n in file["conditions"][:]]
    assert names[::3] == [f"label=mnist/{d}" for d in range(10)]

    png = tmp_path / "rows.png"
    assert tzk("sample", label_run, "--grid-by", "label", "-n", "3", "--out", png).code == 0
    with Image.open(png) as image:
        assert image.size[1] == 10 * 34 + 2 and image.size[0] > 3 * 34 + 2  # + labels

    mixed = tzk("sample", label_run, "--mixture", "label", "-n", "4", "--out",
                tmp_path / "m.npy")
    assert mixed.code == 0 and "from mixture label" in mixed.stdout


def test_stdout_carries_npy_and_messages_go_to_stderr(label_run: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tzkcli", "sample", str(label_run), "--condition",
         "label=mnist/7", "-n", "2", "--out", "-", "--device", "cpu"],
        capture_output=True, timeout=300, check=False)
    result = Result(done.returncode, done.stdout, done.stderr)
    assert result.code == 0, result.stderr
    images = np.load(io.BytesIO(result.stdout))
    assert images.shape == (2, 1, 32, 32) and images.dtype == np.uint8
    assert b"wrote stdout: 2 images" in result.stderr


def test_class_resolution() -> None:
    from tzkcli.evaluation.samples import resolve_class
    from tzkcli.knowledge import Registry

    registry = Registry()
    registry.add_kind("label")
    for value in ("mnist/3", "emnist/3", "mnist/4"):
        registry.add_condition("label", value)
    assert resolve_class(registry, "4") == "label=mnist/4"
    assert resolve_class(registry, "emnist/3") == "label=emnist/3"
    with pytest.raises(BadInputError, match="ambiguous, matches mnist/3, emnist/3"):
        resolve_class(registry, "3")
    with pytest.raises(BadInputError, match="no label value matches"):
        resolve_class(registry, "7")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["-n", "0"], 2, "-n 0: expected 1 or more"),
    (["--temperature", "-1"], 2, "--temperature -1.0: expected a finite number >= 0"),
    (["--condition", "label=mnist/33"], 3, "condition 'label=mnist/33': unknown, nearest: "),
    (["--condition", "lable=mnist/3"], 3, "unknown kind 'lable', nearest: label"),
    (["--grid-by", "alphabet"], 3, "kind 'alphabet': unknown"),
    (["--mixture", "label", "--class", "3"], 2, "--mixture label: draws the condition"),
    (["--out", "x.gif"], 2, "unknown suffix '.gif'"),
])
def test_sample_bad_input_is_one_line_and_writes_nothing(
        tzk, label_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        args: list[str], code: int, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    before = snapshot(label_run)
    result = tzk("sample", label_run, "--out", tmp_path / "s.png", *args)
    assert result.code == code, result.stderr
    assert message in _error_line(result)
    assert list(tmp_path.iterdir()) == [] and snapshot(label_run) == before


def test_sample_refuses_unwritable_paths_and_strangers(tzk, weak_run: Path,
                                                       tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = tzk("sample", weak_run, "--out", blocker / "s.png")
    assert result.code == 3 and "does not exist; expected an existing folder" in \
        _error_line(result)

    lacks = tzk("sample", weak_run, "--class", "3", "--out", tmp_path / "s.png")
    assert lacks.code == 3 and "the model has no kind 'label'" in _error_line(lacks)

    stranger = tzk("sample", tmp_path, "--out", tmp_path / "s.png")
    assert stranger.code == 3 and "not a tzk run" in _error_line(stranger)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
