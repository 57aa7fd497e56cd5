"""Generic source readers: IDX pairs, image-folder trees (or a zip of one), PNG atlases, .npz.

Each reader turns the bytes of one file into native images and raw knowledge values; nothing
here knows about any particular dataset. Every input is untrusted: sizes declared in headers
are checked against limits before anything is allocated, and every failure is a
:class:`~tzkcli.errors.BadInputError` naming the file (and the zip member), what was found and
what was expected.

Images are decoded with Pillow (installed with torchvision): it reads PNG (1-bit, grey, RGB(A),
palette), JPEG, BMP, GIF and TIFF. Colour images are converted to grey with Pillow's
ITU-R 601-2 luma (``L`` mode); an alpha channel is dropped.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tzkcli.errors import BadInputError

MAX_IMAGES = 100_000_000
MAX_SIDE = 4096
MAX_FILE_BYTES = 16 << 30
MAX_MEMBER_BYTES = 64 << 20
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"

Progress = Callable[[int, int], None]


@dataclass
class RawColumn:
    """Raw values of one kind for n images: ``values[codes[i]]`` is image i's raw value."""

    values: list[str]
    codes: np.ndarray  # int32 [n]


@dataclass
class NativeImages:
    """Images as the source stores them, before any transform.

    ``pixels`` is one uint8 array ``[n, C, h, w]``, or a list of ``[C, h, w]`` arrays when the
    images of a folder tree differ in size. ``names`` name each image in error messages.
    """

    pixels: np.ndarray | list[np.ndarray]
    kinds: dict[str, RawColumn]
    names: Sequence[str] | None = None

    def __len__(self) -> int:
        return len(self.pixels)


def sha256_of_file(path: Path) -> str:
    """The sha256 of a file, or of a directory tree (see ``docs/manifests.md``).

    A directory's hash is the sha256 of the lines ``"<sha256 of file>  <relative path>\\n"`` of
    its files (hidden ones excluded) in sorted order of their relative POSIX paths.
    """
    if path.is_dir():
        lines = [
            f"{sha256_of_file(file)}  {relative}\n"
            for relative, file in _tree_files(path)
        ]
        return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for file in root.rglob("*"):
        relative = file.relative_to(root).as_posix()
        if file.is_file() and not _hidden(relative):
            files.append((relative, file))
    return sorted(files)


def shown(text: str) -> str:
    """``text`` with non-printable characters escaped, so that a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/"))


# IDX ------------------------------------------------------------------------------------------

def decompress_if_gzip(data: bytes, origin: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """Return ``data`` unchanged, or gunzipped when it starts with the gzip magic bytes.

    Raises:
        BadInputError: a corrupt or truncated gzip stream, or one larger than ``limit``.
    """
    if not data.startswith(GZIP_MAGIC):
        return data
    pieces, total, rest = [], 0, data
    while rest:
        stream = zlib.decompressobj(wbits=31)
        try:
            piece = stream.decompress(rest, limit + 1 - total)
        except zlib.error as error:
            raise BadInputError(f"{origin}: corrupt gzip stream ({error}); expected gzip data")
        total += len(piece)
        if total > limit:
            raise BadInputError(f"{origin}: gunzips to more than {limit} bytes; too large")
        if not stream.eof:
            raise BadInputError(f"{origin}: truncated gzip stream; expected a complete file")
        pieces.append(piece)
        rest = stream.unused_data
    return b"".join(pieces)


def read_idx(data: bytes, origin: str) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into an array of its declared type and shape.

    Raises:
        BadInputError: a bad magic number, an unknown type code, dimensions over the limits,
            or a body shorter or longer than the header declares.
    """
    data = decompress_if_gzip(data, origin)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BadInputError(
            f"{origin}: not an IDX file (first bytes {data[:4].hex() or 'empty'}); "
            "expected magic 0x0000TTNN"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise BadInputError(
            f"{origin}: IDX type code 0x{type_code:02x}; expected one of "
            + ", ".join(f"0x{code:02x}" for code in IDX_DTYPES)
        )
    if not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise BadInputError(f"{origin}: IDX header with {ndim} dimensions is truncated or invalid")

    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[type_code])
    if dims[0] > MAX_IMAGES or any(d > MAX_SIDE for d in dims[1:]):
        raise BadInputError(f"{origin}: IDX dimensions {dims} exceed the limits")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = memoryview(data)[4 + 4 * ndim:]
    if len(body) != expected:
        what = "truncated" if len(body) < expected else "has trailing bytes"
        raise BadInputError(
            f"{origin}: IDX body {what}: {len(body)} bytes, expected {expected} for shape {dims}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def idx_images(array: np.ndarray, origin: str) -> np.ndarray:
    """IDX images ``[n, h, w]`` uint8 as ``[n, 1, h, w]``."""
    if array.ndim != 3 or array.dtype != np.uint8:
        raise BadInputError(
            f"{origin}: IDX of {array.dtype} with shape {list(array.shape)}; "
            "expected uint8 images [n, height, width]"
        )
    return array[:, None, :, :]


def integer_column(array: np.ndarray, origin: str) -> RawColumn:
    """Integer labels ``[n]`` as raw values in numeric order."""
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise BadInputError(
            f"{origin}: labels of {array.dtype} with shape {list(array.shape)}; "
            "expected integers [n]"
        )
    unique, codes = np.unique(array, return_inverse=True)
    return RawColumn([str(int(v)) for v in unique], codes.astype(np.int32))


def string_column(strings: Sequence[str]) -> RawColumn:
    """String labels as raw values in sorted order."""
    unique, codes = np.unique(np.asarray(strings, dtype=object).astype(str), return_inverse=True)
    return RawColumn([str(v) for v in unique], codes.astype(np.int32).reshape(-1))


def constant_column(value: str, n: int) -> RawColumn:
    """The same raw value for all n images."""
    return RawColumn([value], np.zeros(n, dtype=np.int32))


# decoded images -------------------------------------------------------------------------------

def decode_image(data: bytes, origin: str, color: str) -> np.ndarray:
    """Decode one image file with Pillow into uint8 ``[C, h, w]`` (C = 1 grey, 3 rgb).

    Raises:
        BadInputError: not an image Pillow can read, truncated or corrupt, or too large.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if not (1 <= width <= MAX_SIDE * 8 and 1 <= height <= MAX_SIDE * 8):
                raise BadInputError(
                    f"{origin}: image of {width}x{height} pixels; expected sides up to "
                    f"{MAX_SIDE * 8}"
                )
            pixels = np.asarray(image.convert("L" if color == "gray" else "RGB"))
    except BadInputError:
        raise
    except Exception as error:  # Pillow raises many types for corrupt files
        reason = " ".join(str(error).split()) or type(error).__name__
        raise BadInputError(
            f"{origin}: cannot decode image ({reason}); expected a valid image file"
        ) from None
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def read_atlas(data: bytes, origin: str, color: str, tile: tuple[int, int],
               count: int | None) -> np.ndarray:
    """Cut a PNG atlas into its tiles in row-major order: uint8 ``[n, C, th, tw]``.

    Raises:
        BadInputError: the atlas is not a whole number of tiles, or has fewer than ``count``.
    """
    sheet = decode_image(data, origin, color)
    channels, height, width = sheet.shape
    th, tw = tile
    if height % th or width % tw:
        raise BadInputError(
            f"{origin}: atlas of {width}x{height} pixels is not a whole number of "
            f"{tw}x{th} tiles (tile = [{th}, {tw}])"
        )
    rows, cols = height // th, width // tw
    capacity = rows * cols
    if count is not None and count > capacity:
        raise BadInputError(f"{origin}: count = {count}, but the atlas holds {capacity} tiles")

    tiles = sheet.reshape(channels, rows, th, cols, tw).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(tiles.reshape(capacity, channels, th, tw)[: count or capacity])


def open_zip(data: bytes, origin: str) -> zipfile.ZipFile:
    """Open zip bytes, or raise a one-line :class:`BadInputError`."""
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except Exception as error:  # zipfile raises many types for damaged archives
        raise BadInputError(f"{origin}: not a valid zip file ({error}); expected a zip") from None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, origin: str,
                limit: int = MAX_MEMBER_BYTES) -> bytes:
    """Read one zip member, checking its declared size first and its CRC after."""
    where = f"{origin}: member {shown(info.filename)}"
    if info.file_size > limit:
        raise BadInputError(f"{where}: {info.file_size} bytes; expected at most {limit}")
    try:
        return archive.read(info)
    except Exception as error:  # zipfile raises many types for damaged archives
        raise BadInputError(f"{where}: corrupt ({error}); expected a readable member") from None


def tree_entries(path: Path, data: bytes | None, origin: str,
                 extensions: tuple[str, ...]) -> Iterable[tuple[str, Callable[[], bytes]]]:
    """The image files of a folder tree or of a zip of one, sorted by relative path.

    Yields ``(relative POSIX path, read)`` pairs; hidden entries and ``__MACOSX`` are skipped.
    """
    def wanted(name: str) -> bool:
        return not _hidden(name) and Path(name).suffix.lower() in extensions

    if data is None:
        for relative, file in _tree_files(path):
            if wanted(relative):
                yield relative, file.read_bytes
        return
    archive = open_zip(data, origin)
    members = sorted(
        (info for info in archive.infolist()
         if info.filename and not info.is_dir() and wanted(info.filename)),
        key=lambda info: info.filename,
    )
    for info in members:
        yield info.filename, (lambda info=info: read_member(archive, info, origin))


def read_image_tree(path: Path, data: bytes | None, origin: str, color: str,
                    extensions: tuple[str, ...], folder_kinds: dict[str, tuple[int, ...]],
                    progress: Progress | None = None) -> NativeImages:
    """Read every image of a folder tree (``data is None``) or of a zip of one.

    ``folder_kinds`` maps a kind to the folder depths its raw value is made of: depth 0 is the
    top folder of the tree, and the names at the given depths are joined with ``/``.

    Raises:
        BadInputError: no images, a corrupt member or image, or an image without a folder at
            a requested depth.
    """
    entries = list(tree_entries(path, data, origin, extensions))
    if not entries:
        raise BadInputError(
            f"{origin}: no image files ({', '.join(extensions)}) found; expected a folder tree"
        )
    pixels, names, raw = [], [], {kind: [] for kind in folder_kinds}
    for done, (name, read) in enumerate(entries):
        folders = name.split("/")[:-1]
        for kind, depths in folder_kinds.items():
            if max(depths) >= len(folders):
                raise BadInputError(
                    f"{origin}: {shown(name)} has {len(folders)} folders; kind {kind!r} needs "
                    f"folder depth {max(depths)}"
                )
            raw[kind].append("/".join(folders[d] for d in depths))
        pixels.append(decode_image(read(), f"{origin}: member {shown(name)}", color))
        names.append(name)
        if progress is not None and (done % 256 == 0 or done + 1 == len(entries)):
            progress(done + 1, len(entries))

    kinds = {kind: string_column(values) for kind, values in raw.items()}
    return NativeImages(_stack_if_uniform(pixels), kinds, names)


def _stack_if_uniform(pixels: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    first = pixels[0].shape
    if all(p.shape == first for p in pixels):
        return np.stack(pixels)
    return pixels


# npz ------------------------------------------------------------------------------------------

def read_npz_array(data: bytes, origin: str, key: str) -> np.ndarray:
    """Read array ``key`` of an ``.npz`` without unpickling and with its header checked first.

    Raises:
        BadInputError: not a zip, no such array, an object dtype, or a size that does not match
            the header.
    """
    archive = open_zip(data, origin)
    member = f"{key}.npy"
    try:
        info = archive.getinfo(member)
    except KeyError:
        names = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
        raise BadInputError(
            f"{origin}: no array {key!r}; expected one of: {', '.join(names) or 'none'}"
        ) from None
    raw = read_member(archive, info, origin, limit=MAX_FILE_BYTES)
    where = f"{origin}: array {key!r}"
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = header(stream)
    except Exception as error:  # numpy raises ValueError and others for bad headers
        raise BadInputError(f"{where}: invalid .npy header ({error})") from None
    if dtype.hasobject or dtype.kind not in "biuUS":
        raise BadInputError(f"{where}: dtype {dtype}; expected integers, booleans or strings")
    count = int(np.prod(shape, dtype=np.int64))
    body = raw[stream.tell():]
    if len(body) != count * dtype.itemsize:
        raise BadInputError(
            f"{where}: {len(body)} bytes of data, expected {count * dtype.itemsize} for shape "
            f"{list(shape)} and dtype {dtype}"
        )
    array = np.frombuffer(body, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C")


def npz_images(array: np.ndarray, origin: str, layout: str) -> np.ndarray:
    """An image array in ``layout`` (NHW, NHWC or NCHW) as uint8 ``[n, C, h, w]``."""
    ndim = len(layout)
    if array.dtype != np.uint8 or array.ndim != ndim:
        raise BadInputError(
            f"{origin}: {array.dtype} array of shape {list(array.shape)}; expected uint8 "
            f"images in layout {layout}"
        )
    if layout == "NHW":
        array = array[:, None]
    elif layout == "NHWC":
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3) or any(s > MAX_SIDE for s in array.shape[2:]):
        raise BadInputError(
            f"{origin}: images of shape {list(array.shape[1:])} (C, h, w); expected 1 or 3 "
            f"channels and sides up to {MAX_SIDE}"
        )
    return np.ascontiguousarray(array)


def npz_column(array: np.ndarray, origin: str) -> RawColumn:
    """A label array of an ``.npz``: integers, booleans or strings, ``[n]``."""
    if array.ndim != 1:
        raise BadInputError(f"{origin}: labels of shape {list(array.shape)}; expected [n]")
    if array.dtype.kind == "b":
        array = array.astype(np.int64)
    if array.dtype.kind in "iu":
        return integer_column(array, origin)
    if array.dtype.kind == "S":
        try:
            strings = [value.decode("utf-8") for value in array.tolist()]
        except UnicodeDecodeError:
            raise BadInputError(f"{origin}: labels are not UTF-8 text") from None
        return string_column(strings)
    return string_column(array.tolist())
