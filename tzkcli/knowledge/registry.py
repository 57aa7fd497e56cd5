"""The registry of knowledge: kinds, their conditions, and which datasets each value fits.

A *kind* is a family of facts about images (``dataset``, ``label``, ``alphabet``); a
*condition* is one fact, written ``kind=value`` (``label=mnist/3``). The registry is
open-ended: kinds and conditions can be added at any time, and adding one never renumbers the
others. Each condition has a global index (its position in :attr:`Registry.conditions`, the
order the priors are stacked in) and an index within its kind (its position in
:meth:`Registry.values`, the order the store's codes use).

Namespaces: the text of a value before its first ``/`` is its namespace (``mnist`` for
``mnist/3``). A namespaced value of any kind implies the condition ``dataset=NAMESPACE`` when
that condition is registered, so ``label=mnist/3`` implies ``dataset=mnist``.

Domains: for each kind, which values images of each dataset may take, as a bool matrix
``[n_datasets, n_values]`` (rows in the order of ``values("dataset")``). By default a value
fits a dataset when its namespace is that dataset, and a value without a namespace fits every
dataset; the ``dataset`` kind fits each dataset to its own value only. :meth:`Registry.
set_domain` replaces the default for the datasets it names (the store provides the matrix).
A row that is all false means the kind does not apply to that dataset's images.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tzkcli.errors import BadInputError

DATASET = "dataset"
FORMS = ("gaussian", "bottleneck")
FORMAT = "tzk-registry"
VERSION = 1

_KIND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Kind:
    """A family of mutually exclusive facts; its conditional priors share ``form`` (and rank)."""

    name: str
    form: str = "gaussian"
    rank: int | None = None


@dataclass(frozen=True)
class Condition:
    """One fact ``kind=value``; ``index`` is its global index in the registry."""

    index: int
    kind: str
    value: str

    @property
    def spec(self) -> str:
        return f"{self.kind}={self.value}"

    @property
    def namespace(self) -> str | None:
        return namespace(self.value)


def namespace(value: str) -> str | None:
    """The text of ``value`` before its first ``/``, or None when it has none."""
    head, slash, _ = value.partition("/")
    return head if slash else None


def parse_condition(spec: str) -> tuple[str, str]:
    """Split ``"kind=value"`` into ``(kind, value)``; the value may itself contain ``=``.

    Raises:
        BadInputError: no ``=``, an empty kind or value, or surrounding whitespace.
    """
    kind, equals, value = spec.partition("=") if isinstance(spec, str) else ("", "", "")
    if not equals or not kind or not value or spec != spec.strip():
        raise BadInputError(
            f"condition {spec!r}: malformed, expected 'kind=value' (e.g. 'label=mnist/3')"
        )
    return kind, value


def nearest(name: str, known: Iterable[str]) -> str:
    """A short ``"nearest: a, b"`` hint of the known names closest to ``name``."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return "nearest: " + ", ".join(close)
    if not known:
        return "none are registered"
    shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
    return f"known: {shown}"


class Registry:
    """Kinds and conditions, open-ended, with namespaces and per-kind domains.

    ``Registry()`` starts with the kind ``dataset`` (always first, always known for an image).
    ``dataset_form`` and ``dataset_rank`` choose its prior form.

    Example:
        >>> registry = Registry()
        >>> registry.add_kind("label")
        Kind(name='label', form='gaussian', rank=None)
        >>> registry.add_condition("dataset", "mnist")
        0
        >>> registry.add_condition("label", "mnist/3")
        1
        >>> registry.implied(registry.index("label=mnist/3"))
        [0]
    """

    def __init__(self, dataset_form: str = "gaussian", dataset_rank: int | None = None) -> None:
        self._kinds: dict[str, Kind] = {}
        self._values: dict[str, list[str]] = {}
        self._conditions: list[Condition] = []
        self._index: dict[tuple[str, str], int] = {}
        self._domains: dict[str, dict[str, frozenset[str]]] = {}
        self.version = 0
        self.add_kind(DATASET, form=dataset_form, rank=dataset_rank)

    # -- kinds and conditions -------------------------------------------------------------

    @property
    def kinds(self) -> list[str]:
        """Kind names in registration order, ``dataset`` first (the order of codes columns)."""
        return list(self._kinds)

    @property
    def conditions(self) -> tuple[Condition, ...]:
        """Every condition in global-index order."""
        return tuple(self._conditions)

    def __len__(self) -> int:
        return len(self._conditions)

    def kind(self, name: str) -> Kind:
        """The kind called ``name``; unknown names raise BadInputError with the nearest ones."""
        if name not in self._kinds:
            raise BadInputError(f"kind {name!r}: unknown, {nearest(name, self._kinds)}")
        return self._kinds[name]

    def add_kind(self, name: str, form: str = "gaussian", rank: int | None = None) -> Kind:
        """Register a kind; registering the same kind again with the same form is a no-op.

        Raises:
            BadInputError: a malformed name, an unknown form, a bottleneck without a positive
                rank (or a gaussian with one), or a known kind registered with another form.
        """
        kind = _checked_kind(name, form, rank)
        if name in self._kinds:
            if self._kinds[name] != kind:
                raise BadInputError(
                    f"kind {name!r}: already registered as {self._kinds[name]}, found {kind}"
                )
            return kind

        self._kinds[name] = kind
        self._values[name] = []
        self.version += 1
        return kind

    def add_condition(self, kind: str, value: str) -> int:
        """Register ``kind=value`` and return its global index (the existing one if known)."""
        self.kind(kind)
        if not isinstance(value, str) or not value or value != value.strip():
            raise BadInputError(
                f"condition {kind}={value!r}: malformed value, expected a non-empty name"
            )
        if (kind, value) in self._index:
            return self._index[(kind, value)]

        index = len(self._conditions)
        self._conditions.append(Condition(index, kind, value))
        self._index[(kind, value)] = index
        self._values[kind].append(value)
        self.version += 1
        return index

    def values(self, kind: str) -> list[str]:
        """The values of ``kind`` in registration order (the order of its codes)."""
        self.kind(kind)
        return list(self._values[kind])

    def value_index(self, kind: str, value: str) -> int:
        """The index of ``value`` within ``kind`` (a code as the store writes it)."""
        return self._values[kind].index(self.condition(f"{kind}={value}").value)

    def condition_indices(self, kind: str) -> list[int]:
        """Global indices of ``kind``'s conditions in value order: ``codes`` -> conditions."""
        return [self._index[(kind, value)] for value in self.values(kind)]

    def condition(self, key: int | str) -> Condition:
        """The condition of a global index or a ``"kind=value"`` spec."""
        return self._conditions[self.index(key)]

    def index(self, key: int | str) -> int:
        """The global index of a ``"kind=value"`` spec (an int is checked and returned).

        Raises:
            BadInputError: the spec is malformed, or its kind or condition is not registered;
                the message names the nearest known kinds or conditions.
        """
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(self._conditions):
                raise BadInputError(
                    f"condition index {key}: out of range, expected 0..{len(self) - 1}"
                )
            return key

        kind, value = parse_condition(key)
        if kind not in self._kinds:
            raise BadInputError(
                f"condition {key!r}: unknown kind {kind!r}, {nearest(kind, self._kinds)}"
            )
        if (kind, value) not in self._index:
            specs = [f"{kind}={known}" for known in self._values[kind]]
            raise BadInputError(f"condition {key!r}: unknown, {nearest(key, specs)}")
        return self._index[(kind, value)]

    def resolve(self, keys: Sequence[int | str]) -> list[int]:
        """Global indices of several specs or indices, in the order given."""
        if isinstance(keys, (str, int)):
            keys = [keys]
        return [self.index(key) for key in keys]

    def implied(self, index: int) -> list[int]:
        """Conditions that condition ``index`` implies by namespace (``dataset=NAMESPACE``)."""
        condition = self.condition(index)
        space = condition.namespace
        if space is None or condition.kind == DATASET:
            return []
        implied = self._index.get((DATASET, space))
        return [] if implied is None else [implied]

    # -- domains ---------------------------------------------------------------------------

    def set_domain(
        self,
        kind: str,
        domain: Any,
        datasets: Sequence[str] | None = None,
        values: Sequence[str] | None = None,
    ) -> None:
        """Say which values of ``kind`` images of each dataset may take.

        Args:
            kind: a registered kind.
            domain: bool ``[n_datasets, n_values]`` (tensor, array or nested lists).
            datasets: names of the rows; default ``values("dataset")``.
            values: names of the columns; default ``values(kind)``.

        Datasets named here use this matrix from now on; others keep the namespace rule.
        Values added to the kind later are not admissible for these datasets until the domain
        is set again.
        """
        self.kind(kind)
        datasets = list(self.values(DATASET) if datasets is None else datasets)
        values = list(self.values(kind) if values is None else values)
        matrix = torch.as_tensor(domain, dtype=torch.bool)
        if tuple(matrix.shape) != (len(datasets), len(values)):
            raise BadInputError(
                f"domain of kind {kind!r}: found shape {tuple(matrix.shape)}, expected "
                f"{(len(datasets), len(values))} (datasets x values)"
            )
        for name in datasets:
            self.index(f"{DATASET}={name}")
        for name in values:
            self.index(f"{kind}={name}")

        rows = self._domains.setdefault(kind, {})
        for row, name in enumerate(datasets):
            rows[name] = frozenset(v for v, ok in zip(values, matrix[row].tolist()) if ok)
        self.version += 1

    def admissible(self, kind: str, dataset: str, value: str) -> bool:
        """Whether images of ``dataset`` may take ``kind=value``."""
        explicit = self._domains.get(kind, {}).get(dataset)
        if explicit is not None:
            return value in explicit
        if kind == DATASET:
            return value == dataset
        space = namespace(value)
        return space is None or space == dataset

    def domain(self, kind: str) -> torch.Tensor:
        """Bool ``[n_datasets, n_values]``: values of ``kind`` each dataset's images may take."""
        datasets = self.values(DATASET)
        values = self.values(kind)
        rows = [[self.admissible(kind, d, v) for v in values] for d in datasets]
        return torch.tensor(rows, dtype=torch.bool).reshape(len(datasets), len(values))

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; :meth:`from_json` rebuilds an equal registry."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "kinds": [{"name": k.name, "form": k.form, "rank": k.rank}
                      for k in self._kinds.values()],
            "conditions": [c.spec for c in self._conditions],
            "domains": {kind: {d: sorted(vs) for d, vs in rows.items()}
                        for kind, rows in self._domains.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "registry") -> Registry:
        """Rebuild a registry from :meth:`to_json`; ``source`` names the input in errors."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise BadInputError(f"{source}.format: found {found!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise BadInputError(
                f"{source}.version: found {data.get('version')!r}, expected {VERSION}"
            )

        kinds = _field(data, "kinds", list, source)
        if not kinds or not isinstance(kinds[0], dict) or kinds[0].get("name") != DATASET:
            raise BadInputError(f"{source}.kinds[0]: expected the kind {DATASET!r} first")
        registry = cls(kinds[0].get("form", "gaussian"), kinds[0].get("rank"))
        for position, entry in enumerate(kinds[1:], start=1):
            if not isinstance(entry, dict) or "name" not in entry:
                raise BadInputError(f"{source}.kinds[{position}]: expected {{name, form, rank}}")
            registry.add_kind(entry["name"], entry.get("form", "gaussian"), entry.get("rank"))

        for position, spec in enumerate(_field(data, "conditions", list, source)):
            try:
                registry.add_condition(*parse_condition(spec))
            except BadInputError as error:
                raise BadInputError(f"{source}.conditions[{position}]: {error}") from None

        for kind, rows in _field(data, "domains", dict, source).items():
            registry.kind(kind)
            for dataset, values in rows.items():
                registry.index(f"{DATASET}={dataset}")
                registry._domains.setdefault(kind, {})[dataset] = frozenset(values)
        return registry


def _field(data: dict[str, Any], name: str, kind: type, source: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise BadInputError(
            f"{source}.{name}: found {type(value).__name__}, expected a {kind.__name__}"
        )
    return value


def _checked_kind(name: str, form: str, rank: int | None) -> Kind:
    if not isinstance(name, str) or not _KIND_NAME.match(name):
        raise BadInputError(
            f"kind {name!r}: malformed name, expected a letter then letters, digits, '_.-'"
        )
    if form not in FORMS:
        raise BadInputError(f"kind {name!r}: form {form!r} unknown, expected one of {FORMS}")
    if form == "bottleneck":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise BadInputError(
                f"kind {name!r}: bottleneck rank {rank!r}, expected a positive integer"
            )
    elif rank is not None:
        raise BadInputError(f"kind {name!r}: rank {rank!r} given, expected none for {form!r}")
    return Kind(name, form, rank)
