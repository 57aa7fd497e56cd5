"""The TzK model: a flow, the conditional priors of every condition, and the knowledge rates.

The design is a reconstruction from the stated claims of Livne and Fleet's TzK paper (arXiv
1902.01893), whose equations are not available to this project; ``docs/model.md`` describes
it. In short: the flow maps a dequantised image to standardised residuals ``r`` with
``log p_0(x) = log N(r; 0, I) + ladj``; each condition ``k`` has a prior ``p_k(r)``; so
``log p_k(x) = log p_k(r) + ladj`` and one flow pass scores an image under every condition.

Units: bits per dimension at ``n_bits`` bits per pixel, uniform dequantisation
``x~ = (x + u) / 2^n_bits``, ``u ~ U[0, 1)^D``, ``D = C * H * W``:

``bpd = -(log q(r) + ladj - D log 2^n_bits) / (D log 2)
      = prior + ladj_term + n_bits``

with ``prior = -log q(r) / (D log 2)`` and ``ladj_term = -ladj / (D log 2)``; the
dequantisation term is exactly ``n_bits``.

Save format (a directory): ``model.json`` (format ``tzk-model`` version 4: config, registry,
rates, the weights file's name and sha256) and ``weights-HASH.pt`` (``torch.save`` of the
``state_dict``, read back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from tzkcli import fsio
from tzkcli.errors import BadInputError
from tzkcli.knowledge import (
    DATASET,
    Composition,
    ConditionPriors,
    KnowledgeRates,
    Mixture,
    Registry,
    compose,
    composition_log_prob,
    existence,
    posterior,
    posterior_logits,
    sample_residuals,
)
from tzkcli.knowledge.priors import ResidualStats

FORMAT = "tzk-model"
# 2: the floored affine coupling that multiplies towards the latents and the bounded split
# prior; a version-1 model's weights would load but map images differently.
# 3: Glow's log-scale factor in actnorm and the coupling networks' output gain (new names).
# 4: the affine coupling's floor in the flow's config (``scale_floor``, default 0.05); a
# version-3 model is read as ``scale_floor = 0.5``, the floor it was built with.
VERSION = 4
READABLE_VERSIONS = (3, 4)
VERSION_3_SCALE_FLOOR = 0.5
MANIFEST = "model.json"
IMPUTE = ("posterior", "prior", "none")


@runtime_checkable
class Flow(Protocol):
    """What TzK needs of a flow (``tzkcli.flows.Glow`` is one; see docs/architecture.md).

    ``forward(x)``: float ``[B, C, H, W]`` in ``[0, 1)`` -> (``r``, a list of ``L`` tensors
    ``[B, C_i, H_i, W_i]``, top level last, standard normal under ``p_0``; ``ladj`` ``[B]``).
    ``inverse(r)`` -> (``x``, ``ladj`` of the inverse). ``initialize(x)`` sets data-dependent
    state once. ``latent_shapes``: ``[(C_i, H_i, W_i)]``.
    """

    latent_shapes: list[tuple[int, int, int]]

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]: ...

    def inverse(self, r: list[Tensor]) -> tuple[Tensor, Tensor]: ...

    def initialize(self, x: Tensor) -> None: ...


@dataclass(frozen=True)
class ModelConfig:
    """A TzK model's configuration.

    Attributes:
        flow: the Glow's ``GlowConfig``; None for a model built around a caller's own flow
            (``TzK(config, registry, flow=...)``), which must then be passed to :meth:`TzK.load`.
        n_bits: bits kept per pixel, 1 to 8.
    """

    flow: Any = None
    n_bits: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.n_bits, bool) or not isinstance(self.n_bits, int) \
                or not 1 <= self.n_bits <= 8:
            raise BadInputError(f"ModelConfig.n_bits: found {self.n_bits!r}, expected 1..8")

    def to_json(self) -> dict[str, Any]:
        flow = None if self.flow is None else self.flow.to_dict()
        return {"flow": flow, "n_bits": self.n_bits}

    @classmethod
    def from_json(cls, data: Any, source: str = "config") -> ModelConfig:
        if not isinstance(data, dict) or set(data) != {"flow", "n_bits"}:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise BadInputError(f"{source}: found {found}, expected keys ['flow', 'n_bits']")
        flow = data["flow"]
        if flow is not None:
            from tzkcli.flows import GlowConfig

            flow = GlowConfig.from_dict(flow)
        return cls(flow=flow, n_bits=data["n_bits"])


@dataclass
class BpdParts:
    """The terms of bpd, each in bits per dimension: ``bpd = prior + ladj + dequantisation``.

    Attributes:
        prior_base: ``[B]`` ``-log p_0(r) / (D log 2)``.
        prior: ``[B, K]`` ``-log p_k(r) / (D log 2)`` for each chosen condition.
        ladj: ``[B]`` ``-ladj / (D log 2)`` (shared by every prior).
        dequantisation: ``n_bits`` (``D log 2^n_bits / (D log 2)``).
    """

    prior_base: Tensor
    prior: Tensor
    ladj: Tensor
    dequantisation: float


@dataclass
class Scores:
    """An image batch scored under ``p_0`` and chosen conditions from one flow pass.

    Attributes:
        conditions: global indices of the columns of ``bpd`` and ``log_prior``.
        bpd_base: ``[B]`` bits/dim under ``p_0``.
        bpd: ``[B, K]`` bits/dim under each condition.
        parts: the terms of both (:class:`BpdParts`).
        log_prior_base: ``[B]`` ``log p_0(r)`` in nats; log_prior ``[B, K]`` ``log p_k(r)``.
        ladj: ``[B]`` the flow's ladj in nats.
        dims: ``D``; n_bits: bits per pixel.
    """

    conditions: list[int]
    bpd_base: Tensor
    bpd: Tensor
    parts: BpdParts
    log_prior_base: Tensor
    log_prior: Tensor
    ladj: Tensor
    dims: int
    n_bits: int = 8
    stats: ResidualStats | None = field(default=None, repr=False)


class TzK(nn.Module):
    """A flow whose latent prior is conditioned on knowledge (see the module docstring).

    Args:
        config: the model's configuration.
        registry: kinds and conditions; one prior is created per condition, and conditions
            added to the registry later get theirs at the next call (``extend``).
        flow: a flow satisfying :class:`Flow`; default ``Glow(config.flow)``.
        rates: knowledge rates; default no counts (uniform categoricals). Count the training
            codes with ``model.rates.count(codes)``.

    Priors and log-determinants are computed in the priors' dtype (float32 unless the model
    is converted to float64), whatever dtype the flow's residuals come in.

    Warning:
        A condition added after an optimiser was built is not in that optimiser: add its
        ``condition_parameters`` as a new parameter group. Generators passed to any method
        must live on the model's device. The rates change only through ``rates.count``.
    """

    def __init__(
        self,
        config: ModelConfig,
        registry: Registry,
        flow: nn.Module | None = None,
        rates: KnowledgeRates | None = None,
    ) -> None:
        super().__init__()

        if flow is None:
            if config.flow is None:
                raise BadInputError("ModelConfig.flow: found None, expected a GlowConfig "
                                    "(or pass flow=)")
            from tzkcli.flows import Glow

            flow = Glow(config.flow)
        if not isinstance(flow, nn.Module) or not isinstance(flow, Flow):
            raise BadInputError(f"flow: found {type(flow).__name__}, expected an nn.Module "
                                "with forward, inverse, initialize and latent_shapes")
        self.config = config
        self.registry = registry
        self.rates = KnowledgeRates(registry) if rates is None else rates
        self.flow = flow
        self.priors = ConditionPriors(flow.latent_shapes)
        self.dims = self.priors.layout.dims
        self._cache: dict[str, Any] = {}
        self._sync()

    def place(self, device: torch.device | str) -> TzK:
        """Move the model to ``device``; on the CPU also put the flow in channels_last.

        oneDNN's channels_last convolutions train tzk's Glow 1.1x to 1.5x as fast as NCHW on
        the CPU, with the same results to float32 rounding (docs/benchmarks.md). Every command
        places its model with this; build any optimiser afterwards (the layout change
        replaces 4-d parameters).
        """
        device = torch.device(device)
        self.to(device)
        if device.type == "cpu":
            self.flow.to(memory_format=torch.channels_last)
        return self

    # -- preprocessing ---------------------------------------------------------------------

    def dequantise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 images ``[B, C, H, W]`` -> ``x~ = (x // 2^(8 - n_bits) + u) / 2^n_bits``.

        ``u = torch.rand(x.shape, generator=generator)`` on the model's device and dtype (the
        global RNG when ``generator`` is None).
        """
        self._check_images(x)
        levels = 2 ** self.config.n_bits
        reduced = torch.div(x, 2 ** (8 - self.config.n_bits), rounding_mode="floor")
        like = {"device": self.priors.anchor.device, "dtype": self.priors.dtype}
        u = torch.rand(x.shape, generator=generator, **like)
        return (reduced.to(**like) + u) / levels

    def initialize(self, x: Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialisation of the flow (actnorm) on a first uint8 batch."""
        self.flow.initialize(self.dequantise(x, generator))

    def residuals(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """One flow pass: uint8 images -> (``r`` per level, ``ladj`` ``[B]``), priors' dtype."""
        self._sync()
        r, ladj = self.flow(self.dequantise(x, generator))
        return [level.to(self.priors.dtype) for level in r], ladj.to(self.priors.dtype)

    # -- likelihood ------------------------------------------------------------------------

    def score(
        self,
        x: Tensor,
        conditions: Sequence[int | str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Scores:
        """bpd under ``p_0`` and under each condition (default all) from one flow pass.

        Args:
            x: uint8 ``[B, C, H, W]``.
            conditions: global indices or ``"kind=value"`` specs.
            generator: the dequantisation noise's generator.
        """
        indices = (list(range(len(self.registry))) if conditions is None
                   else self.registry.resolve(conditions))
        r, ladj = self.residuals(x, generator)

        stats = self.priors.stats(r)
        log_base = self.priors.base_log_prob(stats)
        log_prior = self.priors.log_prob(stats, indices)
        return self._scores(indices, log_base, log_prior, ladj, stats)

    def _scores(
        self, indices: list[int], log_base: Tensor, log_prior: Tensor, ladj: Tensor,
        stats: ResidualStats,
    ) -> Scores:
        unit = self.dims * math.log(2)
        parts = BpdParts(prior_base=-log_base / unit, prior=-log_prior / unit,
                         ladj=-ladj / unit, dequantisation=float(self.config.n_bits))
        extra = parts.ladj + parts.dequantisation
        return Scores(
            conditions=indices, bpd_base=parts.prior_base + extra,
            bpd=parts.prior + extra[:, None], parts=parts, log_prior_base=log_base,
            log_prior=log_prior, ladj=ladj, dims=self.dims, n_bits=self.config.n_bits,
            stats=stats,
        )

    def bpd(self, log_prior: Tensor, ladj: Tensor) -> Tensor:
        """bits/dim from ``log q(r)`` and ``ladj`` (nats, broadcastable)."""
        dequantisation = self.dims * self.config.n_bits * math.log(2)
        return -(log_prior + ladj - dequantisation) / (self.dims * math.log(2))

    def score_composition(
        self,
        x: Tensor,
        conditions: Sequence[int | str],
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Composition]:
        """bpd ``[B]`` under the composition of several conditions, and the composition."""
        composition = self.compose(conditions)
        r, ladj = self.residuals(x, generator)
        log_prior = composition_log_prob(self.priors.stats(r), composition, self.priors)
        return self.bpd(log_prior, ladj), composition

    # -- inference -------------------------------------------------------------------------

    def posterior(
        self,
        x: Tensor,
        kind: str,
        datasets: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``p(k | x)`` over the values of ``kind``, ``[B, V]``.

        Args:
            datasets: int ``[B]`` each image's ``dataset`` code, to restrict the values to the
                dataset's domain (rows where the kind does not apply are all zero); None
                allows every value.
        """
        scores = self.score(x, self.registry.condition_indices(kind), generator)
        admissible = None if datasets is None else self._domain(kind)[datasets.to(
            self.priors.anchor.device)]
        log_rates = self.rates.log_categorical(kind, self.priors.dtype)
        return posterior(scores.log_prior, log_rates.to(scores.log_prior.device), admissible)

    def existence(
        self,
        x: Tensor,
        conditions: Sequence[int | str],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``p(e_k = 1 | x)`` for each condition, ``[B, K]``."""
        scores = self.score(x, conditions, generator)
        rate = self.rates.existence(self.priors.dtype)[scores.conditions]
        return existence(scores.log_prior, scores.log_prior_base, rate.to(scores.ladj.device))

    def code(
        self, x: Tensor, condition: int | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """The bottleneck code ``E[c | r]`` of each image under a condition, ``[B, q]``."""
        index = self.registry.index(condition)
        r, _ = self.residuals(x, generator)
        return self.priors.code(self.priors.stats(r), index)

    def compose(self, conditions: Sequence[int | str]) -> Composition:
        """The composition of several conditions (see ``tzkcli.knowledge.composition``)."""
        self._sync()
        return compose(self.registry.resolve(conditions), self.registry, self.priors,
                       self.rates)

    # -- objective -------------------------------------------------------------------------

    def objective(
        self,
        x: Tensor,
        codes: Tensor,
        beta: float = 0.01,
        impute: str = "posterior",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of a batch, in bits per dimension, from one flow pass.

        ``loss = mean_B [ mean over q in {p_0} ∪ {p_k : e_k = 1} of bpd_q(x)
        + beta * sum_kinds CE_bits(p(. | x), known value) ]``

        Args:
            x: uint8 ``[B, C, H, W]``.
            codes: int ``[B, n_kinds]``, per kind the value index in registry kind order, -1
                unknown; the ``dataset`` column must be known.
            beta: weight of the classification cross-entropy (in bits; 0 turns it off).
            impute: for unknown values, sample ``k`` from the detached posterior within the
                image's admissible values (``"posterior"``), from ``pi`` restricted to them
                (``"prior"``), or leave them out (``"none"``). A kind with no admissible value
                for the image's dataset does not apply to it.
            generator: the generator of the dequantisation noise and the imputation draws.

        Returns:
            ``(loss, parts)``; parts (detached 0-d tensors): ``bpd`` (the likelihood term),
            ``bpd_base`` (under ``p_0``), ``bpd_conditions`` (mean over the active
            conditions), ``ce`` (bits, summed over kinds), ``imputed`` (imputed values per
            image).
        """
        if impute not in IMPUTE:
            raise BadInputError(f"impute: found {impute!r}, expected one of {IMPUTE}")
        self._check_images(x)
        codes = self._check_codes(codes, x.shape[0])
        r, ladj = self.residuals(x, generator)
        stats = self.priors.stats(r)
        log_base = self.priors.base_log_prob(stats)
        log_prior = self.priors.log_prob(stats)

        active, ce, imputed = self._knowledge_terms(codes, log_prior, beta, impute, generator)
        bpd_base = self.bpd(log_base, ladj)
        bpd_conditions = self.bpd(log_prior, ladj[:, None])
        n_active = active.sum(dim=1)
        bpd = (bpd_base + (active * bpd_conditions).sum(dim=1)) / (1 + n_active)
        loss = bpd.mean() + beta * ce.mean()

        parts = {
            "bpd": bpd.mean(), "bpd_base": bpd_base.mean(),
            "bpd_conditions": (active * bpd_conditions).sum() / n_active.sum().clamp(min=1),
            "ce": ce.mean(), "imputed": imputed.mean(),
        }
        return loss, {key: value.detach() for key, value in parts.items()}

    def _knowledge_terms(
        self, codes: Tensor, log_prior: Tensor, beta: float, impute: str,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Active conditions ``[B, K]`` (0/1), CE in bits ``[B]``, imputed count ``[B]``."""
        batch = codes.shape[0]
        active = log_prior.new_zeros(batch, len(self.registry))
        ce = log_prior.new_zeros(batch)
        imputed = log_prior.new_zeros(batch)
        datasets = codes[:, 0]

        for column, kind in enumerate(self.registry.kinds):
            indices = self._indices(kind)
            if len(indices) == 0:
                continue
            code = codes[:, column]
            known = code >= 0
            admissible = self._domain(kind)[datasets]
            if kind == DATASET:
                admissible = torch.ones_like(admissible)
            log_rates = self._log_rates(kind)
            logits = posterior_logits(log_prior[:, indices], log_rates, admissible)
            # Rows where the kind does not apply would be all -inf: NaN in log_softmax.
            applies = admissible.any(dim=1)
            logits = torch.where(applies[:, None], logits, torch.zeros_like(logits))

            # scatter_add_ rather than boolean indexing: no device synchronisation.
            safe_code = code.clamp(min=0)
            active.scatter_add_(1, indices[safe_code][:, None], known.to(active.dtype)[:, None])
            if beta:
                log_post = torch.log_softmax(logits, dim=1)
                picked = log_post.gather(1, safe_code[:, None])[:, 0]
                ce = ce - torch.where(known, picked, torch.zeros_like(picked)) / math.log(2)

            missing = ~known & applies
            if impute != "none":
                source = logits.detach() if impute == "posterior" else \
                    log_rates.expand_as(logits).masked_fill(~admissible, float("-inf"))
                draws = _draw(source, missing, generator)
                weight = missing.to(active.dtype)[:, None]
                active.scatter_add_(1, indices[draws][:, None], weight)
                imputed = imputed + missing.to(imputed.dtype)
        return active, ce, imputed

    # -- sampling --------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        conditions: int | str | Sequence[int | str] | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        mixture: str | None = None,
    ) -> Tensor:
        """``n`` uint8 images ``[n, C, H, W]`` drawn at ``temperature``.

        Args:
            conditions: None (``p_0``), one condition, or several (their composition).
            mixture: a kind: draw each image's value ``k ~ pi`` first, then ``r ~ p_k``
                (exclusive with ``conditions``).
            generator: on the model's device; a fixed seed gives the same images.

        Images are ``x = f^-1(r)`` quantised to ``n_bits`` (``floor(x * 2^n_bits)``, clamped to
        ``[0, 2^n_bits - 1]``) and scaled back to the 8-bit range (``level * 2^(8-n_bits)``).
        ``temperature = 0`` gives the image of the prior's mean.

        Warning:
            Non-finite pixels (a diverged flow) become 0 and raise a ``RuntimeWarning``
            that counts them; :meth:`sample_residuals` and ``flow.inverse`` expose the raw
            values.
        """
        r = self.sample_residuals(n, conditions, temperature, generator, mixture)
        with torch.no_grad():
            x, _ = self.flow.inverse(r)
        return self.quantise(x)

    def sample_residuals(
        self,
        n: int,
        conditions: int | str | Sequence[int | str] | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        mixture: str | None = None,
    ) -> list[Tensor]:
        """Residuals ``r`` drawn as :meth:`sample` draws them, before the inverse flow."""
        self._sync()
        if mixture is not None and conditions is not None:
            raise BadInputError("sample: found both conditions and mixture, expected one")
        source: Any = None
        if mixture is not None:
            if not self.registry.values(mixture):
                raise BadInputError(f"mixture {mixture!r}: the kind has no conditions, "
                                    "expected a kind with at least one value")
            probs = self.rates.log_categorical(mixture, torch.float64).exp()
            source = Mixture(self.registry.condition_indices(mixture), probs)
        elif conditions is not None:
            indices = self.registry.resolve(conditions)
            source = indices[0] if len(indices) == 1 else self.compose(indices)
        with torch.no_grad():
            return sample_residuals(self.priors, n, source, temperature, generator)

    def quantise(self, x: Tensor) -> Tensor:
        """Float images in ``[0, 1)`` -> uint8 at ``n_bits``, in the 8-bit range."""
        levels = 2 ** self.config.n_bits
        finite = torch.isfinite(x)
        bad = int((~finite).sum())
        if bad:
            warnings.warn(f"{bad} non-finite sample pixels set to 0", RuntimeWarning,
                          stacklevel=2)
        level = torch.floor(torch.where(finite, x, torch.zeros_like(x)) * levels)
        level = level.clamp(0, levels - 1)
        return (level * 2 ** (8 - self.config.n_bits)).to(torch.uint8)

    # -- extending -------------------------------------------------------------------------

    def add_condition(self, kind: str, value: str) -> int:
        """Register ``kind=value`` and create its prior (existing parameters are untouched)."""
        index = self.registry.add_condition(kind, value)
        self._sync()
        return index

    def condition_parameters(self, conditions: Sequence[int | str]) -> list[nn.Parameter]:
        """The parameters of the given conditions' priors only (to refine them alone)."""
        self._sync()
        return [p for k in self.registry.resolve(conditions)
                for p in self.priors.conditions[k].parameters()]

    # -- save and load ---------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the whole model to ``directory`` (created if missing), all or nothing.

        The weights go to ``weights-HASH.pt`` first, then ``model.json`` names them and their
        sha256; both are atomic, and older weights files are removed last, so a crash leaves
        either the old model or the new one complete.
        """
        self._sync()
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise fsio.write_error(directory, error) from error

        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, buffer)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        weights = f"weights-{digest[:16]}.pt"
        manifest = {
            "format": FORMAT, "version": VERSION, "config": self.config.to_json(),
            "registry": self.registry.to_json(), "rates": self.rates.to_json(),
            "weights": {"file": weights, "sha256": digest, "bytes": len(data)},
        }

        with fsio.exclusive_lock(directory, "model directory"):
            fsio.remove_stale_temporaries(directory, "")
            fsio.atomic_write_bytes(directory / weights, data)
            fsio.atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            for old in directory.glob("weights-*.pt"):
                if old.name != weights:
                    old.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], flow: nn.Module | None = None
    ) -> TzK:
        """Read a model written by :meth:`save`, on the CPU.

        Args:
            flow: the flow module for a model saved with ``config.flow = None``.

        Raises:
            BadInputError: a missing or malformed ``model.json``, a weights file whose sha256
                does not match (corrupt or truncated), or weights that are not plain tensors
                (``torch.load(weights_only=True)`` refuses pickled code).
        """
        directory = Path(directory)
        manifest = _read_manifest(directory / MANIFEST)
        source = str(directory / MANIFEST)
        config = ModelConfig.from_json(_upgrade_config(manifest), f"{source}:config")
        if config.flow is None and flow is None:
            raise BadInputError(f"{source}: config.flow is null (a custom flow); "
                                "expected the flow passed as flow=")
        registry = Registry.from_json(manifest["registry"], f"{source}:registry")
        rates = KnowledgeRates.from_json(manifest["rates"], registry, f"{source}:rates")
        state = _read_weights(directory, manifest["weights"], source)

        model = cls(config, registry, flow=flow, rates=rates)
        dtypes = [v.dtype for v in state.values() if v.is_floating_point()]
        if dtypes:
            model.to(dtypes[0])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            name = (missing or unexpected)[0]
            raise BadInputError(f"{directory / manifest['weights']['file']}: "
                                f"{'missing' if missing else 'unexpected'} tensor {name!r}, "
                                "expected the weights of the model described in model.json")
        return model

    # -- internals -------------------------------------------------------------------------

    def _sync(self) -> None:
        """Create priors for conditions added to the registry since the last call."""
        for condition in self.registry.conditions[len(self.priors):]:
            kind = self.registry.kind(condition.kind)
            self.priors.add(kind.form, kind.rank, condition.spec)
        if self._cache.get("version") != (self.registry.version, self.priors.anchor.device):
            self._cache = {"version": (self.registry.version, self.priors.anchor.device)}

    def _indices(self, kind: str) -> Tensor:
        key = f"indices:{kind}"
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.registry.condition_indices(kind),
                                            dtype=torch.int64, device=self.priors.anchor.device)
        return self._cache[key]

    def _domain(self, kind: str) -> Tensor:
        key = f"domain:{kind}"
        if key not in self._cache:
            self._cache[key] = self.registry.domain(kind).to(self.priors.anchor.device)
        return self._cache[key]

    def _log_rates(self, kind: str) -> Tensor:
        # Keyed on the counts themselves: callers may edit ``rates.counts`` directly.
        counts = hash((self.rates.total, frozenset(self.rates.counts.items())))
        key = f"rates:{kind}:{id(self.rates)}:{counts}"
        if key not in self._cache:
            log_rates = self.rates.log_categorical(kind, self.priors.dtype)
            self._cache[key] = log_rates.to(self.priors.anchor.device)
        return self._cache[key]

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            found = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor)
                     else type(x).__name__)
            raise BadInputError(f"images x: found {found}, expected uint8 [B, C, H, W]")
        if math.prod(x.shape[1:]) != self.dims:
            raise BadInputError(f"images x: found shape {tuple(x.shape)}, expected "
                                f"C*H*W = {self.dims} (the flow's dimension)")

    def _check_codes(self, codes: Tensor, batch: int) -> Tensor:
        kinds = self.registry.kinds
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32) \
                or tuple(codes.shape) != (batch, len(kinds)):
            found = (f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor)
                     else type(codes).__name__)
            raise BadInputError(f"codes: found {found}, expected int64 [{batch}, {len(kinds)}] "
                                f"(columns {', '.join(kinds)})")
        codes = codes.to(device=self.priors.anchor.device, dtype=torch.int64)
        sizes = torch.tensor([len(self.registry.values(k)) for k in kinds], device=codes.device)
        lowest = torch.full_like(sizes, -1)
        lowest[0] = 0
        out_of_range = (codes < lowest) | (codes >= sizes)
        clamped = codes.clamp(min=0).minimum((sizes - 1).clamp(min=0))
        outside = self._outside_domain(clamped) & (codes >= 0)
        # One synchronisation for both checks, before the flow pass is queued.
        if bool((out_of_range | outside).any()):
            self._raise_bad_code(codes, out_of_range, outside, lowest, sizes)
        return codes

    def _outside_domain(self, codes: Tensor) -> Tensor:
        """Bool ``[B, n_kinds]``: known values not in the image's dataset's domain."""
        outside = torch.zeros_like(codes, dtype=torch.bool)
        for column, kind in enumerate(self.registry.kinds[1:], start=1):
            if not self.registry.values(kind):
                continue
            admissible = self._domain(kind)[codes[:, 0]]
            outside[:, column] = ~admissible.gather(1, codes[:, column:column + 1])[:, 0]
        return outside

    def _raise_bad_code(
        self, codes: Tensor, out_of_range: Tensor, outside: Tensor, lowest: Tensor,
        sizes: Tensor,
    ) -> None:
        kinds = self.registry.kinds
        if bool(out_of_range.any()):
            row, column = out_of_range.nonzero()[0].tolist()
            raise BadInputError(
                f"codes[{row}, {column}] ({kinds[column]}): found {int(codes[row, column])}, "
                f"expected {int(lowest[column])}..{int(sizes[column]) - 1}"
            )
        row, column = outside.nonzero()[0].tolist()
        kind = kinds[column]
        value = self.registry.values(kind)[int(codes[row, column])]
        dataset = self.registry.values(DATASET)[int(codes[row, 0])]
        raise BadInputError(
            f"codes[{row}, {column}]: {kind}={value} for an image of dataset={dataset}, "
            f"expected a value of {kind} in that dataset's domain"
        )


def _draw(logits: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
    """One categorical draw per row from ``logits``.

    Rows not in ``rows`` draw 0, and so do rows whose probabilities are not finite (a
    diverged model): their loss is non-finite anyway, and the caller's non-finite policy, not
    a crash inside the draw, decides what happens next.
    """
    safe = torch.where(rows[:, None], logits, torch.zeros_like(logits))
    probs = torch.softmax(safe, dim=1)
    finite = torch.isfinite(probs).all(dim=1, keepdim=True)
    first = torch.zeros_like(probs)
    first[:, 0] = 1.0
    probs = torch.where(finite, probs, first)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: not found, expected a model saved by TzK.save") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"{path}: unreadable ({error}), expected JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BadInputError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise BadInputError(
            f"{path}: version {manifest.get('version')!r}, expected one of "
            f"{READABLE_VERSIONS} (models of other versions map images differently: retrain)"
        )
    for key in ("config", "registry", "rates", "weights"):
        if key not in manifest:
            raise BadInputError(f"{path}: no {key!r} entry, expected {key} of the model")
    weights = manifest["weights"]
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) \
            or not isinstance(weights.get("sha256"), str) or "/" in weights["file"]:
        raise BadInputError(f"{path}: weights {weights!r}, expected {{file, sha256}}")
    return manifest


def _upgrade_config(manifest: dict[str, Any]) -> Any:
    """The manifest's config in the current version's terms: version 3 had no
    ``scale_floor`` and built every affine coupling with 0.5."""
    config = manifest["config"]
    flow = config.get("flow") if isinstance(config, dict) else None
    if manifest["version"] == 3 and isinstance(flow, dict) and "scale_floor" not in flow:
        return {**config, "flow": {**flow, "scale_floor": VERSION_3_SCALE_FLOOR}}
    return config


def _read_weights(directory: Path, weights: dict[str, Any], source: str) -> dict[str, Tensor]:
    path = directory / weights["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInputError(f"{path}: unreadable ({error.strerror}), expected the weights "
                            f"named in {source}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights["sha256"]:
        raise BadInputError(f"{path}: sha256 {digest[:16]}… of {len(data)} bytes, expected "
                            f"{weights['sha256'][:16]}… from {source} (corrupt or truncated)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{path}: refused ({first[:120]}), expected plain tensors "
                            "only") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BadInputError(f"{path}: found {type(state).__name__}, expected a state_dict of "
                            "tensors")
    return state
