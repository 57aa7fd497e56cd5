"""Reading a store: :func:`open_store` validates an HDF5 file and gives its columns and images.

The on-disk schema is documented in ``docs/store.md``. A store file may come from anywhere, so
:class:`Store` checks the format name and version, every dtype and every declared dimension
against limits, and every code against its vocabulary, before it hands anything out; each
failure is a one-line :class:`~tzkcli.errors.BadInputError` naming the HDF5 key.

The small columns (codes, vocabularies, domains, splits) are read into memory when the store
is opened; images are read on demand by :meth:`Store.images`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tzkcli.errors import BadInputError

FORMAT_NAME = "tzk-store"
FORMAT_VERSION = 1
DEFAULT_SHAPE = (1, 32, 32)

MAX_IMAGES = 1_000_000_000
MAX_SIDE = 4096
MAX_CHANNELS = 4
MAX_KINDS = 256
MAX_VALUES = 10_000_000
MAX_SPLITS = 64
MAX_SOURCES = 100_000
MAX_TEXT_CHARS = 1 << 20
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
READ_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class SourceRecord:
    """One ingested source as the store remembers it; ``rows`` is ``[start, stop)``."""

    name: str
    origin: str
    manifest: str
    fingerprint: str
    files: list[dict[str, str]]
    rows: tuple[int, int]


class ContentDigest:
    """sha256 over a store's content: shape, per kind its vocabulary, codes and domain, the
    split names and codes, then the images in row order (each piece length-prefixed).

    The sources table (manifest text, file hashes) is provenance and is not part of the
    digest: two stores with equal digests hold the same images with the same knowledge.
    """

    def __init__(self, shape: Sequence[int], kinds: Sequence[str],
                 columns: dict[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
                 split_names: Sequence[str], split_codes: np.ndarray, n_images: int) -> None:
        self._hash = hashlib.sha256(b"tzk-store-digest/1\n")
        self._piece(json.dumps([int(s) for s in shape]).encode())
        for kind in kinds:
            values, codes, domain = columns[kind]
            self._piece(json.dumps({"kind": kind, "values": list(values)}).encode("utf-8"))
            self._piece(np.ascontiguousarray(codes, dtype="<i4").tobytes())
            self._piece(np.ascontiguousarray(domain, dtype=np.uint8).tobytes())
        self._piece(json.dumps(list(split_names)).encode("utf-8"))
        self._piece(np.ascontiguousarray(split_codes, dtype="<i4").tobytes())
        self._remaining = n_images * int(np.prod(shape))
        self._hash.update(self._remaining.to_bytes(8, "little"))

    def _piece(self, data: bytes) -> None:
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)

    def update_images(self, block: np.ndarray) -> None:
        """Add the next rows of images (uint8, C order), in row order."""
        self._remaining -= block.size
        self._hash.update(np.ascontiguousarray(block, dtype=np.uint8).data)

    def hexdigest(self) -> str:
        if self._remaining != 0:
            raise ValueError(f"digest fed {self._remaining} image bytes fewer than declared")
        return self._hash.hexdigest()


class Store:
    """A validated, read-only tzk store. Use :func:`open_store`; close it (or use ``with``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"{self.path}: store not found; expected an HDF5 tzk store")
        try:
            is_hdf5 = h5py.is_hdf5(self.path)
        except OSError as error:
            raise BadInputError(f"{self.path}: cannot read ({error})") from None
        if not is_hdf5:
            raise BadInputError(f"{self.path}: not an HDF5 file; expected a tzk store")
        probe_open(self.path)
        try:
            self._file = h5py.File(self.path, "r", locking=False)
        except OSError as error:
            raise BadInputError(f"{self.path}: cannot open as HDF5 ({error})") from None
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise

    # validation -------------------------------------------------------------------------------

    def _fail(self, key: str, found: Any, expected: str) -> BadInputError:
        found = " ".join(str(found).split())  # a numpy repr spans lines
        return BadInputError(f"{self.path}: HDF5 key {key}: found {found}; expected {expected}")

    def _attr(self, name: str) -> Any:
        if name not in self._file.attrs:
            raise self._fail(f"/ attribute {name!r}", "nothing", "a tzk store attribute")
        try:
            return self._file.attrs[name]
        except (OSError, TypeError, ValueError) as error:
            raise self._fail(f"/ attribute {name!r}", f"an unreadable value ({error})",
                             "a tzk store attribute") from None

    def _text_attr(self, name: str) -> str:
        value = self._attr(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            raise self._fail(f"/ attribute {name!r}", type(value).__name__, "a string")
        return value

    def _dataset(self, key: str, dtype: str, shape: tuple[int | None, ...]) -> Any:
        import h5py

        node = self._file.get(key)
        if not isinstance(node, h5py.Dataset):
            raise self._fail(key, "nothing" if node is None else "a group", "a dataset")
        if dtype == "str":
            if h5py.check_string_dtype(node.dtype) is None:
                raise self._fail(key, f"dtype {node.dtype}", "UTF-8 strings")
        elif node.dtype != np.dtype(dtype):
            raise self._fail(key, f"dtype {node.dtype}", dtype)
        expected = tuple(n if s is None else s for n, s in zip(node.shape, shape))
        if len(node.shape) != len(shape) or node.shape != expected:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise self._fail(key, f"shape {list(node.shape)}", f"shape {want}")
        # a tiny file may declare a huge dataset it never wrote (read as gigabytes of fill)
        declared = node.size * node.dtype.itemsize
        if dtype != "str" and not node._filters and node.id.get_storage_size() < declared:
            raise self._fail(key, f"shape {list(node.shape)} with only "
                             f"{node.id.get_storage_size()} of {declared} bytes stored",
                             "every declared element written")
        return node

    def _strings(self, key: str, limit: int) -> list[str]:
        node = self._dataset(key, "str", (None,))
        if node.shape[0] > limit:
            raise self._fail(key, f"{node.shape[0]} entries", f"at most {limit}")
        values = [str(v) for v in node.asstr(errors="replace")[...]]
        if any(len(v) > MAX_TEXT_CHARS for v in values):
            raise self._fail(key, "a string too long", f"at most {MAX_TEXT_CHARS} characters")
        return values

    def _codes(self, key: str, n_values: int, allow_unknown: bool) -> np.ndarray:
        codes = self._dataset(key, "int32", (self._n,))[...]
        low = -1 if allow_unknown else 0
        if codes.size and (codes.min() < low or codes.max() >= n_values):
            bad = int(codes.min() if codes.min() < low else codes.max())
            raise self._fail(key, f"code {bad}", f"codes in [{low}, {n_values})")
        codes.flags.writeable = False
        return codes

    def _load(self) -> None:
        name = self._text_attr("format")
        if name != FORMAT_NAME:
            raise self._fail("/ attribute 'format'", repr(name[:40]), repr(FORMAT_NAME))
        version = self._attr("format_version")
        if not isinstance(version, (int, np.integer)) or version < 1:
            raise self._fail("/ attribute 'format_version'", repr(version), "an integer >= 1")
        if version > FORMAT_VERSION:
            raise BadInputError(
                f"{self.path}: store format_version {int(version)} is newer than this tzk reads "
                f"({FORMAT_VERSION}); expected version <= {FORMAT_VERSION} (upgrade tzk)"
            )
        self.format_version = int(version)
        self._row_map: RowMap | bool | None = None
        self._load_shape()
        self._load_kinds()
        self._load_splits()
        self._load_sources()
        digest = self._text_attr("digest")
        if not DIGEST_PATTERN.fullmatch(digest):
            raise self._fail("/ attribute 'digest'", repr(digest[:70]), "64 lowercase hex digits")
        self.digest = digest

    def _load_shape(self) -> None:
        shape = np.asarray(self._attr("shape"))
        ok = (shape.shape == (3,) and shape.dtype.kind in "iu" and 1 <= shape[0] <= MAX_CHANNELS
              and all(1 <= s <= MAX_SIDE for s in shape[1:]))
        if not ok:
            raise self._fail("/ attribute 'shape'", shape.tolist(),
                             f"[C, H, W] with C <= {MAX_CHANNELS}, sides <= {MAX_SIDE}")
        self.shape: tuple[int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self._images = self._dataset("/images", "uint8", (None, *self.shape))
        self._n = int(self._images.shape[0])
        if self._n > MAX_IMAGES:
            raise self._fail("/images", f"{self._n} images", f"at most {MAX_IMAGES}")

    def _load_kinds(self) -> None:
        kinds = self._attr("kinds")
        kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in np.atleast_1d(kinds)]
        valid = (kinds and kinds[0] == "dataset" and len(kinds) <= MAX_KINDS
                 and len(set(kinds)) == len(kinds)
                 and all(NAME_PATTERN.fullmatch(k) for k in kinds))
        if not valid:
            raise self._fail("/ attribute 'kinds'", kinds[:8],
                             "distinct kind names, 'dataset' first")
        self.kinds: list[str] = kinds
        self._values: dict[str, list[str]] = {}
        self._codes_of: dict[str, np.ndarray] = {}
        self._domain: dict[str, np.ndarray] = {}
        for kind in kinds:
            self._values[kind] = self._strings(f"/kinds/{kind}/values", MAX_VALUES)
        n_datasets = len(self._values["dataset"])
        for kind in kinds:
            n_values = len(self._values[kind])
            key = f"/kinds/{kind}/codes"
            self._codes_of[kind] = self._codes(key, n_values, allow_unknown=kind != "dataset")
            domain_key = f"/kinds/{kind}/domain"
            domain = self._dataset(domain_key, "uint8", (n_datasets, n_values))[...]
            if domain.size and domain.max() > 1:
                raise self._fail(domain_key, f"value {int(domain.max())}", "0 or 1")
            domain = domain.astype(bool)
            domain.flags.writeable = False
            self._domain[kind] = domain

    def _load_splits(self) -> None:
        self.split_names: list[str] = self._strings("/splits/names", MAX_SPLITS)
        self._split_codes = self._codes("/splits/codes", len(self.split_names), False)

    def _load_sources(self) -> None:
        names = self._strings("/sources/names", MAX_SOURCES)
        m = len(names)
        columns = {key: self._strings(f"/sources/{key}", MAX_SOURCES)
                   for key in ("origins", "manifests", "fingerprints", "files")}
        rows = self._dataset("/sources/rows", "int64", (m, 2))[...]
        for key, column in columns.items():
            if len(column) != m:
                raise self._fail(f"/sources/{key}", f"{len(column)} entries", f"{m}")
        if names != self._values["dataset"]:
            raise self._fail("/sources/names", names[:8], "the values of /kinds/dataset/values")
        self.sources: list[SourceRecord] = []
        for i, name in enumerate(names):
            start, stop = int(rows[i, 0]), int(rows[i, 1])
            if not 0 <= start <= stop <= self._n:
                raise self._fail("/sources/rows", [start, stop], f"rows within [0, {self._n}]")
            try:
                files = json.loads(columns["files"][i])
            except ValueError:
                raise self._fail("/sources/files", "invalid JSON", "JSON lists") from None
            self.sources.append(SourceRecord(name, columns["origins"][i],
                                             columns["manifests"][i],
                                             columns["fingerprints"][i], files, (start, stop)))

    # the contract -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file and the memory map; columns already returned stay valid."""
        self._row_map = None
        self._file.close()

    def _kind(self, kind: str) -> str:
        if kind not in self._values:
            raise BadInputError(
                f"{self.path}: no kind {kind!r}; expected one of: {', '.join(self.kinds)}"
            )
        return kind

    def values(self, kind: str) -> list[str]:
        """The vocabulary of ``kind``: ``codes(kind)`` index into it."""
        return list(self._values[self._kind(kind)])

    def codes(self, kind: str) -> np.ndarray:
        """int32 ``[N]`` codes of ``kind`` (read-only), -1 where unknown."""
        return self._codes_of[self._kind(kind)]

    def domain(self, kind: str) -> np.ndarray:
        """bool ``[n_datasets, n_values]``: which values each dataset's images may take.

        An all-false row means the kind does not apply to that dataset.
        """
        return self._domain[self._kind(kind)]

    @property
    def split_codes(self) -> np.ndarray:
        """int32 ``[N]``: index into :attr:`split_names` of each image's split."""
        return self._split_codes

    def indices(self, split: str | None = None, dataset: str | None = None) -> np.ndarray:
        """Sorted int64 rows of the given split and/or dataset (all rows if both are None)."""
        mask = np.ones(self._n, dtype=bool)
        if split is not None:
            if split not in self.split_names:
                raise BadInputError(
                    f"{self.path}: no split {split!r}; expected one of: "
                    + ", ".join(self.split_names)
                )
            mask &= self._split_codes == self.split_names.index(split)
        if dataset is not None:
            datasets = self._values["dataset"]
            if dataset not in datasets:
                raise BadInputError(
                    f"{self.path}: no dataset {dataset!r}; expected one of: "
                    + ", ".join(datasets)
                )
            mask &= self._codes_of["dataset"] == datasets.index(dataset)
        return np.flatnonzero(mask).astype(np.int64)

    def images(self, indices: Sequence[int] | np.ndarray | slice) -> np.ndarray:
        """uint8 ``[n, C, H, W]`` images of the rows ``indices`` (any order, repeats allowed).

        Scattered rows of an unfiltered chunked store (what ``tzk ingest`` writes) are
        gathered straight from a read-only memory map of the file at the chunks' byte
        offsets, about 20 times faster than HDF5 point selections; other layouts go through
        h5py.
        """
        try:
            if isinstance(indices, slice):
                return self._images[indices]
            rows = np.asarray(indices, dtype=np.int64).reshape(-1)
            if rows.size > 32:
                if self._row_map is None:
                    self._row_map = RowMap.of(self.path, self._images) or False
                if self._row_map:
                    return self._row_map.gather(rows)
            return read_rows(self._images, rows)
        except OSError as error:
            raise self._unreadable_images(error) from None

    def _unreadable_images(self, error: OSError) -> BadInputError:
        """A damaged chunk that HDF5 cannot read: one line naming ``/images``."""
        line = " ".join(str(error).split())[:160]
        return self._fail("/images", f"unreadable image data ({line})",
                          "readable image chunks (the store is damaged)")

    def image_blocks(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Rows ``[start, stop)`` as consecutive uint8 blocks of at most 32 MiB each."""
        stop = self._n if stop is None else stop
        step = max(1, READ_BLOCK_BYTES // int(np.prod(self.shape)))
        for first in range(start, stop, step):
            try:
                block = self._images[first:min(first + step, stop)]
            except OSError as error:
                raise self._unreadable_images(error) from None
            yield block

    def compute_digest(self) -> str:
        """Recompute the content digest from the file (reads every image)."""
        columns = {k: (self._values[k], self._codes_of[k], self._domain[k]) for k in self.kinds}
        digest = ContentDigest(self.shape, self.kinds, columns, self.split_names,
                               self._split_codes, self._n)
        for block in self.image_blocks():
            digest.update_images(block)
        return digest.hexdigest()


def read_rows(images: Any, rows: np.ndarray) -> np.ndarray:
    """Read ``images[rows]`` from an HDF5 dataset in few large reads.

    h5py reads a point list slowly and only in increasing order, so rows are sorted and
    deduplicated, read as contiguous runs (or as their bounding span when it is dense), and
    put back in the requested order.
    """
    n = images.shape[0]
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        bad = int(rows.min() if rows.min() < 0 else rows.max())
        raise IndexError(f"row {bad} out of range for a store of {n} images")
    unique, inverse = np.unique(rows, return_inverse=True)
    if not unique.size:
        return np.empty((0, *images.shape[1:]), dtype=np.uint8)

    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [unique.size]])
    span = int(unique[-1] - unique[0] + 1)
    row_bytes = int(np.prod(images.shape[1:]))
    if len(starts) <= 32:
        parts = [images[int(unique[a]):int(unique[b - 1]) + 1] for a, b in zip(starts, stops)]
        block = np.concatenate(parts) if len(parts) > 1 else parts[0]
    elif span <= 4 * unique.size or span * row_bytes <= READ_BLOCK_BYTES:
        block = images[int(unique[0]):int(unique[-1]) + 1][unique - unique[0]]
    else:
        block = images[unique]
    return block[inverse.reshape(-1)]


class RowMap:
    """Rows of an unfiltered, row-chunked HDF5 image dataset, read through ``numpy.memmap``.

    HDF5 stores each chunk's bytes contiguously at a byte offset it reports; with no filters
    (no compression) row ``r`` is at ``offset[r // k] + (r % k) · row_bytes`` for chunks of
    ``k`` whole rows. Every offset is checked against the file size before it is used.
    """

    def __init__(self, path: Path, offsets: np.ndarray, rows_per_chunk: int,
                 shape: tuple[int, ...]) -> None:
        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        self.offsets = offsets
        self.rows_per_chunk = rows_per_chunk
        self.shape = shape
        self.n = int(shape[0])
        self.row_bytes = int(np.prod(shape[1:]))

    @classmethod
    def of(cls, path: Path, images: Any) -> RowMap | None:
        """The map of ``images``, or None when its layout does not allow one."""
        chunks = images.chunks
        if chunks is None or images._filters or tuple(chunks[1:]) != images.shape[1:]:
            return None
        k, n = int(chunks[0]), int(images.shape[0])
        chunk_bytes = k * int(np.prod(images.shape[1:]))
        try:
            offsets = np.array([
                images.id.get_chunk_info_by_coord((i * k,) + (0,) * (images.ndim - 1))
                .byte_offset for i in range((n + k - 1) // k)
            ], dtype=np.int64)
        except (AttributeError, KeyError, OSError, RuntimeError, TypeError, ValueError):
            return None  # an old HDF5, or unallocated chunks
        if offsets.size and (offsets.min() < 0 or offsets.max() + chunk_bytes
                             > path.stat().st_size):
            return None
        return cls(path, offsets, k, tuple(images.shape))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            bad = int(rows.min() if rows.min() < 0 else rows.max())
            raise IndexError(f"row {bad} out of range for a store of {self.n} images")
        starts = self.offsets[rows // self.rows_per_chunk]
        starts += (rows % self.rows_per_chunk) * self.row_bytes
        flat = self.map[starts[:, None] + np.arange(self.row_bytes)]
        return flat.reshape(len(rows), *self.shape[1:])


PROBE_SECONDS = 120.0
_probed: set[tuple[int, int, int, int]] = set()
_in_probe = False
HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def probe_open(path: Path) -> None:
    """Open and validate ``path`` in a forked child process before this process opens it.

    A crafted HDF5 file can crash the HDF5 C library (a segfault, an abort), which no Python
    ``except`` catches. The child opens the file as :class:`Store` does, reads the first and
    last image and the chunk index, and exits; if it dies by a signal the file is refused with
    a one-line :class:`BadInputError` and this process (a long run) lives on. A file (device,
    inode, size, modification time) is probed once per process.

    Warning:
        Only what the probe reads is covered: a crash that a later read of other image chunks
        would cause still happens in the caller. There is no probe without ``os.fork``
        (Windows), inside a probe, or when the child does not finish within ``PROBE_SECONDS``
        (the file is then opened in the caller as usual).
    """
    if _in_probe or not hasattr(os, "fork"):
        return
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _probed:
        return
    pending: list[int] = []
    previous = _defer_signals(pending)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: see Warning
            pid = os.fork()
    except BaseException:
        _restore_signals(previous)
        raise
    if pid == 0:
        _restore_signals(previous)
        _probe_child(path)
    status = _wait_for_probe(pid, previous, pending)
    if status is not None and os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise BadInputError(
            f"{path}: the HDF5 library crashed ({name}) reading it in a probe process; "
            "expected a well-formed HDF5 file (this one is damaged or crafted)"
        )
    _probed.add(key)


def _probe_child(path: Path) -> None:
    """In the forked child: read what the parent will read, then exit at once."""
    global _in_probe
    _in_probe = True
    code = 0
    try:
        _probe_work(path)
    except BaseException:
        code = 1  # a Python-level error: the parent's own open reports it
    finally:
        os._exit(code)


def _probe_work(path: Path) -> None:
    with Store(path) as store:
        if len(store):
            store.images(np.array([0, len(store) - 1]))
            RowMap.of(store.path, store._images)


def _defer_signals(pending: list[int]) -> dict[int, Any]:
    """Record SIGINT and SIGTERM in ``pending`` instead of handling them; return the handlers
    replaced (for :func:`_restore_signals`).

    A signal handled while Python runs the at-fork callbacks (logging registers some) raises
    inside one of them, where it is printed as "Exception ignored" and lost, and Ctrl-C with
    it. Blocking the signals in this thread is not enough: the kernel hands a signal sent to
    the process to any thread that does not block it (torch's OpenMP workers), and Python
    still runs the handler in the main thread. Handlers run in the main thread only, so
    elsewhere there is nothing to defer; a handler not installed from Python is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for number in HELD_SIGNALS:
        handler = signal.getsignal(number)
        if handler is not None:
            previous[number] = signal.signal(number, lambda n, _frame: pending.append(n))
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


def _wait_for_probe(pid: int, previous: dict[int, Any], pending: list[int]) -> int | None:
    """The child's wait status, or None when it ran past ``PROBE_SECONDS`` (then killed).

    Restores the signal handlers first and delivers what was deferred during the fork, so it
    is raised here, where the child is killed and reaped before it propagates.
    """
    deadline = time.monotonic() + PROBE_SECONDS
    delay = 0.0005
    try:
        _restore_signals(previous)
        for number in pending:
            signal.raise_signal(number)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            time.sleep(delay)
            delay = min(2 * delay, 0.02)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open the store at ``path`` read-only, validating it (see :class:`Store`).

    Raises:
        BadInputError: missing, not HDF5, another format, a newer version, or invalid content;
            the message names the HDF5 key.
    """
    return Store(path)

