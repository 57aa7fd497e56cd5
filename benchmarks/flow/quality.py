"""After 300 training steps: test bpd, non-finite samples, scoring and sampling speed.

Every model trains on the same MNIST batches (batch 64, Adam 1e-3) from the same seed: tzk's
TzK model (its Glow and one ``gaussian`` prior per digit, trained by ``model.objective``),
once with ``beta = 0`` (likelihood only, like for like with normflows) and once with the
default ``beta = 0.01`` (plus the classification cross-entropy); normflows' Glow with a
class-conditional base (trained by ``forward_kld`` given the digit).
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.flow.data import dequantise
from benchmarks.flow.subjects import SHAPE, NormflowsSubject, bpd
from tzkcli.model import TzK

DIGITS = 10
# model.objective's default weight of the cross-entropy.
DEFAULT_BETA = inspect.signature(TzK.objective).parameters["beta"].default


@dataclass
class Trained:
    """One seed's trained models, what training cost and the training losses.

    ``tzk`` maps a name (``"tzk beta=0"``, ``"tzk beta=0.01"``) to a TzK model; every dict
    below is keyed by those names and ``"normflows"``.
    """

    seed: int
    tzk: dict[str, object]
    normflows: NormflowsSubject
    seconds: dict[str, float]
    losses: dict[str, list[float]]

    @property
    def default(self):
        """The tzk model trained with the objective's default ``beta``, else the first."""
        return self.tzk.get(f"tzk beta={DEFAULT_BETA}", next(iter(self.tzk.values())))


def tzk_model(levels: int, steps: int, hidden: int):
    from tzkcli.flows import GlowConfig
    from tzkcli.knowledge import Registry
    from tzkcli.model import ModelConfig

    registry = Registry()
    registry.add_condition("dataset", "mnist")
    registry.add_kind("label")
    for digit in range(DIGITS):
        registry.add_condition("label", f"mnist/{digit}")
    config = ModelConfig(flow=GlowConfig(shape=SHAPE, levels=levels, steps=steps, hidden=hidden))
    # Placed as every tzk command places its model (channels_last on the CPU).
    return TzK(config, registry).place("cpu")


def train_seed(seed: int, images: Tensor, labels: Tensor, arch: tuple[int, int, int],
               steps: int = 300, batch: int = 64, betas: tuple[float, ...] = (0.0, DEFAULT_BETA)
               ) -> Trained:
    """Train one tzk model per ``beta`` and normflows on identical batches, alternating them
    step by step. Every tzk model starts from the same weights (the generator is reseeded)."""
    tzk = {}
    for beta in betas:
        torch.manual_seed(seed)
        tzk[f"tzk beta={beta:g}"] = tzk_model(*arch)
    torch.manual_seed(seed)
    normflows = NormflowsSubject(*arch)

    picks = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(images), (256,), generator=picks)
    for model in tzk.values():
        model.initialize(images[first], torch.Generator().manual_seed(seed))
    normflows.initialize(dequantise(images[first], torch.Generator().manual_seed(seed)),
                         labels[first])

    steps_of = {name: _tzk_step(model, beta) for (name, model), beta in zip(tzk.items(), betas)}
    steps_of["normflows"] = _normflows_step(normflows)
    seconds = dict.fromkeys(steps_of, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in steps_of}
    noise = {name: torch.Generator().manual_seed(seed + 1) for name in steps_of}
    for _ in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=picks)
        for name, step in steps_of.items():
            start = time.perf_counter()
            loss = step(images[pick], labels[pick], noise[name])
            seconds[name] += time.perf_counter() - start
            losses[name].append(loss)

    return Trained(seed, {name: m.eval() for name, m in tzk.items()}, normflows, seconds, losses)


def _tzk_step(model, beta: float):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x: Tensor, y: Tensor, noise: torch.Generator) -> float:
        codes = torch.stack([torch.zeros_like(y), y], dim=1)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.objective(x, codes, beta=beta, generator=noise)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _normflows_step(subject: NormflowsSubject):
    optimizer = torch.optim.Adam(subject.parameters(), lr=1e-3)

    def step(x: Tensor, y: Tensor, noise: torch.Generator) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = subject.loss(dequantise(x, noise), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def curve(losses: list[float], width: int = 50) -> str:
    """Mean training loss per ``width`` steps, and the largest over the last ``width``."""
    means = [statistics.fmean(losses[i : i + width]) for i in range(0, len(losses), width)]
    return " ".join(f"{m:.2f}" for m in means) + f" (max of the last {width}: " \
        f"{max(losses[-width:]):.2f})"


@torch.no_grad()
def test_bpd(trained: Trained, images: Tensor, labels: Tensor, batch: int = 250
             ) -> dict[str, float]:
    """Mean test bpd: each tzk model under ``p_0`` (``"NAME p_0"``) and under each image's
    digit prior (``"NAME digit"``); normflows under its base given the digit. Dequantisation
    noise from a generator seeded 0, the same for every model."""
    sums: dict[str, float] = {"normflows digit": 0.0}
    for name, model in trained.tzk.items():
        digits = model.registry.resolve([f"label=mnist/{d}" for d in range(DIGITS)])
        noise = torch.Generator().manual_seed(0)
        sums[f"{name} p_0"] = sums[f"{name} digit"] = 0.0
        for start in range(0, len(images), batch):
            x, y = images[start : start + batch], labels[start : start + batch]
            scores = model.score(x, digits, generator=noise)
            sums[f"{name} p_0"] += float(scores.bpd_base.sum())
            sums[f"{name} digit"] += float(scores.bpd.gather(1, y[:, None]).sum())

    noise = torch.Generator().manual_seed(0)
    for start in range(0, len(images), batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        log_density = trained.normflows.model.log_prob(dequantise(x, noise), y)
        sums["normflows digit"] += float(bpd(log_density).sum())
    return {name: total / len(images) for name, total in sums.items()}


@torch.no_grad()
def non_finite_samples(trained: Trained, temperature: float, n: int = 640,
                       batch: int = 64) -> dict[str, int]:
    """Samples (of ``n``) with any non-finite value, from the raw inverse before clamping:
    each tzk model from its digit mixture, normflows from its base with uniform digits."""
    counts = dict.fromkeys([*trained.tzk, "normflows"], 0)
    for name, model in trained.tzk.items():
        generator = torch.Generator().manual_seed(0)
        for _ in range(n // batch):
            r = model.sample_residuals(batch, temperature=temperature, generator=generator,
                                       mixture="label")
            x, _ = model.flow.inverse(r)
            counts[name] += int((~torch.isfinite(x.flatten(1))).any(dim=1).sum())

    generator = torch.Generator().manual_seed(0)
    for _ in range(n // batch):
        y = torch.randint(0, DIGITS, (batch,), generator=generator)
        x = _normflows_sample(trained.normflows, y, temperature)
        counts["normflows"] += int((~torch.isfinite(x.flatten(1))).any(dim=1).sum())
    return counts


def _normflows_sample(subject: NormflowsSubject, y: Tensor, temperature: float) -> Tensor:
    x, _ = subject.model.sample(len(y), y=y, temperature=temperature)
    return x


@torch.no_grad()
def score_seconds(model, images: Tensor, rounds: int, counts=(1, 10, 100)
                  ) -> dict[int, float]:
    """Median seconds of ``model.score`` of one batch under 1, 10 and 100 conditions,
    interleaved; filler conditions of a kind ``cluster`` make up the 100 (open-ended
    registry: their priors appear at the next call)."""
    registry = model.registry
    if "cluster" not in registry.kinds:
        registry.add_kind("cluster")
    for extra in range(max(counts) - len(registry)):
        registry.add_condition("cluster", f"c{extra}")
    times: dict[int, list[float]] = {k: [] for k in counts}
    for round_ in range(rounds + 1):
        for k in counts if round_ % 2 == 0 else counts[::-1]:
            start = time.perf_counter()
            model.score(images, list(range(k)), generator=torch.Generator().manual_seed(0))
            if round_:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def sampling_rates(trained: Trained, rounds: int, batch: int = 64) -> dict[str, float]:
    """Median images/s of drawing a batch at temperature 1: tzk ``model.sample`` (uint8,
    digit mixture) and normflows ``sample`` given random digits, interleaved."""
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"tzk": [], "normflows": []}
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        trained.default.sample(batch, mixture="label", generator=generator)
        middle = time.perf_counter()
        _normflows_sample(trained.normflows, torch.randint(0, DIGITS, (batch,)), 1.0)
        done = time.perf_counter()
        if round_:
            times["tzk"].append(middle - start)
            times["normflows"].append(done - middle)
    return {name: batch / statistics.median(v) for name, v in times.items()}


def bits(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"
