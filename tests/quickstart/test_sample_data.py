"""The real sample shipped in ``tzkcli/sample_data``: small, attributed, reproducible."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tzkcli.store import load_manifest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tzkcli" / "sample_data"


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_sample_is_at_most_2_mb_and_carries_its_licenses():
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert 500_000 < size <= 2 * 1024 * 1024
    readme = (SAMPLE / "README.md").read_text()
    for needed in ("LeCun", "CC BY-SA 3.0", "Lake", "MIT", "scripts/make_sample_data.py"):
        assert needed in readme
    assert "MIT License" in (SAMPLE / "omniglot" / "LICENSE").read_text()
    assert "MIT License" in (SAMPLE / "omniglot" / "LICENSE.atlas").read_text()


def test_every_manifest_names_files_of_the_sample_with_their_sha256():
    for name in ("mnist", "omniglot-atlas", "omniglot"):
        manifest = load_manifest(SAMPLE / "manifests" / f"{name}.toml")
        assert manifest.name == name
        for entry in manifest.files.values():
            data = (SAMPLE / entry.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry.sha256


def test_the_script_regenerates_the_sample_bit_for_bit(data_root, tmp_path):
    out = tmp_path / "sample"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_data.py"),
                           "--data-root", str(data_root), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _digests(out) == _digests(SAMPLE)
