"""``tzk eval``: bits/dim per condition, classification by the posterior, OOD AUROC, samples.

One flow pass per image scores it under ``p_0`` and under every condition of the model at once
(``TzK.score``); everything below is computed from those log-densities:

- ``bpd.joint``: mean bpd under ``p_0`` over the split; ``bpd.parts`` its prior, ladj and
  dequantisation terms.
- ``bpd.by_condition["kind=value"]``: over the split's images that have the condition (by the
  store's knowledge), mean bpd under ``p_0`` (``joint``) and under the condition's own prior
  (``conditional``), the knowledge gain ``joint - conditional`` and the count ``n``.
- ``accuracy[kind]`` and ``confusion[kind]``: ``argmax_k pi_k p_k(r)`` over the values the
  image's dataset admits, on images whose value of the kind is known.
- ``ood_auroc[store]``: AUROC separating the split (in) from another store (out) by
  ``log p_0(x)`` and by the knowledge score ``max_k log p_k(r) - log p_0(r)`` over the
  ``dataset`` conditions (:mod:`tzkcli.evaluation.metrics`).
- ``sample_accuracy[kind]``: for each condition, ``samples`` images drawn from its prior at
  temperature 1, classified by the model's own posterior over the kind.

Reproducibility: the dequantisation noise of the split comes from a generator seeded with
``seed``; each OOD store and each condition's samples have their own generator seeded from
``seed`` and the store's position or the condition's name, so adding conditions or stores
changes none of the other figures. Same model, store, seed, batch size and device: same numbers.

Images of datasets the model does not know are left out of every figure (``left_out``
counts them per dataset; ``images`` counts those evaluated).

Warning:
    A condition's figures cover only images whose value the store knows; images of kinds a
    store lacks, or of values the model lacks, are left out of those figures (``n`` says how
    many took part).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tzkcli.errors import BadInputError
from tzkcli.evaluation import metrics
from tzkcli.evaluation.data import (
    StoreView,
    check_shape,
    known_rows,
    model_codes,
    read_store,
)
from tzkcli.knowledge.inference import posterior_logits
from tzkcli.knowledge.registry import DATASET

DENSE_CONFUSION_LIMIT = 100
Progress = Callable[[str, int, int], None]


@dataclass
class EvalOptions:
    """What ``tzk eval`` measures and how.

    Attributes:
        split: the split of ``store`` to evaluate (None: every image).
        ood: stores the model never saw; each is read at ``split`` when it has one, else whole.
        seed: seeds the dequantisation noise and the samples.
        batch_size: images per flow pass (part of what makes the noise reproducible).
        samples: images drawn per condition for the sample accuracy (0: skip it).
        device: where the model runs.
    """

    split: str | None = "test"
    ood: Sequence[Path] = ()
    seed: int = 0
    batch_size: int = 256
    samples: int = 16
    device: str | torch.device = "cpu"


@dataclass
class Scored:
    """Per-image log-densities of a set of images under ``p_0`` and every condition.

    Attributes:
        rows: store rows ``[N]``.
        log_base: ``[N]`` ``log p_0(r)`` (nats); ladj: ``[N]``; log_prior: ``[N, K]``.
        bpd_base: ``[N]``; bpd: ``[N, K]``; parts: mean bpd terms under ``p_0``.
    """

    rows: np.ndarray
    log_base: np.ndarray
    ladj: np.ndarray
    log_prior: np.ndarray
    bpd_base: np.ndarray
    bpd: np.ndarray
    parts: dict[str, float] = field(default_factory=dict)


def seeded(seed: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` that depends only on ``(seed, stream)``."""
    state = np.random.SeedSequence([seed, 5, stream]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return generator


def score_rows(
    model: Any,
    view: StoreView,
    rows: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    progress: Progress | None = None,
    label: str = "score",
) -> Scored:
    """Score store rows under ``p_0`` and every condition, one flow pass per batch."""
    device = model.priors.anchor.device
    chunks: dict[str, list[np.ndarray]] = {"base": [], "ladj": [], "prior": [], "bpd_base": [],
                                           "bpd": [], "prior_term": [], "ladj_term": []}
    done = 0
    with torch.no_grad():
        for _, x in view.batches(rows, batch_size):
            scores = model.score(x.to(device), generator=generator)
            for key, value in (("base", scores.log_prior_base), ("ladj", scores.ladj),
                               ("prior", scores.log_prior), ("bpd_base", scores.bpd_base),
                               ("bpd", scores.bpd), ("prior_term", scores.parts.prior_base),
                               ("ladj_term", scores.parts.ladj)):
                chunks[key].append(value.detach().double().cpu().numpy())
            done += len(x)
            if progress is not None:
                progress(label, done, len(rows))

    k = len(model.registry)
    joined = {key: (np.concatenate(value) if value else
                    np.zeros((0, k) if key in ("prior", "bpd") else (0,)))
              for key, value in chunks.items()}
    parts = {"prior": _mean(joined["prior_term"]), "ladj": _mean(joined["ladj_term"]),
             "dequantisation": float(model.config.n_bits)}
    return Scored(rows, joined["base"], joined["ladj"], joined["prior"], joined["bpd_base"],
                  joined["bpd"], parts)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def evaluate(
    model: Any, store: Path, options: EvalOptions, progress: Progress | None = None
) -> dict[str, Any]:
    """Every figure of ``tzk eval`` for ``model`` on ``store`` (see the module docstring).

    Raises:
        BadInputError: a store of another image shape, a split it lacks, an empty split, or
            one with no image of a dataset the model knows.
    """
    device = torch.device(options.device)
    model.place(device).eval()
    view = read_store(store)
    check_shape(view, model)
    rows = view.rows(options.split)
    if len(rows) == 0:
        raise BadInputError(f"--split {options.split}: no images in {view.path}")
    rows, left_out = known_rows(view, model.registry, rows, "--store")
    codes = model_codes(view, model.registry)[rows]

    scored = score_rows(model, view, rows, options.batch_size, seeded(options.seed, 0, device),
                        progress, "eval")
    report: dict[str, Any] = {
        "store": str(view.path), "store_digest": view.digest, "split": options.split,
        "images": int(len(rows)), "left_out": left_out, "seed": options.seed,
        "batch_size": options.batch_size,
        "n_bits": int(model.config.n_bits), "dims": int(model.dims),
        "dequantisation": "uniform, seeded",
        "bpd": {"joint": _mean(scored.bpd_base), "parts": scored.parts,
                "by_condition": by_condition(model.registry, scored, codes)},
    }
    report["accuracy"], report["confusion"] = classification(model, scored, codes)
    report["ood_auroc"] = {}
    for position, path in enumerate(options.ood, start=1):
        report["ood_auroc"][str(path)] = ood_auroc(model, scored, Path(path), options, position,
                                                   progress)
    if options.samples:
        report["sample_accuracy"] = sample_accuracy(model, options, progress)
    return report


def by_condition(registry: Any, scored: Scored, codes: np.ndarray) -> dict[str, Any]:
    """``{"kind=value": {joint, conditional, gain, n}}`` for conditions with images."""
    out: dict[str, Any] = {}
    for column, kind in enumerate(registry.kinds):
        for value_index, index in enumerate(registry.condition_indices(kind)):
            mask = codes[:, column] == value_index
            n = int(mask.sum())
            if not n:
                continue
            joint = float(scored.bpd_base[mask].mean())
            conditional = float(scored.bpd[mask, index].mean())
            out[registry.condition(index).spec] = {
                "joint": joint, "conditional": conditional, "gain": joint - conditional, "n": n,
            }
    return out


def kind_logits(model: Any, log_prior: np.ndarray, kind: str,
                datasets: np.ndarray | None) -> np.ndarray:
    """``log pi_k + log p_k(r)`` over ``kind``'s values, ``-inf`` outside each dataset's domain.

    Args:
        log_prior: ``[N, K]`` over every condition of the model (global order).
        datasets: ``[N]`` model dataset codes to restrict by, or None (every value admissible).
    """
    registry = model.registry
    columns = registry.condition_indices(kind)
    admissible = None
    if datasets is not None and kind != DATASET:
        admissible = registry.domain(kind)[torch.from_numpy(datasets)]
    logits = posterior_logits(torch.from_numpy(log_prior[:, columns]),
                              model.rates.log_categorical(kind, torch.float64), admissible)
    return logits.numpy()


def classification(
    model: Any, scored: Scored, codes: np.ndarray
) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy and confusion matrix per kind by the posterior's argmax."""
    registry = model.registry
    accuracy: dict[str, float] = {}
    confusion: dict[str, Any] = {}
    for column, kind in enumerate(registry.kinds):
        values = registry.values(kind)
        known = codes[:, column] >= 0
        if not values or not known.any():
            continue
        logits = kind_logits(model, scored.log_prior[known], kind, codes[known, 0])
        predicted = logits.argmax(axis=1)
        matrix = metrics.confusion_matrix(codes[known, column], predicted, len(values))
        accuracy[kind] = metrics.accuracy(matrix)
        confusion[kind] = confusion_record(values, matrix)
    return accuracy, confusion


def confusion_record(values: list[str], matrix: np.ndarray) -> dict[str, Any]:
    """JSON form: dense ``matrix`` up to 100 values, else the non-zero ``pairs``."""
    if len(values) <= DENSE_CONFUSION_LIMIT:
        return {"values": values, "matrix": matrix.tolist()}
    true, predicted = np.nonzero(matrix)
    pairs = [[values[t], values[p], int(matrix[t, p])] for t, p in zip(true, predicted)]
    return {"values": values, "pairs": pairs}


def knowledge_score(model: Any, scored: Scored) -> np.ndarray:
    """``max_k log p_k(r) - log p_0(r)`` over the ``dataset`` conditions, ``[N]``."""
    columns = model.registry.condition_indices(DATASET)
    return (scored.log_prior[:, columns] - scored.log_base[:, None]).max(axis=1)


def ood_auroc(model: Any, inside: Scored, path: Path, options: EvalOptions, position: int,
              progress: Progress | None = None) -> dict[str, Any]:
    """AUROC of the split against the store ``path`` by ``log p_0`` and the knowledge score."""
    device = model.priors.anchor.device
    view = read_store(path)
    check_shape(view, model, "--ood")
    rows = view.rows(options.split if options.split in view.splits else None)
    if len(rows) == 0:
        raise BadInputError(f"--ood {path}: no images, expected a store with images")
    outside = score_rows(model, view, rows, options.batch_size,
                         seeded(options.seed, position, device), progress, f"ood {path.name}")
    log_p0_in = inside.log_base + inside.ladj
    log_p0_out = outside.log_base + outside.ladj
    return {
        "log_p0": metrics.auroc(log_p0_in, log_p0_out),
        "knowledge": metrics.auroc(knowledge_score(model, inside),
                                   knowledge_score(model, outside)),
        "images": int(len(rows)), "bpd_joint": _mean(outside.bpd_base),
    }


def sample_accuracy(model: Any, options: EvalOptions,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Per kind: the posterior's accuracy on ``samples`` draws from each condition's prior."""
    out: dict[str, Any] = {}
    registry = model.registry
    device = model.priors.anchor.device
    done, total = 0, len(registry)
    for kind in registry.kinds:
        by_condition: dict[str, float] = {}
        for value_index, index in enumerate(registry.condition_indices(kind)):
            spec = registry.condition(index).spec
            generator = seeded(options.seed, 1_000_000 + zlib.crc32(spec.encode()), device)
            by_condition[spec] = _sample_hits(model, kind, value_index, index, options,
                                              generator)
            done += 1
            if progress is not None:
                progress("samples", done, total)
        if by_condition:
            out[kind] = {"mean": float(np.mean(list(by_condition.values()))),
                         "by_condition": by_condition}
    return out


def _sample_hits(model: Any, kind: str, value_index: int, index: int, options: EvalOptions,
                 generator: torch.Generator) -> float:
    """Fraction of ``samples`` draws of condition ``index`` classified as its own value."""
    with torch.no_grad():
        x = model.sample(options.samples, index, temperature=1.0, generator=generator)
        scores = model.score(x, generator=generator)
    log_prior = scores.log_prior.double().cpu().numpy()
    implied = model.registry.implied(index)
    datasets = None
    if implied:
        code = model.registry.values(DATASET).index(model.registry.condition(implied[0]).value)
        datasets = np.full(len(x), code, dtype=np.int64)
    predicted = kind_logits(model, log_prior, kind, datasets).argmax(axis=1)
    return float((predicted == value_index).mean())
