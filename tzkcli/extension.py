"""``tzk extend``: new conditions for a trained model, without touching what it knows.

As the model documentation says (a reconstruction from the TzK paper's stated claims): the
flow, ``p_0`` and every existing condition stay frozen, bit for bit. Each new condition's
prior is fitted on the standardised residuals ``r`` of its images (one flow pass over them):

- ``gaussian``: per cell (a channel of a split level, a dimension of the top level) the mean
  ``a = S1 / (n c)`` and ``b = log std = 0.5 log(S2 / (n c) - a^2)`` over the ``n`` images and
  ``c`` positions of the cell: the maximum-likelihood fit;
- ``bottleneck`` of rank ``q``: split levels as ``gaussian``; the top level by probabilistic PCA
  from the eigendecomposition ``C = U diag(l) U^T`` of the residuals' covariance:
  ``m`` = their mean, ``s^2 = mean(l_{q+1..D})``, ``W = U_q (diag(l_1..q) - s^2 I)^(1/2)``
  (Tipping and Bishop's closed-form maximum likelihood).

Variances are floored at ``VAR_FLOOR``. With ``refine_steps`` the new conditions' parameters
alone are then trained by Adam on the cached residuals: the mean bpd of their images under
their own prior plus ``beta`` times the cross-entropy of each extended kind's posterior (the
training objective restricted to the new parameters). ``finetune`` instead trains every
parameter with the full objective on the old and the new data of the store: nothing is frozen
then, and the result says so.

New datasets: ``--condition dataset`` (or ``dataset=NAME``) adds the store's datasets the model
lacks; a new condition whose images come from a dataset the model lacks adds that dataset too.
The knowledge rates of every kind that gains values are re-estimated from the store's counts
on the fitting split, which changes posteriors as it should; no existing prior changes.

Calibration (``calibrate = N``, opt-in): every existing condition is refitted by the same
closed form on its images among ``N`` random images of the split, in the same flow pass. The
flow and ``p_0`` stay frozen; the old conditions do not. Why: gradient training leaves the
trained priors behind the flow they were trained with (Adam moves a parameter by about the
learning rate per step while the flow keeps changing), so a new condition fitted in closed form
outscores them on their own images; after a calibration old and new priors are fits of the same
estimator on the same flow. ``refine_steps`` then refines old and new together.

Output: a new checkpoint ``step-NNNNNNNN-extend-K`` (see :mod:`tzkcli.evaluation.runs`) in the
run, or in a new run directory ``out``, written all or nothing under the run lock, with an
``extension.json`` that records what was added and how; ``run.json`` names it as latest.

Warning:
    A condition fitted on few images gets a tight prior on them (it is a maximum-likelihood
    fit); its bpd on the images it was fitted on is optimistic. Evaluate on another split.
    The residual cache for refinement holds ``3 F`` floats per image of the new conditions
    and of the ``calibrate`` sample.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tzkcli import fsio
from tzkcli.errors import BadInputError, RunFailedError, UsageError
from tzkcli.evaluation.data import StoreView, check_shape, model_codes, read_store
from tzkcli.evaluation.evaluate import seeded
from tzkcli.evaluation.runs import CHECKPOINTS, OpenRun, open_run, read_run_record
from tzkcli.knowledge.priors import ResidualStats
from tzkcli.knowledge.registry import DATASET, nearest, parse_condition

VAR_FLOOR = 1e-3
MIN_IMAGES = 2
REFINE_LR = 1e-2
FINETUNE_LR = 1e-4
Progress = Callable[[str, int, int], None]


@dataclass
class ExtendOptions:
    """What ``tzk extend`` adds and how.

    Attributes:
        conditions: ``kind=value`` or ``kind`` (every value of the store's kind that the model
            lacks), as given.
        store: the store to fit on; None: the store the run was trained on.
        out: a new run directory to write to; None: a new checkpoint in the run itself.
        refine_steps: gradient steps after the closed-form fit (fine-tune steps with
            ``finetune``).
        finetune: train every parameter with the full objective (nothing stays frozen).
        prior: ``{kind: form}`` for kinds new to the model (``gaussian``, ``bottleneck:Q``).
        split: the store split to fit on (None: every image).
        seed: seeds the dequantisation noise and the batch order.
        batch_size: images per flow pass and per refinement step.
        lr: learning rate of refinement (default 1e-2) or fine-tuning (default 1e-4).
        device: where the model runs.
        checkpoint: the run's checkpoint to extend: ``latest``, ``best`` or a name.
        calibrate: refit every existing condition in closed form on up to this many images
            of the split, drawn at random by ``seed`` (0: none; the old conditions stay
            frozen). Refinement then trains the old and the new conditions together.
    """

    conditions: Sequence[str]
    store: Path | None = None
    out: Path | None = None
    refine_steps: int = 0
    finetune: bool = False
    prior: dict[str, str] = field(default_factory=dict)
    split: str | None = "train"
    seed: int = 0
    batch_size: int = 256
    lr: float | None = None
    device: str | torch.device = "cpu"
    calibrate: int = 0
    checkpoint: str = "latest"


@dataclass
class NewCondition:
    """One added condition and its fit: ``images`` used, mean bpd on them under ``p_0``
    (``bpd_base``) and under its own prior (``bpd``)."""

    spec: str
    images: int
    bpd_base: float
    bpd: float
    added_for: str | None = None

    @property
    def gain(self) -> float:
        return self.bpd_base - self.bpd


@dataclass
class Calibrated:
    """One existing condition refitted by ``calibrate``: ``images`` of the sample it was fitted
    on, their mean bpd under its prior before (``bpd_before``) and after (``bpd``)."""

    spec: str
    images: int
    bpd_before: float
    bpd: float

    @property
    def gain(self) -> float:
        return self.bpd_before - self.bpd


@dataclass
class ExtendResult:
    """What an extension wrote; ``images``: how many images its flow pass scored (the new
    conditions' images and the calibration sample)."""

    run: Path
    checkpoint: str
    base: str
    store: Path
    conditions: list[NewCondition]
    frozen_conditions: int
    finetuned: bool
    refine_steps: int
    skipped: list[str]
    calibrated: list[Calibrated] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)
    images: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "run": str(self.run), "checkpoint": self.checkpoint, "base": self.base,
            "store": str(self.store), "finetuned": self.finetuned,
            "frozen": not self.finetuned, "frozen_conditions": self.frozen_conditions,
            "refine_steps": self.refine_steps, "skipped": self.skipped,
            "conditions": [{"spec": c.spec, "images": c.images, "bpd_base": c.bpd_base,
                            "bpd": c.bpd, "gain": c.gain, "added_for": c.added_for}
                           for c in self.conditions],
            "calibrated": [{"spec": c.spec, "images": c.images, "bpd_before": c.bpd_before,
                            "bpd": c.bpd, "gain": c.gain} for c in self.calibrated],
            "uncalibrated": self.uncalibrated, "images": self.images,
        }


@dataclass
class _Plan:
    """The conditions to add, in order, with the forms of new kinds."""

    specs: list[tuple[str, str]]
    kinds: dict[str, tuple[str, int | None]]
    added_for: dict[str, str]
    skipped: list[str]


@dataclass
class _Cache:
    """Residual statistics of the images of the new conditions and of the calibration
    sample (CPU, float32)."""

    rows: np.ndarray
    codes: np.ndarray
    s1: torch.Tensor
    s2: torch.Tensor
    top: torch.Tensor
    ladj: torch.Tensor


def extend_run(run: str | os.PathLike[str], options: ExtendOptions,
               progress: Progress | None = None) -> ExtendResult:
    """Add ``options.conditions`` to checkpoint ``options.checkpoint`` of ``run`` (the latest
    by default); write a new checkpoint.

    Raises:
        BadInputError: not a run; a store of another shape; a kind or value the store lacks
            (named with the nearest ones); a condition the model already has; a condition
            with fewer than 2 images in the split; ``out`` exists and is not empty.
        UsageError: no condition, a negative step count, ``finetune`` without steps.
        BusyError: another process holds the run (or ``out``).
        RunFailedError: the fine-tune's loss became non-finite (nothing is written).
    """
    run = Path(run)
    _check_options(options)
    read_run_record(run)
    with ExitStack() as stack:
        if options.out is None:
            stack.enter_context(fsio.exclusive_lock(run, "run directory"))
        elif options.out.exists() and (not options.out.is_dir() or any(options.out.iterdir())):
            raise BadInputError(f"--out {options.out}: exists and is not empty; expected a new "
                                "run directory")
        opened = open_run(run, options.checkpoint)
        return _extend(opened, options, progress)


def _check_options(options: ExtendOptions) -> None:
    if not options.conditions and not options.calibrate:
        raise UsageError("--condition: missing; expected at least one kind=value or kind "
                         "(or --calibrate N)")
    if options.calibrate < 0:
        raise UsageError(f"--calibrate {options.calibrate}: expected 0 or more images")
    if options.calibrate and options.finetune:
        raise UsageError("--calibrate with --finetune: the fine-tune trains every condition "
                         "already; expected one of them")
    if options.refine_steps < 0:
        raise UsageError(f"--refine-steps {options.refine_steps}: expected 0 or more")
    if options.finetune and options.refine_steps == 0:
        raise UsageError("--finetune: needs --refine-steps N > 0 (the fine-tune's steps)")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size}: expected 1 or more")
    if options.lr is not None and not options.lr > 0:
        raise UsageError(f"--lr {options.lr}: expected a positive number")


def _extend(opened: OpenRun, options: ExtendOptions, progress: Progress | None) -> ExtendResult:
    device = torch.device(options.device)
    model = opened.model.place(device)
    source = options.store if options.store is not None else opened.record.get("store")
    if not source:
        raise BadInputError(f"{opened.path / 'run.json'}: names no training store; expected "
                            "--store PATH")
    store = Path(source)
    view = read_store(store)
    check_shape(view, model)
    split_rows = view.rows(options.split)

    plan = plan_conditions(model.registry, view, options.conditions, options.prior, split_rows)
    frozen = len(model.registry)
    new = add_conditions(model, view, plan, split_rows)
    codes = model_codes(view, model.registry)[split_rows]
    rows, own = _images_of(model.registry, codes, split_rows, new)
    old: list[int] = []
    uncalibrated: list[str] = []
    if options.calibrate:
        rows, own, old, uncalibrated = _with_sample(model.registry, view, split_rows, rows,
                                                    new, frozen, options)

    cache = _residual_cache(model, view, rows, options, progress)
    fitted = old + new
    before = _bpd_under(model, old, cache, own[:, : len(old)])
    for j, index in enumerate(fitted):
        _fit(model, index, cache, own[:, j])
    config = _run_config(opened.path)
    if options.finetune:
        _finetune(model, view, split_rows, codes, options, config, progress)
        cache = _residual_cache(model, view, rows, options, progress)
    elif options.refine_steps:
        _refine(model, fitted, cache, own, options, float(config.get("beta", 0.01)), progress)

    report = _report(model, new, cache, own[:, len(old):], plan)
    after = _bpd_under(model, old, cache, own[:, : len(old)])
    calibrated = [Calibrated(model.registry.condition(index).spec, int(own[:, j].sum()),
                             before[j], after[j]) for j, index in enumerate(old)]
    result = ExtendResult(
        run=options.out or opened.path, checkpoint="", base=opened.checkpoint, store=store,
        conditions=report, frozen_conditions=frozen - len(old), finetuned=options.finetune,
        refine_steps=options.refine_steps, skipped=plan.skipped, calibrated=calibrated,
        uncalibrated=uncalibrated, images=len(rows),
    )
    result.checkpoint = write_extension(opened, options.out, model.cpu(), result, view)
    return result


# -- which conditions ---------------------------------------------------------------------


def plan_conditions(registry: Any, view: StoreView, specs: Sequence[str],
                    prior: dict[str, str], rows: np.ndarray) -> _Plan:
    """Resolve ``specs`` against the store and the model into new ``(kind, value)`` pairs.

    A value with fewer than ``MIN_IMAGES`` images in ``rows`` is an error when named, and
    skipped (and listed) when its kind is named as a whole.
    """
    from tzkcli.training.config import parse_prior_form

    present = {kind: np.bincount(view.codes[kind][rows][view.codes[kind][rows] >= 0],
                                 minlength=len(view.values[kind])) for kind in view.kinds}
    chosen: list[tuple[str, str]] = []
    skipped: list[str] = []
    for spec in specs:
        kind, value = parse_condition(spec) if "=" in spec else (spec, None)
        _store_kind(view, kind, spec)
        has = set(registry.values(kind)) if kind in registry.kinds else set()
        if value is not None:
            _store_value(view, kind, value, spec)
            if value in has:
                raise BadInputError(f"--condition {spec}: the model already has this condition; "
                                    "expected a new one (existing conditions stay frozen)")
            count = int(present[kind][view.values[kind].index(value)])
            if count < MIN_IMAGES:
                raise BadInputError(f"--condition {spec}: {count} images in split "
                                    f"{view_split(view, rows)}, expected at least {MIN_IMAGES}")
            candidates = [value]
        else:
            missing = [v for v in view.values[kind] if v not in has]
            if not missing:
                raise BadInputError(f"--condition {kind}: every value of kind {kind!r} in "
                                    f"{view.path} is already a condition of the model; "
                                    "expected a kind with new values")
            candidates = [v for v in missing
                          if present[kind][view.values[kind].index(v)] >= MIN_IMAGES]
            skipped += [f"{kind}={v}" for v in missing if v not in candidates]
        chosen += [(kind, v) for v in candidates if (kind, v) not in chosen]

    kinds = {}
    for kind in dict.fromkeys(k for k, _ in chosen):
        if kind not in registry.kinds:
            kinds[kind] = parse_prior_form(kind, prior.get(kind, "gaussian"))
    for kind in prior:
        if kind not in kinds:
            raise UsageError(f"--prior {kind}={prior[kind]}: {kind!r} is not a new kind of this "
                             "extension; expected the kind of a new --condition")
    chosen, added_for = _with_datasets(registry, view, chosen, rows)
    return _Plan(chosen, kinds, added_for, skipped)


def view_split(view: StoreView, rows: np.ndarray) -> str:
    codes = np.unique(view.split_codes[rows])
    return "+".join(view.splits[c] for c in codes) if len(codes) else "(empty)"


def _store_kind(view: StoreView, kind: str, spec: str) -> None:
    if kind not in view.kinds:
        raise BadInputError(f"--condition {spec}: the store {view.path} has no kind {kind!r}; "
                            f"{nearest(kind, view.kinds)}")


def _store_value(view: StoreView, kind: str, value: str, spec: str) -> None:
    if value not in view.values[kind]:
        specs = [f"{kind}={v}" for v in view.values[kind]]
        raise BadInputError(f"--condition {spec}: no such condition in the store {view.path}; "
                            f"{nearest(spec, specs)}")


def _with_datasets(registry: Any, view: StoreView, chosen: list[tuple[str, str]],
                   rows: np.ndarray) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Prepend the datasets the model lacks whose images carry a new condition."""
    known = set(registry.values(DATASET))
    planned = {v for k, v in chosen if k == DATASET}
    datasets = view.codes[DATASET][rows]
    added: dict[str, str] = {}
    for kind, value in chosen:
        if kind == DATASET:
            continue
        carriers = datasets[view.codes[kind][rows] == view.values[kind].index(value)]
        for code in np.unique(carriers).tolist():
            name = view.values[DATASET][code]
            if name not in known and name not in planned:
                planned.add(name)
                added[f"{DATASET}={name}"] = f"{kind}={value}"
    extra = [(DATASET, spec.split("=", 1)[1]) for spec in added]
    return extra + chosen, added


def add_conditions(model: Any, view: StoreView, plan: _Plan, rows: np.ndarray) -> list[int]:
    """Register the plan's kinds and conditions, the store's domains and the new rates."""
    registry = model.registry
    for kind, (form, rank) in plan.kinds.items():
        registry.add_kind(kind, form=form, rank=rank)
    new = [model.add_condition(kind, value) for kind, value in plan.specs]
    _set_domains(registry, view)
    _recount(model.rates, registry, view, rows, plan)
    return new


def _set_domains(registry: Any, view: StoreView) -> None:
    """The store's domains for the datasets it shares with the model (old values kept)."""
    datasets = [d for d in registry.values(DATASET) if d in view.values[DATASET]]
    store_rows = [view.values[DATASET].index(d) for d in datasets]
    for kind in registry.kinds:
        if kind not in view.kinds:
            continue
        values = registry.values(kind)
        matrix = np.zeros((len(datasets), len(values)), dtype=bool)
        for j, value in enumerate(values):
            if value in view.values[kind]:
                column = view.domains[kind][store_rows, view.values[kind].index(value)]
                matrix[:, j] = column
            else:
                matrix[:, j] = [registry.admissible(kind, d, value) for d in datasets]
        registry.set_domain(kind, matrix, datasets=datasets, values=values)


def _recount(rates: Any, registry: Any, view: StoreView, rows: np.ndarray, plan: _Plan) -> None:
    """Re-estimate the rates of each kind that gains values from the store's counts."""
    codes = model_codes(view, registry)[rows]
    new_datasets = {v for k, v in plan.specs if k == DATASET}
    for kind in dict.fromkeys(k for k, _ in plan.specs):
        column = registry.kinds.index(kind)
        tally = np.bincount(codes[:, column][codes[:, column] >= 0],
                            minlength=len(registry.values(kind)))
        for value, n in zip(registry.values(kind), tally.tolist()):
            if value in view.values[kind]:
                rates.counts[f"{kind}={value}"] = int(n)
    dataset_values = registry.values(DATASET)
    rates.total += int(sum(int((codes[:, 0] == dataset_values.index(name)).sum())
                           for name in new_datasets))


def _images_of(registry: Any, codes: np.ndarray, rows: np.ndarray,
               new: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows carrying at least one new condition, and which ones (bool ``[n, n_new]``)."""
    own = _membership(registry, codes, new)
    keep = own.any(axis=1)
    return rows[keep], own[keep]


def _membership(registry: Any, codes: np.ndarray, indices: list[int]) -> np.ndarray:
    """bool ``[n, len(indices)]``: whether each row's known value is each condition."""
    own = np.zeros((len(codes), len(indices)), dtype=bool)
    for j, index in enumerate(indices):
        condition = registry.condition(index)
        column = registry.kinds.index(condition.kind)
        own[:, j] = codes[:, column] == registry.values(condition.kind).index(condition.value)
    return own


def _with_sample(registry: Any, view: StoreView, split_rows: np.ndarray, rows: np.ndarray,
                 new: list[int], frozen: int, options: ExtendOptions
                 ) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """Add ``options.calibrate`` random rows of the split for the old conditions' refit.

    Returns the rows of the flow pass (the new conditions' rows and the sample, sorted), the
    membership ``[n, n_old + n_new]`` (an old condition owns only its rows in the sample), the
    old conditions refitted (those with at least ``MIN_IMAGES`` in the sample) and the specs
    of the others.
    """
    draw = np.random.default_rng(options.seed)
    size = min(options.calibrate, len(split_rows))
    sample = np.sort(draw.choice(split_rows, size=size, replace=False))
    union = np.union1d(rows, sample)
    codes = model_codes(view, registry)[union]
    own_old = _membership(registry, codes, list(range(frozen))) & np.isin(union, sample)[:, None]
    enough = own_old.sum(axis=0) >= MIN_IMAGES
    old = [index for index in range(frozen) if enough[index]]
    skipped = [registry.condition(index).spec for index in range(frozen) if not enough[index]]
    own = np.concatenate([own_old[:, enough], _membership(registry, codes, new)], axis=1)
    return union, own, old, skipped


# -- fitting -------------------------------------------------------------------------------


def _residual_cache(model: Any, view: StoreView, rows: np.ndarray, options: ExtendOptions,
                    progress: Progress | None) -> _Cache:
    """One flow pass over ``rows``: their residual statistics and ladj (seeded noise)."""
    device = model.priors.anchor.device
    generator = seeded(options.seed, 0, device)
    parts: dict[str, list[torch.Tensor]] = {"s1": [], "s2": [], "top": [], "ladj": []}
    model.eval()
    done = 0
    with torch.no_grad():
        for _, x in view.batches(rows, options.batch_size):
            r, ladj = model.residuals(x.to(device), generator)
            stats = model.priors.stats(r)
            for key, value in (("s1", stats.s1), ("s2", stats.s2), ("top", stats.top),
                               ("ladj", ladj)):
                parts[key].append(value.float().cpu())
            done += len(x)
            if progress is not None:
                progress("flow pass", done, len(rows))
    split_codes = model_codes(view, model.registry)[rows]
    return _Cache(rows, split_codes, *(torch.cat(parts[k]) for k in ("s1", "s2", "top", "ladj")))


def _fit(model: Any, index: int, cache: _Cache, mask: np.ndarray) -> None:
    """Closed-form fit of condition ``index`` on the cached residuals of its images."""
    module = model.priors.conditions[index]
    layout = model.priors.layout
    chosen = torch.from_numpy(mask)
    n = int(chosen.sum())
    counts = layout.counts
    s1 = cache.s1[chosen].double().sum(0)
    s2 = cache.s2[chosen].double().sum(0)
    mean = s1 / (n * counts)
    log_std = 0.5 * torch.log((s2 / (n * counts) - mean.square()).clamp(min=VAR_FLOOR))

    with torch.no_grad():
        if module.form == "gaussian":
            module.loc.copy_(mean)
            module.log_scale.copy_(log_std)
            return
        split = layout.n_split
        module.loc.copy_(mean[:split])
        module.log_scale.copy_(log_std[:split])
        top_mean, factor, log_noise = ppca(cache.top[chosen].double(), module.factor.shape[1])
        module.mean.copy_(top_mean)
        module.factor.copy_(factor)
        module.log_noise.copy_(log_noise)


def ppca(top: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form probabilistic PCA of ``top`` ``[n, D]``: ``(m [D], W [D, q], log s [])``.

    ``C = U diag(l) U^T`` (eigenvalues descending), ``s^2 = mean(l_{q+1..D})`` floored at
    ``VAR_FLOOR``, ``W = U_q (diag(l_1..q) - s^2)^(1/2)`` (columns whose eigenvalue is below
    ``s^2`` are zero).
    """
    mean = top.mean(dim=0)
    centred = top - mean
    covariance = centred.T @ centred / top.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    rest = eigenvalues[rank:]
    noise = rest.mean().clamp(min=VAR_FLOOR) if rest.numel() else torch.tensor(VAR_FLOOR)
    factor = eigenvectors[:, :rank] * (eigenvalues[:rank] - noise).clamp(min=0).sqrt()
    return mean, factor, 0.5 * torch.log(noise)


def _stats(cache: _Cache, positions: torch.Tensor, like: torch.Tensor) -> ResidualStats:
    return ResidualStats(cache.s1[positions].to(like), cache.s2[positions].to(like),
                         cache.top[positions].to(like))


def _refine(model: Any, new: list[int], cache: _Cache, own: np.ndarray, options: ExtendOptions,
            beta: float, progress: Progress | None) -> None:
    """Adam on the new conditions' parameters only: own-prior bpd + beta * kind CE."""
    registry = model.registry
    anchor = model.priors.anchor
    parameters = model.condition_parameters(new)
    optimizer = torch.optim.Adam(parameters, lr=options.lr or REFINE_LR)
    own_t = torch.from_numpy(own).to(anchor.device)
    codes = torch.from_numpy(cache.codes).to(anchor.device)
    kinds = list(dict.fromkeys(registry.condition(k).kind for k in new))
    unit = model.dims * math.log(2)
    order = torch.Generator().manual_seed(options.seed)
    model.train()
    for step in range(options.refine_steps):
        positions = torch.randperm(len(cache.rows), generator=order)[:options.batch_size]
        stats = _stats(cache, positions, anchor)
        mask = own_t[positions.to(anchor.device)].to(anchor.dtype)
        log_prob = model.priors.log_prob(stats, new)
        loss = -(log_prob * mask).sum() / mask.sum().clamp(min=1) / unit
        if beta:
            loss = loss + beta * _kind_ce(model, stats, codes[positions.to(anchor.device)],
                                          kinds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress("refine", step + 1, options.refine_steps)
    model.eval()


def _kind_ce(model: Any, stats: ResidualStats, codes: torch.Tensor, kinds: list[str]) -> Any:
    """Cross-entropy in bits of each kind's posterior on images whose value is known."""
    from tzkcli.knowledge.inference import posterior_logits

    registry = model.registry
    total = stats.s1.new_zeros(())
    for kind in kinds:
        column = registry.kinds.index(kind)
        known = codes[:, column] >= 0
        if not bool(known.any()):
            continue
        log_prior = model.priors.log_prob(stats, registry.condition_indices(kind))[known]
        admissible = None
        if kind != DATASET:
            admissible = registry.domain(kind).to(codes.device)[codes[known, 0]]
        logits = posterior_logits(log_prior, model.rates.log_categorical(kind, log_prior.dtype)
                                  .to(log_prior.device), admissible)
        log_post = torch.log_softmax(logits, dim=1)
        picked = log_post.gather(1, codes[known, column][:, None])[:, 0]
        total = total - picked.mean() / math.log(2)
    return total


def _finetune(model: Any, view: StoreView, rows: np.ndarray, codes: np.ndarray,
              options: ExtendOptions, config: dict[str, Any],
              progress: Progress | None) -> None:
    """Every parameter, the full objective, batches of the store's images the model knows.

    Gradients are clipped to the run's ``grad_clip`` (0: none), as in training. A non-finite
    loss stops the fine-tune with :class:`~tzkcli.errors.RunFailedError`; the caller then
    writes nothing.
    """
    device = model.priors.anchor.device
    known = codes[:, 0] >= 0
    rows, codes = rows[known], codes[known]
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr or FINETUNE_LR)
    order = np.random.default_rng(options.seed)
    beta = float(config.get("beta", 0.01))
    impute = str(config.get("impute", "posterior"))
    grad_clip = float(config.get("grad_clip", 0.0))
    model.train()
    for step in range(options.refine_steps):
        chosen = np.sort(order.choice(len(rows), min(options.batch_size, len(rows)),
                                      replace=False))
        _, x = next(view.batches(rows[chosen], len(chosen)))
        generator = seeded(options.seed, 10_000 + step, device)
        loss, _ = model.objective(x.to(device), torch.from_numpy(codes[chosen]).to(device),
                                  beta=beta, impute=impute, generator=generator)
        if not bool(torch.isfinite(loss)):
            raise RunFailedError(f"--finetune: non-finite loss at step {step + 1}; expected "
                                 "finite losses (try a lower --lr); nothing was written")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if progress is not None:
            progress("fine-tune", step + 1, options.refine_steps)
    model.eval()


def _bpd_under(model: Any, indices: list[int] | None, cache: _Cache,
               own: np.ndarray) -> list[float]:
    """Mean bpd of each condition's own cached images (column ``j`` of ``own``) under its
    prior; ``indices`` None: under ``p_0``."""
    if indices is not None and not indices:
        return []
    anchor = model.priors.anchor
    with torch.no_grad():
        stats = _stats(cache, torch.arange(len(cache.rows)), anchor)
        ladj = cache.ladj.to(anchor)[:, None]
        log_prior = (model.priors.base_log_prob(stats)[:, None] if indices is None
                     else model.priors.log_prob(stats, indices))
        bpd = model.bpd(log_prior, ladj).double().cpu()
    mask = torch.from_numpy(own)
    return [float(bpd[mask[:, j], 0 if indices is None else j].mean())
            for j in range(own.shape[1])]


def _report(model: Any, new: list[int], cache: _Cache, own: np.ndarray,
            plan: _Plan) -> list[NewCondition]:
    """Per new condition: images used, mean bpd under ``p_0`` and under its prior."""
    bpd_base = _bpd_under(model, None, cache, own)
    bpd = _bpd_under(model, new, cache, own)
    out = []
    for j, index in enumerate(new):
        spec = model.registry.condition(index).spec
        out.append(NewCondition(spec, int(own[:, j].sum()), bpd_base[j], bpd[j],
                                plan.added_for.get(spec)))
    return out


def _run_config(run: Path) -> dict[str, Any]:
    """The run's resolved training configuration (``config.toml``), or {} when absent."""
    path = run / "config.toml"
    if not path.is_file():
        return {}
    from tzkcli.training.config import read_config_file

    return read_config_file(path)


# -- writing -------------------------------------------------------------------------------


def extension_name(checkpoints: Path, base: str) -> str:
    """``step-NNNNNNNN-extend-K``: the base's step, ``K`` one more than any extension there."""
    step = base[len("step-"):].split("-", 1)[0]
    taken = [0]
    for path in checkpoints.glob("step-*-extend-*") if checkpoints.is_dir() else []:
        tail = path.name.rsplit("-", 1)[-1]
        if tail.isdigit():
            taken.append(int(tail))
    return f"step-{step}-extend-{max(taken) + 1}"


def write_extension(opened: OpenRun, out: Path | None, model: Any, result: ExtendResult,
                    view: StoreView) -> str:
    """Write the extended model as a verified checkpoint into the run or ``out``; return its
    name. The run lock is held by the caller for an in-place extension, and here for ``out``."""
    target = out or opened.path
    with ExitStack() as stack:
        if out is not None:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise fsio.write_error(out, error) from error
            stack.enter_context(fsio.exclusive_lock(out, "run directory"))
        checkpoints = target / CHECKPOINTS
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise fsio.write_error(checkpoints, error) from error
        name = extension_name(checkpoints, opened.checkpoint)
        result.checkpoint = name
        record = result.to_json() | {"store_digest": view.digest,
                                     "source": str(opened.checkpoint_path)}
        _write_checkpoint(checkpoints, name, model, record)
        _write_record(opened, out, name, view)
    return name


def _write_checkpoint(checkpoints: Path, name: str, model: Any, record: dict[str, Any]) -> None:
    """The training's checkpoint writer into a staging folder, then one atomic rename."""
    from tzkcli.training import checkpoint as ckpt

    step = int(name[len("step-"):].split("-", 1)[0])

    def save(path: Path) -> None:
        model.save(path)
        (path.parent / "extension.json").write_text(json.dumps(record, indent=2) + "\n",
                                                    encoding="utf-8")

    fsio.remove_stale_temporaries(checkpoints, f"{name}.")
    staging = Path(tempfile.mkdtemp(prefix=f"{fsio.TMP_PREFIX}{name}.", dir=checkpoints))
    try:
        state = {"step": step, "extension": json.dumps(record)}
        written = ckpt.write_checkpoint(staging, step, save, state)
        os.rename(written.path, checkpoints / name)
        fsio.fsync_dir(checkpoints)
    except OSError as error:
        raise fsio.write_error(checkpoints / name, error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_record(opened: OpenRun, out: Path | None, name: str, view: StoreView) -> None:
    from tzkcli.training import checkpoint as ckpt

    if out is None:
        record = dict(opened.record) | {"latest": name, "extended_from": opened.checkpoint}
        ckpt.write_run_record(opened.path, record)
        return
    config = opened.path / "config.toml"
    if config.is_file():
        fsio.atomic_write_bytes(out / "config.toml", config.read_bytes())
    ckpt.write_run_record(out, {
        "status": "extended", "step": int(name[len("step-"):].split("-", 1)[0]),
        "store": opened.record.get("store"), "store_digest": opened.record.get("store_digest"),
        "latest": name, "best": None, "best_bpd": None,
        "extended_from": str(opened.checkpoint_path.resolve()),
    })
