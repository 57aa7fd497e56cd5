"""``tzk sample`` and ``tzk encode``: images drawn from the model, codes of images, and files.

Sampling: no condition draws from ``p_0``; one or several conditions from their composition
(``TzK.sample``, MODEL.md); a mixture over a kind draws each image's value from the knowledge
rates first. ``grid_by=KIND`` draws one row per value of the kind (each composed with the other
conditions). A fixed seed gives the same images on the same device: each row has its own
generator seeded from the seed and the row's condition, so rows do not depend on each other.

Files: ``.png`` is a grid (``torchvision.utils.make_grid`` and ``save_image``), rows labelled
with their condition when drawn by ``grid_by``; ``.npy`` the raw ``uint8`` images
``[N, C, H, W]``; ``.h5`` the images as ``images`` plus each image's condition as
``conditions``. Every file is written all or nothing.
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tzkcli import fsio
from tzkcli.errors import BadInputError, UsageError
from tzkcli.evaluation.evaluate import seeded
from tzkcli.knowledge.composition import CompositionWarning
from tzkcli.knowledge.registry import nearest

IMAGE_SUFFIXES = (".png", ".npy", ".h5", ".hdf5")
ARRAY_SUFFIXES = (".npy", ".h5", ".hdf5")
LABEL = "label"


@dataclass
class Drawn:
    """Sampled images and what they were drawn from.

    Attributes:
        images: uint8 ``[N, C, H, W]``.
        rows: the condition (``"p_0"``, a spec, specs joined by ``" & "``, ``"mixture KIND"``)
            of each row of a grid; ``per_row`` images each.
        conditions: each image's condition label, ``[N]``.
        notes: what composition said (diagonal marginals, fallbacks).
    """

    images: torch.Tensor
    rows: list[str]
    per_row: int
    conditions: list[str]
    notes: list[str] = field(default_factory=list)


def resolve_class(registry: Any, value: str, kind: str = LABEL) -> str:
    """``--class VALUE``: the ``kind`` condition whose value is ``VALUE`` exactly, or else the
    only one whose value ends in ``/VALUE`` (``3`` -> ``label=mnist/3``).

    Raises:
        BadInputError: the model has no such kind, or no or several matching values (listed).
    """
    if kind not in registry.kinds:
        raise BadInputError(f"--class {value!r}: the model has no kind {kind!r}; "
                            f"{nearest(kind, registry.kinds)}")
    values = registry.values(kind)
    if value in values:
        return f"{kind}={value}"
    matches = [v for v in values if v.rsplit("/", 1)[-1] == value]
    if len(matches) == 1:
        return f"{kind}={matches[0]}"
    if matches:
        raise BadInputError(f"--class {value!r}: ambiguous, matches {', '.join(matches)}; "
                            "expected one of them in full")
    raise BadInputError(f"--class {value!r}: no {kind} value matches; "
                        f"{nearest(value, values)}")


def check_sampling(n: int, temperature: float) -> None:
    """``-n`` at least 1, a temperature of 0 or more.

    Raises:
        UsageError: naming the flag and the value.
    """
    if n < 1:
        raise UsageError(f"-n {n}: expected 1 or more images")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature {temperature}: expected a finite number >= 0")


def check_output(path: str, suffixes: Sequence[str] = IMAGE_SUFFIXES, allow_dash: bool = True,
                 flag: str = "--out") -> str:
    """The format of an output path (its suffix, or ``"-"``), checked before any work.

    Raises:
        UsageError: an unknown suffix.
        BadInputError: the folder is missing or not writable.
    """
    if path == "-" and allow_dash:
        return "-"
    suffix = Path(path).suffix.lower()
    if suffix not in suffixes:
        dash = " or - (stdout)" if allow_dash else ""
        raise UsageError(f"{flag} {path}: unknown suffix {suffix or '(none)'!r}; expected "
                         f"{', '.join(suffixes)}{dash}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise BadInputError(f"{flag} {path}: folder {folder} does not exist; expected an "
                            "existing folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (Path(path).exists()
                                                    and not os.access(path, os.W_OK)):
        raise BadInputError(f"{flag} {path}: not writable; expected a writable path")
    return suffix


def draw(
    model: Any,
    conditions: Sequence[str] = (),
    n: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    mixture: str | None = None,
    grid_by: str | None = None,
) -> Drawn:
    """Draw ``n`` images (``n`` per row with ``grid_by``) as the module docstring says.

    Raises:
        BadInputError: an unknown kind or condition (named with the nearest known ones).
        UsageError: ``mixture`` together with conditions or ``grid_by``.
    """
    check_sampling(n, temperature)
    registry = model.registry
    if mixture is not None and (conditions or grid_by):
        raise UsageError(f"--mixture {mixture}: draws the condition itself; expected no "
                         "--condition, --class or --grid-by with it")
    specs = [registry.condition(spec).spec for spec in conditions]
    if mixture is not None:
        registry.kind(mixture)
        rows = [[]]
        names = [f"mixture {mixture}"]
    elif grid_by is not None:
        rows = [specs + [registry.condition(k).spec] for k in registry.condition_indices(grid_by)]
        if not rows:
            raise BadInputError(f"--grid-by {grid_by}: the kind has no conditions")
        names = [" & ".join(row) for row in rows]
    else:
        rows = [specs]
        names = [" & ".join(specs) or "p_0"]

    device = model.priors.anchor.device
    images, notes = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompositionWarning)
        for row, name in zip(rows, names):
            generator = seeded(seed, zlib.crc32(name.encode()), device)
            with torch.no_grad():
                images.append(model.sample(n, row or None, temperature=temperature,
                                           generator=generator, mixture=mixture).cpu())
    notes = list(dict.fromkeys(str(w.message) for w in caught
                               if issubclass(w.category, (CompositionWarning, RuntimeWarning))))
    labels = [name for name in names for _ in range(n)]
    return Drawn(torch.cat(images), names, n, labels, notes)


def grid_png(drawn: Drawn, path: Path) -> None:
    """A PNG grid of ``drawn``: one row per condition when there are several, labelled."""
    from torchvision.utils import make_grid, save_image

    x = drawn.images.float() / 255.0
    several = len(drawn.rows) > 1
    per_row = drawn.per_row if several else max(1, math.ceil(math.sqrt(len(x))))
    grid = make_grid(x, nrow=per_row, padding=2, pad_value=0.5)
    if several:
        grid = torch.cat([_labels(drawn.rows, grid.shape[1], x.shape[2]), grid], dim=2)
    with fsio.atomic_path(path) as temporary:
        save_image(grid, temporary, format="png")


def _labels(rows: list[str], height: int, image_height: int) -> torch.Tensor:
    """A ``[3, height, width]`` strip with each row's name beside it, white on grey."""
    from PIL import Image, ImageDraw

    width = 8 + 6 * max(len(r) for r in rows)
    strip = Image.new("L", (width, height), 128)
    pen = ImageDraw.Draw(strip)
    for i, row in enumerate(rows):
        top = 2 + i * (image_height + 2) + max(0, (image_height - 11) // 2)
        pen.text((4, top), row, fill=255)
    pixels = torch.from_numpy(np.array(strip, dtype=np.float32) / 255.0)
    return pixels[None].expand(3, -1, -1)


def write_array(path: Path, suffix: str, array: np.ndarray, name: str,
                labels: Sequence[str] | None = None, attrs: dict[str, Any] | None = None,
                extra: dict[str, np.ndarray] | None = None) -> None:
    """``array`` to ``.npy``, or to ``.h5`` as dataset ``name`` (plus ``conditions``, the
    ``extra`` datasets and ``attrs``), all or nothing."""
    with fsio.atomic_path(path) as temporary:
        if suffix == ".npy":
            buffer = io.BytesIO()  # numpy writing to a file drops errno: ENOSPC read "None"
            np.save(buffer, array)
            temporary.write_bytes(buffer.getvalue())
            return
        import h5py

        # built in memory: an HDF5 write that fails for lack of space leaves a broken handle
        # that crashes the process at exit; a plain write of the bytes fails cleanly
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as file:
            file.create_dataset(name, data=array)
            if labels is not None:
                file.create_dataset("conditions", data=np.array(labels, dtype=object),
                                    dtype=h5py.string_dtype())
            for key, value in (extra or {}).items():
                file.create_dataset(key, data=value)
            for key, value in (attrs or {}).items():
                file.attrs[key] = value
        temporary.write_bytes(buffer.getvalue())


def check_bottleneck(registry: Any, spec: str) -> int:
    """The global index of ``spec``, a condition of a ``bottleneck`` kind.

    Raises:
        BadInputError: an unknown condition (with the nearest ones), or another form.
    """
    index = registry.index(spec)
    kind = registry.kind(registry.condition(index).kind)
    if kind.form != "bottleneck":
        raise BadInputError(f"--condition {spec}: kind {kind.name!r} has a {kind.form!r} prior, "
                            "expected a bottleneck kind (train or extend with --prior "
                            f"{kind.name}=bottleneck:Q)")
    return index


def encode(model: Any, view: Any, rows: np.ndarray, spec: str, batch_size: int,
           generator: torch.Generator) -> np.ndarray:
    """Bottleneck codes ``E[c | r]`` ``[n, q]`` (float32) of store ``rows`` under ``spec``.

    Raises:
        BadInputError: ``spec`` is not a condition of the model, or not a bottleneck.
    """
    index = check_bottleneck(model.registry, spec)
    device = model.priors.anchor.device
    out = []
    with torch.no_grad():
        for _, x in view.batches(rows, batch_size):
            out.append(model.code(x.to(device), index, generator).float().cpu().numpy())
    rank = int(model.priors.conditions[index].factor.shape[1])
    return np.concatenate(out) if out else np.zeros((0, rank), dtype=np.float32)
