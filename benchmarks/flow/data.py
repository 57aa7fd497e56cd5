"""MNIST read straight from its IDX files, padded to 32x32, and dequantisation."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[2]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_root() -> Path:
    """``TZK_DATA_ROOT``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("TZK_DATA_ROOT", REPO.parent / "shared" / "data"))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def mnist(split: str) -> tuple[Tensor, Tensor]:
    """(uint8 images ``[N, 1, 32, 32]`` zero-padded from 28x28, int64 labels ``[N]``)."""
    images_file, labels_file = FILES[split]
    folder = data_root() / "mnist"
    images = torch.from_numpy(_idx(folder / images_file).copy())
    labels = torch.from_numpy(_idx(folder / labels_file).astype(np.int64))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    return padded[:, None], labels


def dequantise(x: Tensor, generator: torch.Generator, n_bits: int = 8) -> Tensor:
    """``uint8`` -> float ``(x + u) / 2**n_bits`` with ``u ~ U[0, 1)``, in ``[0, 1)``."""
    u = torch.rand(x.shape, generator=generator)
    return (x.float() + u) / 2**n_bits
