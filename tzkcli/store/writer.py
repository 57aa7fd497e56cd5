"""Writing a store: :func:`ingest` creates a store or appends sources to one, all or nothing.

Every ingest writes the complete new store to a temporary file beside the target and renames
it over the target (:func:`tzkcli.fsio.atomic_path`), while holding the store's exclusive lock
(:func:`tzkcli.fsio.exclusive_lock`) for the whole run. So a process killed at any moment,
SIGKILL included, leaves the previous store exactly as it was, and a second writer fails at
once with :class:`~tzkcli.errors.BusyError`.

Codes never change meaning: appending a source appends its new values to each vocabulary, its
new kinds after the existing ones, its dataset to the ``dataset`` vocabulary and a row to each
domain matrix. Replacing a source (``replace=True``) rewrites its rows in place, keeps its
dataset code, and keeps every value in the vocabularies (values no image takes any more keep
their code, with an all-false domain column).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tzkcli import __version__, fsio
from tzkcli.errors import BadInputError, RunFailedError, UsageError
from tzkcli.store.manifest import Manifest
from tzkcli.store.reader import (DEFAULT_SHAPE, FORMAT_NAME, FORMAT_VERSION, READ_BLOCK_BYTES,
                                 ContentDigest, Store, open_store)
from tzkcli.store.source import Source, prepare_source

StageProgress = Callable[[str, int, int], None]
CHUNK_BYTES = 256 << 10
SPACE_SLACK = 1 << 20


@dataclass
class SourceOutcome:
    """What an ingest did with one manifest: ``added``, ``replaced`` or ``unchanged``."""

    name: str
    action: str
    images: int
    splits: dict[str, int]
    dropped_duplicates: int = 0


@dataclass
class IngestReport:
    """The result of :func:`ingest`: per manifest its outcome, and the store written."""

    path: Path
    written: bool
    shape: tuple[int, int, int]
    images: int
    digest: str
    outcomes: list[SourceOutcome] = field(default_factory=list)


@dataclass
class _Entry:
    """One source of the new store, in row order: kept from the old store, or new."""

    name: str
    old: int | None = None
    new: Source | None = None


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``CxHxW`` (e.g. ``1x32x32``).

    Raises:
        UsageError: not three positive integers within the store's limits.
    """
    pieces = text.lower().split("x")
    ok = len(pieces) == 3 and all(p.isdigit() for p in pieces)
    shape = tuple(int(p) for p in pieces) if ok else ()
    if not ok or not (1 <= shape[0] <= 4 and all(1 <= s <= 4096 for s in shape[1:])):
        raise UsageError(
            f"--shape: found {text!r}; expected CxHxW such as 1x32x32 (C in 1..4, sides "
            "in 1..4096)"
        )
    return shape  # type: ignore[return-value]


def ingest(manifests: Sequence[Manifest], store_path: str | os.PathLike[str],
           data_root: str | os.PathLike[str], shape: tuple[int, int, int] | None = None,
           replace: bool = False, progress: StageProgress | None = None) -> IngestReport:
    """Add the sources of ``manifests`` to the store at ``store_path`` (created if absent).

    A source whose dataset name is already in the store with the same manifest fingerprint is
    left as it is (outcome ``unchanged``) unless ``replace``; with another fingerprint it is an
    error unless ``replace``. ``shape`` (C, H, W) is the new store's shape (default 1x32x32);
    for an existing store it must match. When nothing changes the file is not rewritten.

    Raises:
        BusyError: another process is writing this store.
        BadInputError: any bad manifest, source file or store; the store is unchanged.
        RunFailedError: the write failed (e.g. no space left); the store is unchanged.
    """
    store_path = Path(store_path)
    data_root = Path(data_root)
    if not manifests:
        raise BadInputError("no manifest given; expected at least one MANIFEST")
    _check_distinct(manifests)
    _check_store_path(store_path)
    if not data_root.is_dir():
        raise BadInputError(f"--data-root: {data_root} is not a directory; expected the data root")

    with fsio.exclusive_lock(store_path, what="store"):
        directory = store_path.parent if str(store_path.parent) else Path(".")
        fsio.remove_stale_temporaries(directory, store_path.name)
        old = open_store(store_path) if store_path.exists() else None
        try:
            return _ingest_locked(manifests, store_path, data_root, shape, replace, progress,
                                  old)
        finally:
            if old is not None:
                old.close()


def _check_store_path(store_path: Path) -> None:
    directory = store_path.parent if str(store_path.parent) else Path(".")
    if not directory.is_dir():
        raise BadInputError(
            f"--store: {store_path}: folder {directory} does not exist; expected an existing "
            "folder"
        )
    if store_path.exists() and not store_path.is_file():
        raise BadInputError(f"--store: {store_path} is not a file; expected an HDF5 store path")


def _check_distinct(manifests: Sequence[Manifest]) -> None:
    seen: dict[str, str] = {}
    for manifest in manifests:
        if manifest.name in seen:
            raise BadInputError(
                f"{manifest.origin}: dataset.name {manifest.name!r} is also the name in "
                f"{seen[manifest.name]}; expected one manifest per dataset"
            )
        seen[manifest.name] = manifest.origin


def _ingest_locked(manifests: Sequence[Manifest], store_path: Path, data_root: Path,
                   shape: tuple[int, int, int] | None, replace: bool,
                   progress: StageProgress | None, old: Store | None) -> IngestReport:
    shape = _resolve_shape(store_path, shape, old)
    entries = [_Entry(s.name, old=i) for i, s in enumerate(old.sources)] if old else []
    by_name = {entry.name: entry for entry in entries}
    outcomes: dict[str, SourceOutcome] = {}
    todo = []
    for manifest in manifests:
        entry = by_name.get(manifest.name)
        if entry is None:
            todo.append((manifest, "added"))
            continue
        record = old.sources[entry.old]  # type: ignore[union-attr,index]
        if replace:
            todo.append((manifest, "replaced"))
        elif record.fingerprint == manifest.fingerprint:
            outcomes[manifest.name] = _kept_outcome(old, entry.old)  # type: ignore[arg-type]
        else:
            raise BadInputError(
                f"{manifest.origin}: dataset {manifest.name!r} is already in {store_path} with "
                f"other content (ingested from {record.origin}); expected the same manifest "
                "and files, or --replace"
            )

    if not todo and old is not None:
        return IngestReport(store_path, False, shape, len(old), old.digest,
                            [outcomes[m.name] for m in manifests])

    for manifest, action in todo:
        source = prepare_source(manifest, data_root, shape, progress)
        if not len(source):
            raise BadInputError(f"{manifest.origin}: the source has no images; expected some")
        if action == "added":
            entries.append(_Entry(manifest.name, new=source))
        else:
            by_name[manifest.name].new = source
            by_name[manifest.name].old = None
        outcomes[manifest.name] = SourceOutcome(
            manifest.name, action, len(source), _split_counts(source.split_names,
                                                              source.split_codes),
            source.dropped_duplicates,
        )

    _check_space(store_path, shape, entries, old)
    with fsio.atomic_path(store_path) as temporary:
        digest, n = write_store(temporary, shape, entries, old, progress)
        os.chmod(temporary, fsio.file_mode())  # mkstemp makes 0600; a store is for sharing
    return IngestReport(store_path, True, shape, n, digest,
                        [outcomes[m.name] for m in manifests])


def _check_space(store_path: Path, shape: tuple[int, int, int], entries: list[_Entry],
                 old: Store | None) -> None:
    """Refuse before writing when the new store cannot fit beside the old one.

    HDF5 does not recover from a write that fails for lack of space: the file handle stays
    broken and the process crashes when the library shuts down. So the space is checked first
    (images, codes and 1 MiB for the rest).

    Warning:
        A disk that another process fills during the write still fails the write (the old
        store stays intact and the error says so), and HDF5 may then crash at exit.
    """
    n = sum(len(e.new) if e.new is not None else _old_size(old, e.old) for e in entries)
    kinds = set(old.kinds if old else ["dataset"])
    kinds.update(*(e.new.kinds for e in entries if e.new is not None))
    needed = n * int(np.prod(shape)) + 4 * n * (len(kinds) + 1) + SPACE_SLACK
    directory = store_path.parent if str(store_path.parent) else Path(".")
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise RunFailedError(
            f"{store_path}: no space left on device (the new store needs about "
            f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free); the previous version is "
            "intact"
        )


def _resolve_shape(store_path: Path, shape: tuple[int, int, int] | None,
                   old: Store | None) -> tuple[int, int, int]:
    if old is None:
        return shape or DEFAULT_SHAPE
    if shape is not None and tuple(shape) != old.shape:
        raise BadInputError(
            f"--shape: found {'x'.join(map(str, shape))}, but {store_path} has shape "
            f"{'x'.join(map(str, old.shape))}; expected the store's shape (or a new store)"
        )
    return old.shape


def _split_counts(names: Sequence[str], codes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(codes, minlength=len(names)) if len(codes) else np.zeros(len(names))
    return {name: int(count) for name, count in zip(names, counts) if count}


def _kept_outcome(old: Store, index: int) -> SourceOutcome:
    start, stop = old.sources[index].rows
    codes = old.split_codes[start:stop]
    return SourceOutcome(old.sources[index].name, "unchanged", stop - start,
                         _split_counts(old.split_names, codes))


def _extend(vocabulary: list[str], values: Sequence[str]) -> None:
    known = set(vocabulary)
    for value in values:
        if value not in known:
            vocabulary.append(value)
            known.add(value)


def write_store(path: Path, shape: tuple[int, int, int], entries: list[_Entry],
                old: Store | None, progress: StageProgress | None = None) -> tuple[str, int]:
    """Write the complete store of ``entries`` (in row order) to ``path``.

    Returns:
        The content digest and the number of images.
    """
    import h5py

    kinds = list(old.kinds) if old else ["dataset"]
    vocab = {kind: old.values(kind) for kind in kinds} if old else {"dataset": []}
    split_names = list(old.split_names) if old else []
    for entry in entries:
        _extend(vocab["dataset"], [entry.name])
        if entry.new is None:
            continue
        for kind, (values, _) in entry.new.kinds.items():
            if kind not in vocab:
                kinds.append(kind)
                vocab[kind] = []
            _extend(vocab[kind], values)
            _extend(vocab[kind], entry.new.domain[kind])
        _extend(split_names, entry.new.split_names)

    rows, n = [], 0
    for entry in entries:
        size = len(entry.new) if entry.new is not None else _old_size(old, entry.old)
        rows.append((n, n + size))
        n += size
    codes, domain, split_codes = _columns(kinds, vocab, split_names, entries, rows, old, n)

    columns = {k: (vocab[k], codes[k], domain[k]) for k in kinds}
    digest = ContentDigest(shape, kinds, columns, split_names, split_codes, n)
    with h5py.File(path, "w", libver=("earliest", "v110")) as file:
        images = file.create_dataset(
            "images", shape=(n, *shape), dtype=np.uint8, chunks=_chunks(n, shape),
        )
        _write_images(images, entries, rows, old, digest, progress)
        digest_hex = digest.hexdigest()
        _write_columns(file, kinds, vocab, codes, domain, split_names, split_codes)
        _write_sources(file, entries, rows, old)
        file.attrs["format"] = FORMAT_NAME
        file.attrs["format_version"] = np.int64(FORMAT_VERSION)
        file.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        file.attrs["kinds"] = np.asarray(kinds, dtype=h5py.string_dtype())
        file.attrs["digest"] = digest_hex
        file.attrs["created_by"] = f"tzk {__version__}"
    return digest_hex, n


def _old_size(old: Store | None, index: int | None) -> int:
    start, stop = old.sources[index].rows  # type: ignore[union-attr,index]
    return stop - start


def _chunks(n: int, shape: tuple[int, int, int]) -> tuple[int, ...]:
    rows = max(1, min(n, CHUNK_BYTES // int(np.prod(shape))))
    return (rows, *shape)


def _columns(kinds: list[str], vocab: dict[str, list[str]], split_names: list[str],
             entries: list[_Entry], rows: list[tuple[int, int]], old: Store | None,
             n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Codes, domains and splits of the new store; old codes keep their values."""
    datasets = vocab["dataset"]
    position = {kind: {v: i for i, v in enumerate(vocab[kind])} for kind in kinds}
    codes = {kind: np.full(n, -1, dtype=np.int32) for kind in kinds}
    domain = {kind: np.zeros((len(datasets), len(vocab[kind])), dtype=np.uint8)
              for kind in kinds}
    split_codes = np.zeros(n, dtype=np.int32)

    for entry, (start, stop) in zip(entries, rows):
        d = datasets.index(entry.name)
        if entry.new is None:
            first, last = old.sources[entry.old].rows  # type: ignore[union-attr,index]
            for kind in old.kinds:  # type: ignore[union-attr]
                codes[kind][start:stop] = old.codes(kind)[first:last]  # type: ignore[union-attr]
                old_row = old.domain(kind)[d]  # type: ignore[union-attr]
                domain[kind][d, :len(old_row)] = old_row
            split_codes[start:stop] = old.split_codes[first:last]  # type: ignore[union-attr]
            continue
        source = entry.new
        for kind, (values, local) in source.kinds.items():
            lookup = np.array([position[kind][v] for v in values] + [-1], dtype=np.int32)
            codes[kind][start:stop] = lookup[local]  # local -1 picks the trailing -1
            for value in source.domain[kind]:
                domain[kind][d, position[kind][value]] = 1
        split_lookup = np.array([split_names.index(s) for s in source.split_names],
                                dtype=np.int32)
        split_codes[start:stop] = split_lookup[source.split_codes]

    codes["dataset"][:] = np.repeat(
        np.array([datasets.index(e.name) for e in entries], dtype=np.int32),
        [stop - start for start, stop in rows],
    )
    domain["dataset"] = np.eye(len(datasets), dtype=np.uint8)
    return codes, domain, split_codes


def _write_images(images, entries: list[_Entry], rows: list[tuple[int, int]],
                  old: Store | None, digest: ContentDigest,
                  progress: StageProgress | None) -> None:
    total = images.shape[0]
    for entry, (start, stop) in zip(entries, rows):
        if entry.new is not None:
            blocks = _blocks(entry.new.images)
        else:
            first, last = old.sources[entry.old].rows  # type: ignore[union-attr,index]
            blocks = old.image_blocks(first, last)  # type: ignore[union-attr]
        at = start
        for block in blocks:
            images[at:at + len(block)] = block
            digest.update_images(block)
            at += len(block)
            if progress is not None:
                progress("writing the store", at, total)


def _blocks(array: np.ndarray) -> list[np.ndarray]:
    step = max(1, READ_BLOCK_BYTES // max(1, int(np.prod(array.shape[1:]))))
    return [array[i:i + step] for i in range(0, len(array), step)]


def _write_columns(file, kinds: list[str], vocab: dict[str, list[str]],
                   codes: dict[str, np.ndarray], domain: dict[str, np.ndarray],
                   split_names: list[str], split_codes: np.ndarray) -> None:
    import h5py

    text = h5py.string_dtype("utf-8")
    for kind in kinds:
        group = file.create_group(f"kinds/{kind}")
        group.create_dataset("values", data=np.array(vocab[kind], dtype=object), dtype=text)
        group.create_dataset("codes", data=codes[kind], dtype=np.int32)
        group.create_dataset("domain", data=domain[kind], dtype=np.uint8)
    splits = file.create_group("splits")
    splits.create_dataset("names", data=np.array(split_names, dtype=object), dtype=text)
    splits.create_dataset("codes", data=split_codes, dtype=np.int32)


def _write_sources(file, entries: list[_Entry], rows: list[tuple[int, int]],
                   old: Store | None) -> None:
    import h5py

    text = h5py.string_dtype("utf-8")
    columns: dict[str, list[str]] = {k: [] for k in
                                     ("names", "origins", "manifests", "fingerprints", "files")}
    for entry in entries:
        if entry.new is None:
            record = old.sources[entry.old]  # type: ignore[union-attr,index]
            values = (record.name, record.origin, record.manifest, record.fingerprint,
                      json.dumps(record.files))
        else:
            manifest = entry.new.manifest
            values = (manifest.name, manifest.origin, manifest.text, manifest.fingerprint,
                      json.dumps(entry.new.files))
        for key, value in zip(columns, values):
            columns[key].append(value)
    group = file.create_group("sources")
    for key, values in columns.items():
        group.create_dataset(key, data=np.array(values, dtype=object), dtype=text)
    group.create_dataset("rows", data=np.asarray(rows, dtype=np.int64).reshape(-1, 2))
