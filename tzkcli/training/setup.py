"""What training takes from the store: the registry, the model, the splits and validation.

Registry from the store: every kind of the store becomes a kind of the registry (``dataset``
first), every value a condition, in the store's order, so the store's codes are the registry's
codes unchanged; the store's ``domain(kind)`` matrix says which values each dataset's images may
take. Each kind's prior form comes from ``config.prior`` (default ``gaussian``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tzkcli.errors import BadInputError
from tzkcli.training.config import TrainConfig, nearest
from tzkcli.training.data import validation_positions


@dataclass
class TrainingData:
    """The store as training sees it: training rows, their datasets, the validation subset."""

    path: Path
    digest: str
    shape: tuple[int, int, int]
    kinds: list[str]
    values: dict[str, list[str]]
    domains: dict[str, np.ndarray]
    train: Any
    train_groups: np.ndarray
    train_codes: np.ndarray
    validation: list[tuple[str, Any]]

    def describe(self) -> dict[str, Any]:
        """The store's identity for the first record of ``metrics.jsonl``."""
        return {
            "path": str(self.path.resolve()), "digest": self.digest, "shape": list(self.shape),
            "kinds": {kind: len(self.values[kind]) for kind in self.kinds},
            "train_images": len(self.train_groups),
            "validation_images": {name: len(ds) for name, ds in self.validation},
        }

    def registry(self, config: TrainConfig) -> Any:
        """A registry of every kind and value of the store, with the store's domains."""
        from tzkcli.knowledge.registry import DATASET, Registry

        priors = config.priors()
        for kind in priors:
            if kind not in self.kinds:
                raise BadInputError(
                    f"--prior {kind}={config.prior[kind]}: the store {self.path} has no kind "
                    f"{kind!r}; expected one of {', '.join(self.kinds)} (did you mean "
                    f"{nearest(kind, self.kinds)!r}?)"
                )
        form, rank = priors.get(DATASET, ("gaussian", None))
        registry = Registry(dataset_form=form, dataset_rank=rank)
        for kind in self.kinds[1:]:
            form, rank = priors.get(kind, ("gaussian", None))
            registry.add_kind(kind, form=form, rank=rank)
        for kind in self.kinds:
            for value in self.values[kind]:
                registry.add_condition(kind, value)
        for kind in self.kinds:
            registry.set_domain(kind, self.domains[kind])
        return registry

    def visible_codes(self, labelled: np.ndarray) -> np.ndarray:
        """Training codes ``[N, n_kinds]`` as training sees them (labels hidden per mask)."""
        from tzkcli.training.data import hide_labels

        return hide_labels(self.train_codes, labelled)

    def check_registry(self, registry: Any) -> None:
        """A resumed model must know exactly the store's kinds and values, in order.

        Raises:
            BadInputError: a kind or value differs, named with the store.
        """
        if list(registry.kinds) != self.kinds:
            raise BadInputError(
                f"{self.path}: store kinds {self.kinds} do not match the run's model kinds "
                f"{list(registry.kinds)}; expected the store the run was trained on"
            )
        for kind in self.kinds:
            if list(registry.values(kind)) != self.values[kind]:
                raise BadInputError(
                    f"{self.path}: values of kind {kind!r} differ from the run's model; "
                    "expected the store the run was trained on"
                )

    def validate(
        self, model: Any, config: TrainConfig, device: torch.device, step: int
    ) -> dict[str, Any]:
        """Validation bpd under ``p_0`` and under each dataset's own ``dataset=`` prior.

        The dequantisation noise comes from a generator seeded by ``config.seed``: the same
        noise at every validation, and the training's random streams untouched.
        """
        registry = model.registry
        record: dict[str, Any] = {"type": "val", "step": step, "datasets": {}}
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
        with torch.no_grad():
            for name, dataset in self.validation:
                condition = registry.index(f"dataset={name}")
                base, own, parts = [], [], []
                for start in range(0, len(dataset), config.batch_size):
                    stop = min(start + config.batch_size, len(dataset))
                    x, _ = dataset.batch(np.arange(start, stop))
                    scores = model.score(x.to(device), conditions=[condition],
                                         generator=generator)
                    base.append(scores.bpd_base.float().cpu())
                    own.append(scores.bpd[:, 0].float().cpu())
                    parts.append(torch.stack([scores.parts.prior_base, scores.parts.ladj],
                                             dim=1).float().cpu())
                base_t, own_t, parts_t = torch.cat(base), torch.cat(own), torch.cat(parts)
                record["datasets"][name] = {
                    "images": len(dataset),
                    "bpd_base": float(base_t.mean()), "bpd_dataset": float(own_t.mean()),
                    "bpd_base_prior": float(parts_t[:, 0].mean()),
                    "bpd_ladj": float(parts_t[:, 1].mean()),
                    "bpd_dequantisation": float(config.n_bits),
                }
                total += float(base_t.sum())
                count += len(dataset)
        model.train(was_training)
        record["bpd_base"] = total / count if count else math.nan
        return record


def open_training_data(path: Path, config: TrainConfig) -> TrainingData:
    """Read the store's shape, knowledge and splits and build the training datasets.

    Raises:
        BadInputError: a missing split, or a shape the flow cannot take at ``--levels``.
    """
    from tzkcli.store import StoreDataset, open_store

    path = Path(path)
    with open_store(path) as store:
        shape = tuple(int(n) for n in store.shape)
        kinds = list(store.kinds)
        values = {kind: list(store.values(kind)) for kind in kinds}
        domains = {kind: np.array(store.domain(kind), dtype=bool) for kind in kinds}
        codes = np.stack([np.asarray(store.codes(kind)) for kind in kinds], axis=1)
        splits = list(store.split_names)
        for flag, split in (("--train-split", config.train_split),
                            ("--val-split", config.val_split)):
            if split not in splits and not (flag == "--val-split" and config.val_images == 0):
                raise BadInputError(
                    f"{flag} {split}: the store {path} has no split {split!r}; expected one of "
                    f"{', '.join(splits)}"
                )
        train_rows = np.asarray(store.indices(split=config.train_split), dtype=np.int64)
        val_rows = (np.asarray(store.indices(split=config.val_split), dtype=np.int64)
                    if config.val_images else np.zeros(0, dtype=np.int64))
        digest = str(store.digest)

    _check_shape(path, shape, config)
    columns = _selected_kinds(path, kinds, config)
    kinds = [kinds[column] for column in columns]
    values = {kind: values[kind] for kind in kinds}
    domains = {kind: domains[kind] for kind in kinds}
    codes = codes[:, columns]
    if len(train_rows) == 0:
        raise BadInputError(f"--train-split {config.train_split}: no images in {path}")
    train_codes = codes[train_rows]
    validation = []
    for code, positions in validation_positions(codes[val_rows, 0], config.val_images,
                                                config.seed):
        rows = val_rows[positions]
        validation.append((values[kinds[0]][code], StoreDataset(path, rows, kinds=kinds)))
    return TrainingData(
        path=path, digest=digest, shape=shape, kinds=kinds, values=values, domains=domains,
        train=StoreDataset(path, train_rows, kinds=kinds), train_groups=train_codes[:, 0],
        train_codes=train_codes, validation=validation,
    )


def _selected_kinds(path: Path, kinds: list[str], config: TrainConfig) -> list[int]:
    """The store columns of the kinds that ``--kinds`` selects (all when it is empty).

    Raises:
        BadInputError: a named kind the store lacks, with the nearest one it has.
    """
    names = config.kind_names()
    if names is None:
        return list(range(len(kinds)))
    for name in names:
        if name not in kinds:
            raise BadInputError(
                f"--kinds {config.kinds}: the store {path} has no kind {name!r}; expected "
                f"some of {', '.join(kinds)} (did you mean {nearest(name, kinds)!r}?)"
            )
    return [column for column, kind in enumerate(kinds) if kind in names]


def _check_shape(path: Path, shape: tuple[int, ...], config: TrainConfig) -> None:
    factor = 2**config.levels
    if shape[1] % factor or shape[2] % factor:
        raise BadInputError(
            f"--levels {config.levels}: the store {path} holds {shape[1]}x{shape[2]} images, "
            f"not divisible by 2**levels = {factor}; expected fewer --levels or a padded store"
        )


def build_model(config: TrainConfig, data: TrainingData) -> Any:
    """A new TzK model for ``data``: Glow of the configured size, one prior per condition."""
    from tzkcli.flows import GlowConfig
    from tzkcli.model import ModelConfig, TzK

    flow = GlowConfig(shape=data.shape, levels=config.levels, steps=config.flow_steps,
                      hidden=config.hidden, coupling=config.coupling,
                      scale_floor=config.scale_floor)
    model = TzK(ModelConfig(flow=flow, n_bits=config.n_bits), data.registry(config))
    return model
