"""From a manifest to store-ready arrays: verify files, read parts, transform, dedupe, split.

:func:`prepare_source` is the whole path from one manifest to a :class:`Source`: images
``uint8 [n, C, H, W]`` in the store's shape, one code column per kind over namespaced values
(``NAMESPACE/RAW``), and a split column. The transforms run in a fixed order, documented in
``docs/manifests.md``:

1. polarity: ``dark-on-bright`` images are inverted (``255 - x``) so strokes are bright on dark;
2. resize: to ``transform.resize`` by exact area averaging (antialiased), rounded half up;
3. pad: centred with zeros (the background) up to the store's height and width; an odd
   difference puts the extra row or column at the bottom or right.

Warning:
    A source is held in memory while it is prepared (its file bytes and its images), so a
    single source must fit in RAM; stores larger than RAM are built from several sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tzkcli.errors import BadInputError
from tzkcli.store import readers
from tzkcli.store.manifest import Manifest, Part, Transform

StageProgress = Callable[[str, int, int], None]
MAX_VALUE_CHARS = 200


@dataclass
class Source:
    """One ingested source, ready to be written.

    ``kinds`` maps each kind to ``(values, codes)``: namespaced values and an int32 ``[n]``
    column indexing them (-1 where a part gives no value). ``domain`` maps each kind to the
    values its images may take (declared ``values``, else the values seen).
    """

    manifest: Manifest
    images: np.ndarray
    kinds: dict[str, tuple[list[str], np.ndarray]]
    domain: dict[str, list[str]]
    split_names: list[str]
    split_codes: np.ndarray
    files: list[dict[str, str]]
    dropped_duplicates: int

    @property
    def name(self) -> str:
        return self.manifest.name

    def __len__(self) -> int:
        return len(self.images)


def resolve_files(manifest: Manifest, data_root: Path) -> dict[str, Path]:
    """Check that every file of the manifest exists under ``data_root``; return their paths.

    Raises:
        BadInputError: a missing file, naming the manifest field and the full path.
    """
    paths = {}
    for key, entry in manifest.files.items():
        path = data_root / entry.path
        if not path.exists():
            raise BadInputError(
                f"{manifest.origin}: files.{key}.path: {path} not found; expected an existing "
                f"file under the data root {data_root}"
            )
        paths[key] = path
    return paths


def load_files(manifest: Manifest, paths: dict[str, Path]) -> dict[str, bytes | None]:
    """Read each file once and check its sha256; directories (folder trees) read as None.

    Raises:
        BadInputError: a sha256 mismatch or an unreadable file.
    """
    contents: dict[str, bytes | None] = {}
    for key, path in paths.items():
        entry = manifest.files[key]
        try:
            if path.is_dir():
                contents[key], found = None, readers.sha256_of_file(path)
            else:
                data = path.read_bytes()
                contents[key], found = data, hashlib.sha256(data).hexdigest()
        except OSError as error:
            raise BadInputError(f"{path}: cannot read ({error.strerror})") from None
        if found != entry.sha256:
            raise BadInputError(
                f"{path}: sha256 {found}; expected {entry.sha256} "
                f"({manifest.origin}: files.{key}.sha256)"
            )
    return contents


def read_part(manifest: Manifest, part: Part, paths: dict[str, Path],
              contents: dict[str, bytes | None],
              progress: readers.Progress | None = None) -> readers.NativeImages:
    """Run the part's reader on its files: native images and raw kind columns."""
    origin = str(paths[part.images])
    data = contents[part.images]
    color = manifest.transform.color
    if data is None and part.reader != "image-tree":
        raise BadInputError(
            f"{origin}: a directory; expected a file for reader {part.reader!r} "
            f"({manifest.origin}: parts[{part.index}].images)"
        )

    if part.reader == "image-tree":
        folder_kinds = {k: s.folders for k, s in part.kinds.items() if s.folders is not None}
        native = readers.read_image_tree(paths[part.images], data, origin, color,
                                         part.extensions, folder_kinds, progress)
    elif part.reader == "idx":
        pixels = readers.idx_images(readers.read_idx(data, origin), origin)
        native = readers.NativeImages(pixels, {})
        for kind, spec in part.kinds.items():
            if spec.idx is not None:
                label_origin = str(paths[spec.idx])
                labels = readers.read_idx(_bytes(contents, spec.idx, label_origin), label_origin)
                _check_count(labels, len(pixels), label_origin, origin)
                native.kinds[kind] = readers.integer_column(labels, label_origin)
    elif part.reader == "atlas":
        pixels = readers.read_atlas(data, origin, color, part.tile, part.count)
        native = readers.NativeImages(pixels, {})
    else:
        pixels = readers.npz_images(readers.read_npz_array(data, origin, part.array),
                                    f"{origin}: array {part.array!r}", part.layout)
        native = readers.NativeImages(pixels, {})
        for kind, spec in part.kinds.items():
            if spec.array is not None:
                where = f"{origin}: array {spec.array!r}"
                labels = readers.read_npz_array(data, origin, spec.array)
                _check_count(labels, len(pixels), where, origin)
                native.kinds[kind] = readers.npz_column(labels, where)

    for kind, spec in part.kinds.items():
        if spec.constant is not None:
            native.kinds[kind] = readers.constant_column(spec.constant, len(native))
    return native


def _bytes(contents: dict[str, bytes | None], key: str, origin: str) -> bytes:
    data = contents[key]
    if data is None:
        raise BadInputError(f"{origin}: a directory; expected an IDX label file")
    return data


def _check_count(labels: np.ndarray, n: int, label_origin: str, image_origin: str) -> None:
    if len(labels) != n:
        raise BadInputError(
            f"{label_origin}: {len(labels)} labels; expected {n}, one per image of {image_origin}"
        )


def to_store_shape(pixels: np.ndarray | list[np.ndarray], transform: Transform,
                   shape: tuple[int, int, int], origin: str) -> np.ndarray:
    """Apply polarity, resize and pad (in that order): uint8 ``[n, *shape]``.

    Raises:
        BadInputError: images whose channels differ from the store's, or whose size after
            ``resize`` is larger than the store's or differs without ``pad = "center"``; the
            message names the manifest and both shapes.
    """
    channels, height, width = shape
    items = pixels if isinstance(pixels, list) else [pixels]
    out = []
    for block in items:
        block = block if block.ndim == 4 else block[None]
        block = _check_channels(block, channels, shape, origin)
        if transform.polarity == "dark-on-bright":
            block = 255 - block
        if transform.resize is not None and tuple(block.shape[2:]) != transform.resize:
            block = resize_area(block, transform.resize)
        out.append(_pad(block, transform, shape, origin))
    return out[0] if len(out) == 1 else np.concatenate(out)


def _check_channels(block: np.ndarray, channels: int, shape: tuple[int, int, int],
                    origin: str) -> np.ndarray:
    if block.shape[1] == channels:
        return block
    raise BadInputError(
        f"{origin}: images of shape {_fmt(block.shape[1:])} have {block.shape[1]} channel(s), "
        f"the store's shape is {_fmt(shape)}; expected a source with {channels} channel(s) "
        "(set transform.color)"
    )


def _pad(block: np.ndarray, transform: Transform, shape: tuple[int, int, int],
         origin: str) -> np.ndarray:
    _, height, width = shape
    h, w = block.shape[2:]
    if (h, w) == (height, width):
        return np.ascontiguousarray(block)
    if transform.pad != "center" or h > height or w > width:
        need = "transform.resize" if h > height or w > width else 'transform.pad = "center"'
        raise BadInputError(
            f"{origin}: images of shape {_fmt(block.shape[1:])} after the declared transforms "
            f"cannot map to the store's shape {_fmt(shape)}; declare {need} "
            "(or choose --shape)"
        )
    top, left = (height - h) // 2, (width - w) // 2
    padded = np.zeros((len(block), shape[0], height, width), dtype=np.uint8)
    padded[:, :, top:top + h, left:left + w] = block
    return padded


def resize_area(block: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 ``[n, C, h, w]`` to ``size`` (height, width) by exact area averaging.

    Each target pixel is the mean of the source area it covers, a partly covered source pixel
    weighted by the fraction it covers (the "area" interpolation of image libraries, which is
    antialiased for any, also non-integer, factor); the result is rounded half up to uint8.
    Upscaling by the same rule repeats pixels (nearest neighbour).
    """
    height, width = size
    rows = area_weights(block.shape[2], height)
    cols = area_weights(block.shape[3], width).T
    out = np.empty((*block.shape[:2], height, width), dtype=np.uint8)
    # float64 keeps the sums exact; blocks of about 1 MiB stay in cache
    step = max(1, (1 << 20) // (8 * block.shape[1] * block.shape[2] * block.shape[3]))
    for start in range(0, len(block), step):
        x = block[start:start + step].astype(np.float64)
        y = rows @ x @ cols  # [t, h] @ [.., h, w] @ [w, s] -> [.., t, s]
        out[start:start + step] = np.clip(np.floor(y + 0.5), 0, 255)
    return out


def area_weights(source: int, target: int) -> np.ndarray:
    """``[target, source]`` weights: the share of target pixel t covered by source pixel s."""
    edges = np.arange(target + 1) * (source / target)
    low, high = edges[:-1, None], edges[1:, None]
    s = np.arange(source)[None, :]
    overlap = np.clip(np.minimum(high, s + 1) - np.maximum(low, s), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def pixel_hashes(pixels: np.ndarray | list[np.ndarray]) -> list[bytes]:
    """A content hash of each native image (shape included), for deduplication."""
    return [
        hashlib.sha256(repr(p.shape).encode() + np.ascontiguousarray(p).tobytes()).digest()
        for p in pixels
    ]


def prepare_source(manifest: Manifest, data_root: Path, shape: tuple[int, int, int],
                   progress: StageProgress | None = None) -> Source:
    """Read, check, transform, dedupe and split one manifest's source.

    Raises:
        BadInputError: any problem with its files, their content, or the shape mapping.
    """
    def report(stage: str) -> readers.Progress | None:
        if progress is None:
            return None
        return lambda done, total: progress(f"{manifest.name}: {stage}", done, total)

    paths = resolve_files(manifest, data_root)
    contents = load_files(manifest, paths)

    blocks, raw_kinds, part_splits, hashes = [], [], [], []
    for part in manifest.parts:
        native = read_part(manifest, part, paths, contents, report("reading images"))
        origin = f"{manifest.origin}: parts[{part.index}] ({paths[part.images]})"
        if manifest.dedupe:
            hashes.extend(pixel_hashes(native.pixels))
        blocks.append(to_store_shape(native.pixels, manifest.transform, shape, origin))
        raw_kinds.append(native.kinds)
        part_splits.append((part.split, len(native)))
    del contents

    images = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    kinds = _merge_kinds(manifest, raw_kinds, [n for _, n in part_splits])
    keep = _dedupe(hashes, kinds) if manifest.dedupe else None
    split_names, split_codes = _split_column(manifest, part_splits)
    if keep is not None:
        images = images[keep]
        kinds = {k: (values, codes[keep]) for k, (values, codes) in kinds.items()}
        split_codes = split_codes[keep]
    split_names, split_codes = _apply_split_rule(manifest, split_names, split_codes)

    domain = {}
    for kind, (values, codes) in kinds.items():
        declared = manifest.kinds[kind].values is not None
        seen = range(len(values)) if declared else np.unique(codes[codes >= 0])
        domain[kind] = [values[i] for i in seen]
    files = [
        {"key": key, "path": entry.path, "sha256": entry.sha256}
        for key, entry in manifest.files.items()
    ]
    dropped = 0 if keep is None else len(hashes) - len(keep)
    return Source(manifest, np.ascontiguousarray(images), kinds, domain, split_names,
                  split_codes, files, dropped)


def _merge_kinds(manifest: Manifest, raw_kinds: list[dict[str, readers.RawColumn]],
                 counts: list[int]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Namespace the raw values and join the parts' columns (-1 where a part has no value)."""
    merged = {}
    for kind, spec in manifest.kinds.items():
        if spec.values is not None:
            raw_values = list(spec.values)
        else:
            seen = {v for columns in raw_kinds if kind in columns for v in columns[kind].values}
            raw_values = _natural_order(list(seen))
        position = {value: i for i, value in enumerate(raw_values)}

        pieces = []
        for columns, n in zip(raw_kinds, counts):
            if kind not in columns:
                pieces.append(np.full(n, -1, dtype=np.int32))
                continue
            column = columns[kind]
            lookup = np.array([_position(position, v, manifest, kind) for v in column.values],
                              dtype=np.int32)
            pieces.append(lookup[column.codes] if len(column.codes) else column.codes)
        merged[kind] = ([f"{spec.namespace}/{v}" for v in raw_values], np.concatenate(pieces))
    return merged


def _position(position: dict[str, int], value: str, manifest: Manifest, kind: str) -> int:
    if not 0 < len(value) <= MAX_VALUE_CHARS or not value.isprintable():
        raise BadInputError(
            f"{manifest.origin}: kind {kind!r}: raw value {value[:60]!r}; expected 1 to "
            f"{MAX_VALUE_CHARS} printable characters"
        )
    if value not in position:
        raise BadInputError(
            f"{manifest.origin}: kinds.{kind}.values: the source has value {value!r}, which is "
            "not declared; expected one of the declared values"
        )
    return position[value]


def _natural_order(values: list[str]) -> list[str]:
    """Integers in numeric order when every value is one, else plain string order."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _dedupe(hashes: list[bytes], kinds: dict[str, tuple[list[str], np.ndarray]]) -> np.ndarray:
    """Rows to keep: the first of each group with equal native pixels and equal kind values."""
    columns = [codes for _, codes in kinds.values()]
    seen: set[tuple] = set()
    keep = []
    for row, digest in enumerate(hashes):
        key = (digest, *(int(c[row]) for c in columns))
        if key not in seen:
            seen.add(key)
            keep.append(row)
    return np.asarray(keep, dtype=np.int64)


def _split_column(manifest: Manifest,
                  part_splits: list[tuple[str | None, int]]) -> tuple[list[str], np.ndarray]:
    """Split codes from the parts' names; -1 for parts whose images the rule will split."""
    names: list[str] = []
    pieces = []
    for split, n in part_splits:
        if split is None:
            pieces.append(np.full(n, -1, dtype=np.int32))
            continue
        if split not in names:
            names.append(split)
        pieces.append(np.full(n, names.index(split), dtype=np.int32))
    return names, np.concatenate(pieces)


def _apply_split_rule(manifest: Manifest, names: list[str],
                      codes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Hold out a seeded fraction of the rows with no split yet (deterministic per seed).

    The rows are those of parts without ``split``, in row order after deduplication; a
    permutation from ``numpy.random.default_rng(seed)`` puts the first
    ``round(fraction · m)`` of them in ``held_out`` and the rest in ``rest``.
    """
    rule = manifest.split
    pending = np.flatnonzero(codes < 0)
    if rule is None or not len(pending):
        return names, codes
    names = list(names)
    for split in (rule.rest, rule.held_out):
        if split not in names:
            names.append(split)
    order = np.random.default_rng(rule.seed).permutation(len(pending))
    n_held = int(round(rule.fraction * len(pending)))
    codes = codes.copy()
    codes[pending] = names.index(rule.rest)
    codes[pending[order[:n_held]]] = names.index(rule.held_out)
    return names, codes
