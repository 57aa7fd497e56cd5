"""Source manifests: one TOML file describing one dataset and how to ingest it.

A manifest names the dataset, its license and citation, its files (each with a sha256), the
parts its images come from (one generic reader each), the knowledge kinds it provides and where
each kind's values come from, how splits are made, and how its images map to the store's shape.
The format is documented in ``docs/manifests.md``; :func:`parse_manifest` is its only parser
and rejects unknown keys, missing fields and wrong types with one line naming the field.

Paths inside a manifest are relative to a *data root* given at ingest time, never to the
manifest file, so that the same manifest works on every machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tzkcli.errors import BadInputError

MANIFEST_VERSION = 1
READERS = ("idx", "image-tree", "atlas", "npz")
POLARITIES = ("bright-on-dark", "dark-on-bright")
COLORS = ("gray", "rgb")
PADS = ("none", "center")
LAYOUTS = ("NHW", "NHWC", "NCHW")
MAX_SIDE = 4096
MAX_MANIFEST_BYTES = 1 << 20

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
RESERVED_KINDS = ("dataset",)

# which key of a kind source each reader understands, besides ``constant``
KIND_SOURCE_KEYS = {"idx": "idx", "image-tree": "folders", "atlas": None, "npz": "array"}


@dataclass(frozen=True)
class FileEntry:
    """One file (or directory, for ``image-tree``) of a source, relative to the data root."""

    key: str
    path: str
    sha256: str


@dataclass(frozen=True)
class KindSpec:
    """A knowledge kind the source provides: values are ``NAMESPACE/RAW``."""

    name: str
    namespace: str
    values: tuple[str, ...] | None = None


@dataclass(frozen=True)
class KindSource:
    """Where one part takes a kind's raw values from (exactly one field is set)."""

    idx: str | None = None
    folders: tuple[int, ...] | None = None
    array: str | None = None
    constant: str | None = None


@dataclass(frozen=True)
class Part:
    """One reader call: its images, the split they belong to, and their kinds."""

    index: int
    reader: str
    images: str
    split: str | None
    kinds: dict[str, KindSource]
    tile: tuple[int, int] | None = None
    count: int | None = None
    array: str | None = None
    layout: str = "NHW"
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class SplitRule:
    """A seeded held-out fraction for images of parts that name no split."""

    held_out: str
    fraction: float
    seed: int
    rest: str


@dataclass(frozen=True)
class Transform:
    """How the source's images map to the store: polarity, colour, resize, pad."""

    polarity: str = "bright-on-dark"
    color: str = "gray"
    resize: tuple[int, int] | None = None
    pad: str = "none"


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. ``origin`` names it in error messages."""

    origin: str
    text: str
    name: str
    license: str
    citation: str
    description: str
    url: str
    dedupe: bool
    files: dict[str, FileEntry]
    kinds: dict[str, KindSpec]
    parts: tuple[Part, ...]
    split: SplitRule | None
    transform: Transform
    data: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 of the parsed manifest (comments and layout do not count).

        The file hashes are part of the manifest, so an equal fingerprint means the same
        source files, read the same way.
        """
        canonical = json.dumps(self.data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _Fields:
    """A TOML table being consumed: every key must be read once, unknown keys are errors."""

    def __init__(self, origin: str, where: str, table: Any) -> None:
        self.origin = origin
        self.where = where
        if not isinstance(table, dict):
            self.fail("", table, "a table")
        self.table: dict[str, Any] = dict(table)

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, value: Any, expected: str) -> None:
        field_name = self.name(key) if key else (self.where or "top level")
        found = _describe(value)
        raise BadInputError(f"{self.origin}: {field_name}: found {found}; expected {expected}")

    def take(self, key: str, kind: type | tuple[type, ...], expected: str,
             default: Any = ..., ) -> Any:
        if key not in self.table:
            if default is ...:
                raise BadInputError(
                    f"{self.origin}: {self.name(key)}: missing; expected {expected}"
                )
            return default
        value = self.table.pop(key)
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            self.fail(key, value, expected)
        if not isinstance(value, kind):
            self.fail(key, value, expected)
        return value

    def text(self, key: str, default: Any = ...) -> str:
        value = self.take(key, str, "a string", default)
        if value is not None and len(value) > 10_000:
            self.fail(key, value, "a string of at most 10000 characters")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        expected = "one of " + ", ".join(f'"{c}"' for c in choices)
        value = self.take(key, str, expected, default)
        if value not in choices:
            self.fail(key, value, expected)
        return value

    def integer(self, key: str, low: int, high: int, default: Any = ...) -> int:
        expected = f"an integer in [{low}, {high}]"
        value = self.take(key, int, expected, default)
        if value is not None and not low <= value <= high:
            self.fail(key, value, expected)
        return value

    def pattern(self, key: str, regex: re.Pattern[str], expected: str,
                default: Any = ...) -> str:
        value = self.take(key, str, expected, default)
        if value is not None and not regex.fullmatch(value):
            self.fail(key, value, expected)
        return value

    def pair(self, key: str, default: Any = ...) -> tuple[int, int] | None:
        expected = f"[height, width], two integers in [1, {MAX_SIDE}]"
        value = self.take(key, list, expected, default)
        if value is None:
            return None
        ok = len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in value
        )
        if not ok:
            self.fail(key, value, expected)
        return int(value[0]), int(value[1])

    def sub(self, key: str) -> _Fields:
        return _Fields(self.origin, self.name(key), self.take(key, dict, "a table"))

    def optional_sub(self, key: str) -> _Fields | None:
        value = self.take(key, dict, "a table", None)
        return None if value is None else _Fields(self.origin, self.name(key), value)

    def done(self) -> None:
        if self.table:
            key = sorted(self.table)[0]
            raise BadInputError(
                f"{self.origin}: {self.name(key)}: unknown key; expected only documented keys "
                "(see docs/manifests.md)"
            )


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array {_short(value)}"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {_short(value)}"
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def load_manifest(path: str | Path) -> Manifest:
    """Read and parse the manifest at ``path``.

    Raises:
        BadInputError: the file is missing, unreadable, not UTF-8 TOML, or not a valid manifest.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(
            f"{path}: manifest not found; expected an existing TOML file"
        ) from None
    except OSError as error:
        raise BadInputError(f"{path}: cannot read manifest ({error.strerror})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadInputError(
            f"{path}: manifest of {len(raw)} bytes; expected at most {MAX_MANIFEST_BYTES}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError(
            f"{path}: not UTF-8 text (byte {error.start}); expected a TOML manifest"
        ) from None
    return parse_manifest(text, origin=str(path))


def parse_manifest(text: str, origin: str = "<manifest>") -> Manifest:
    """Parse manifest ``text``; ``origin`` names it in error messages.

    Raises:
        BadInputError: invalid TOML, an unknown key, a missing field or a wrong type; the
            message names the field (``parts[1].split``), the value found and what was expected.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = " ".join(str(error).split())
        raise BadInputError(f"{origin}: not valid TOML ({message})") from None

    top = _Fields(origin, "", data)
    version = top.take("tzk_manifest", int, f"the manifest format version {MANIFEST_VERSION}")
    if version != MANIFEST_VERSION:
        top.fail("tzk_manifest", version, f"the manifest format version {MANIFEST_VERSION}")

    dataset = top.sub("dataset")
    name = dataset.pattern("name", NAME_PATTERN, "a name matching [a-z][a-z0-9_-]{0,63}")
    license_ = dataset.text("license")
    citation = dataset.text("citation")
    description = dataset.text("description", "")
    url = dataset.text("url", "")
    dedupe = dataset.take("dedupe", bool, "true or false", False)
    dataset.done()

    files = _parse_files(top)
    kinds = _parse_kinds(top, name)
    transform = _parse_transform(top)
    parts = _parse_parts(top, files, kinds)
    split = _parse_split(top, parts)
    top.done()

    return Manifest(
        origin=origin, text=text, name=name, license=license_, citation=citation,
        description=description, url=url, dedupe=dedupe, files=files, kinds=kinds,
        parts=parts, split=split, transform=transform, data=data,
    )


def _parse_files(top: _Fields) -> dict[str, FileEntry]:
    table = top.sub("files")
    if not table.table:
        table.fail("", {}, "at least one file")
    files = {}
    for key in sorted(table.table):
        if not NAME_PATTERN.fullmatch(key):
            table.fail(key, key, "a file key matching [a-z][a-z0-9_-]{0,63}")
        entry = table.sub(key)
        path = entry.text("path")
        if not path or Path(path).is_absolute() or ".." in Path(path).parts:
            entry.fail("path", path, "a non-empty path relative to the data root, without '..'")
        sha256 = entry.pattern("sha256", SHA256_PATTERN, "64 lowercase hex digits")
        entry.done()
        files[key] = FileEntry(key, path, sha256)
    table.done()
    return files


def _parse_kinds(top: _Fields, dataset: str) -> dict[str, KindSpec]:
    table = top.optional_sub("kinds")
    if table is None:
        return {}
    kinds = {}
    for key in sorted(table.table):
        if not NAME_PATTERN.fullmatch(key) or key in RESERVED_KINDS:
            table.fail(key, key, "a kind name matching [a-z][a-z0-9_-]{0,63}, not 'dataset'")
        spec = table.sub(key)
        namespace = spec.pattern(
            "namespace", NAME_PATTERN, "a namespace matching [a-z][a-z0-9_-]{0,63}", dataset
        )
        values = spec.take("values", list, "an array of strings", None)
        if values is not None:
            if not values or not all(isinstance(v, str) and 0 < len(v) <= 200 for v in values):
                spec.fail("values", values, "a non-empty array of strings of 1 to 200 characters")
            if len(set(values)) != len(values):
                spec.fail("values", values, "distinct values")
            values = tuple(values)
        spec.done()
        kinds[key] = KindSpec(key, namespace, values)
    table.done()
    return kinds


def _parse_transform(top: _Fields) -> Transform:
    table = top.sub("transform")
    transform = Transform(
        polarity=table.choice("polarity", POLARITIES),
        color=table.choice("color", COLORS, "gray"),
        resize=table.pair("resize", None),
        pad=table.choice("pad", PADS, "none"),
    )
    table.done()
    return transform


def _parse_parts(top: _Fields, files: dict[str, FileEntry],
                 kinds: dict[str, KindSpec]) -> tuple[Part, ...]:
    value = top.take("parts", list, "an array of tables [[parts]]")
    if not value:
        top.fail("parts", value, "at least one [[parts]] table")
    return tuple(
        _parse_part(_Fields(top.origin, f"parts[{i}]", entry), i, files, kinds)
        for i, entry in enumerate(value)
    )


def _parse_part(table: _Fields, index: int, files: dict[str, FileEntry],
                kinds: dict[str, KindSpec]) -> Part:
    reader = table.choice("reader", READERS)
    images = _file_key(table, "images", files)
    split = table.pattern("split", NAME_PATTERN, "a split name matching [a-z][a-z0-9_-]{0,63}",
                          None)
    extra: dict[str, Any] = {}
    if reader == "atlas":
        extra["tile"] = table.pair("tile")
        extra["count"] = table.integer("count", 1, 10**8, None)
    if reader == "npz":
        extra["array"] = table.text("array")
        extra["layout"] = table.choice("layout", LAYOUTS, "NHW")
    if reader == "image-tree":
        extensions = table.take("extensions", list, "an array of suffixes like \".png\"", None)
        if extensions is not None:
            ok = extensions and all(
                isinstance(e, str) and re.fullmatch(r"\.[A-Za-z0-9]{1,8}", e) for e in extensions
            )
            if not ok:
                table.fail("extensions", extensions, 'a non-empty array of suffixes like ".png"')
            extra["extensions"] = tuple(e.lower() for e in extensions)
    sources = _parse_kind_sources(table, reader, files, kinds)
    table.done()
    return Part(index=index, reader=reader, images=images, split=split, kinds=sources, **extra)


def _file_key(table: _Fields, key: str, files: dict[str, FileEntry]) -> str:
    value = table.text(key)
    if value not in files:
        table.fail(key, value, "a key of [files]: " + ", ".join(sorted(files)))
    return value


def _parse_kind_sources(table: _Fields, reader: str, files: dict[str, FileEntry],
                        kinds: dict[str, KindSpec]) -> dict[str, KindSource]:
    sub = table.optional_sub("kinds")
    if sub is None:
        return {}
    reader_key = KIND_SOURCE_KEYS[reader]
    allowed = ("constant",) if reader_key is None else (reader_key, "constant")
    expected = "a table with one of " + ", ".join(allowed)
    sources = {}
    for kind in sorted(sub.table):
        if kind not in kinds:
            sub.fail(kind, kind, "a kind declared under [kinds]: " + (", ".join(kinds) or "none"))
        entry = sub.sub(kind)
        present = [k for k in allowed if k in entry.table]
        if len(present) != 1:
            unknown = sorted(set(entry.table) - set(allowed))
            if unknown:
                entry.fail(unknown[0], entry.table[unknown[0]], expected)
            entry.fail("", entry.table, expected)
        sources[kind] = _parse_kind_source(entry, present[0], files)
        entry.done()
    sub.done()
    return sources


def _parse_kind_source(entry: _Fields, key: str, files: dict[str, FileEntry]) -> KindSource:
    if key == "constant":
        value = entry.text("constant")
        if not 0 < len(value) <= 200:
            entry.fail("constant", value, "a string of 1 to 200 characters")
        return KindSource(constant=value)
    if key == "idx":
        return KindSource(idx=_file_key(entry, "idx", files))
    if key == "array":
        return KindSource(array=entry.text("array"))
    depths = entry.take("folders", list, "an array of folder depths (integers from 0)")
    ok = depths and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 64 for d in depths
    )
    if not ok:
        entry.fail("folders", depths, "a non-empty array of folder depths in [0, 63]")
    return KindSource(folders=tuple(depths))


def _parse_split(top: _Fields, parts: tuple[Part, ...]) -> SplitRule | None:
    table = top.optional_sub("split")
    needs_rule = any(part.split is None for part in parts)
    if table is None:
        if needs_rule:
            index = next(part.index for part in parts if part.split is None)
            raise BadInputError(
                f"{top.origin}: parts[{index}].split: missing; expected a split name, "
                "or a [split] table with a seeded held-out fraction"
            )
        return None
    fraction = table.take("fraction", (int, float), "a number in (0, 1)")
    if not 0.0 < fraction < 1.0:
        table.fail("fraction", fraction, "a number in (0, 1)")
    rule = SplitRule(
        held_out=table.pattern("held_out", NAME_PATTERN, "a split name", "test"),
        fraction=float(fraction),
        seed=table.integer("seed", 0, 2**63 - 1),
        rest=table.pattern("rest", NAME_PATTERN, "a split name", "train"),
    )
    table.done()
    if rule.held_out == rule.rest:
        raise BadInputError(
            f"{top.origin}: split.rest: found {rule.rest!r}, the same as split.held_out; "
            "expected two different split names"
        )
    return rule
