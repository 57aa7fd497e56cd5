"""Knowledge rates ``pi``: how common each condition is, learned from counts.

Two estimates from the same counts (images whose value of a kind is known):

- per kind, a categorical over its values, ``pi_k = (n_k + 1) / (n_kind + V)``: add-one
  (Laplace) smoothing, so a value never counted keeps a small positive rate and an empty
  kind is uniform;
- per condition, the probability that a random image has it, ``(n_k + 1) / (N + 2)`` over all
  ``N`` counted images (a Beta(1, 1) prior), used by single-condition existence.

Counts are plain integers keyed by ``kind=value`` spec, so they survive conditions added
later (a new condition starts at zero) and serialise to JSON as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tzkcli.errors import BadInputError
from tzkcli.knowledge.registry import Registry

FORMAT = "tzk-rates"
VERSION = 1


class KnowledgeRates:
    """Counts of known conditions, and the rates derived from them.

    Args:
        registry: the registry the codes refer to (kept by reference: conditions added to it
            later are counted from zero).
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.total = 0
        self.counts: dict[str, int] = {}
        self.version = 0

    def count(self, codes: Tensor) -> None:
        """Add the images of ``codes`` (int ``[N, n_kinds]``, registry kind order, -1 unknown)."""
        codes = torch.as_tensor(codes)
        kinds = self.registry.kinds
        if codes.dim() != 2 or codes.shape[1] != len(kinds):
            raise BadInputError(
                f"codes: found shape {tuple(codes.shape)}, expected [N, {len(kinds)}] "
                f"(one column per kind: {', '.join(kinds)})"
            )

        for column, kind in enumerate(kinds):
            values = self.registry.values(kind)
            column_codes = codes[:, column].to(torch.int64).cpu()
            if len(values) == 0:
                continue
            bad = (column_codes < -1) | (column_codes >= len(values))
            if bool(bad.any()):
                found = int(column_codes[bad][0])
                raise BadInputError(
                    f"codes[:, {column}] ({kind}): found {found}, expected -1..{len(values) - 1}"
                )
            tally = torch.bincount(column_codes[column_codes >= 0], minlength=len(values))
            for value, n in zip(values, tally.tolist()):
                if n:
                    spec = f"{kind}={value}"
                    self.counts[spec] = self.counts.get(spec, 0) + int(n)
        self.total += int(codes.shape[0])
        self.version += 1

    def kind_counts(self, kind: str) -> list[int]:
        """Counted images of each value of ``kind``, in value order."""
        return [self.counts.get(f"{kind}={value}", 0) for value in self.registry.values(kind)]

    def log_categorical(self, kind: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """``log pi`` over the values of ``kind``, ``[V]`` (add-one smoothing)."""
        counts = torch.tensor(self.kind_counts(kind), dtype=torch.float64) + 1.0
        return torch.log(counts / counts.sum()).to(dtype)

    def existence(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Prior probability that an image has each condition, ``[K]`` in global order."""
        counts = [self.counts.get(c.spec, 0) for c in self.registry.conditions]
        rate = (torch.tensor(counts, dtype=torch.float64) + 1.0) / (self.total + 2.0)
        return rate.to(dtype)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "total": self.total,
                "counts": dict(sorted(self.counts.items()))}

    @classmethod
    def from_json(cls, data: Any, registry: Registry, source: str = "rates") -> KnowledgeRates:
        """Rebuild counts written by :meth:`to_json`; every counted spec must be registered."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise BadInputError(f"{source}.format: found {found!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise BadInputError(
                f"{source}.version: found {data.get('version')!r}, expected {VERSION}"
            )
        total, counts = data.get("total"), data.get("counts")
        if not isinstance(total, int) or total < 0 or not isinstance(counts, dict):
            raise BadInputError(
                f"{source}: found total={total!r}, expected a count and a counts mapping"
            )

        rates = cls(registry)
        for spec, n in counts.items():
            registry.index(spec)
            if not isinstance(n, int) or n < 0:
                raise BadInputError(f"{source}.counts[{spec!r}]: found {n!r}, expected a count")
            rates.counts[spec] = n
        rates.total = total
        rates.version += 1
        return rates
