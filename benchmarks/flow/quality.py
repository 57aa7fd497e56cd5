"""After 300 training steps: test bpd, non-finite samples, scoring and sampling speed.

Both models train on the same MNIST batches (batch 64, Adam 1e-3) from the same seed: tzk's
TzK model (its Glow and one ``gaussian`` prior per digit, trained by ``model.objective``),
normflows' Glow with a class-conditional base (trained by ``forward_kld`` given the digit).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.flow.data import dequantise
from benchmarks.flow.subjects import SHAPE, NormflowsSubject, bpd

DIGITS = 10


@dataclass
class Trained:
    """One seed's pair of trained models and what training cost."""

    seed: int
    tzk: object
    normflows: NormflowsSubject
    seconds: dict[str, float]


def tzk_model(levels: int, steps: int, hidden: int):
    from tzkcli.flows import GlowConfig
    from tzkcli.knowledge import Registry
    from tzkcli.model import ModelConfig, TzK

    registry = Registry()
    registry.add_condition("dataset", "mnist")
    registry.add_kind("label")
    for digit in range(DIGITS):
        registry.add_condition("label", f"mnist/{digit}")
    config = ModelConfig(flow=GlowConfig(shape=SHAPE, levels=levels, steps=steps, hidden=hidden))
    model = TzK(config, registry)
    model.flow.to(memory_format=torch.channels_last)
    return model


def train_pair(seed: int, images: Tensor, labels: Tensor, arch: tuple[int, int, int],
               steps: int = 300, batch: int = 64) -> Trained:
    """Train both models on identical batches, alternating them step by step."""
    torch.manual_seed(seed)
    tzk = tzk_model(*arch)
    torch.manual_seed(seed)
    normflows = NormflowsSubject(*arch)

    picks = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(images), (256,), generator=picks)
    tzk.initialize(images[first], torch.Generator().manual_seed(seed))
    normflows.initialize(dequantise(images[first], torch.Generator().manual_seed(seed)),
                         labels[first])

    optimizers = {"tzk": torch.optim.Adam(tzk.parameters(), lr=1e-3),
                  "normflows": torch.optim.Adam(normflows.parameters(), lr=1e-3)}
    noise = {"tzk": torch.Generator().manual_seed(seed + 1),
             "normflows": torch.Generator().manual_seed(seed + 1)}
    seconds = {"tzk": 0.0, "normflows": 0.0}
    for _ in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=picks)
        codes = torch.stack([torch.zeros_like(labels[pick]), labels[pick]], dim=1)

        start = time.perf_counter()
        optimizers["tzk"].zero_grad(set_to_none=True)
        loss, _ = tzk.objective(images[pick], codes, generator=noise["tzk"])
        loss.backward()
        optimizers["tzk"].step()
        middle = time.perf_counter()
        optimizers["normflows"].zero_grad(set_to_none=True)
        x = dequantise(images[pick], noise["normflows"])
        normflows.loss(x, labels[pick]).backward()
        optimizers["normflows"].step()
        seconds["tzk"] += middle - start
        seconds["normflows"] += time.perf_counter() - middle

    return Trained(seed, tzk.eval(), normflows, seconds)


@torch.no_grad()
def test_bpd(trained: Trained, images: Tensor, labels: Tensor, batch: int = 250
             ) -> dict[str, float]:
    """Mean test bpd: tzk under ``p_0`` and under each image's digit prior; normflows under
    its base given the digit. Dequantisation noise from a generator seeded 0."""
    model = trained.tzk
    digit_conditions = model.registry.resolve([f"label=mnist/{d}" for d in range(DIGITS)])
    noise_tzk, noise_nf = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sums = {"tzk p_0": 0.0, "tzk digit": 0.0, "normflows digit": 0.0}
    for start in range(0, len(images), batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        scores = model.score(x, digit_conditions, generator=noise_tzk)
        sums["tzk p_0"] += float(scores.bpd_base.sum())
        sums["tzk digit"] += float(scores.bpd.gather(1, y[:, None]).sum())
        x_nf = dequantise(x, noise_nf)
        sums["normflows digit"] += float(bpd(trained.normflows.model.log_prob(x_nf, y)).sum())
    return {name: total / len(images) for name, total in sums.items()}


@torch.no_grad()
def non_finite_samples(trained: Trained, temperature: float, n: int = 640,
                       batch: int = 64) -> dict[str, int]:
    """Samples (of ``n``) with any non-finite value, from the raw inverse before clamping:
    tzk from its digit mixture, normflows from its base with uniform digits."""
    generator = torch.Generator().manual_seed(0)
    counts = {"tzk": 0, "normflows": 0}
    for _ in range(n // batch):
        r = trained.tzk.sample_residuals(batch, temperature=temperature, generator=generator,
                                         mixture="label")
        x, _ = trained.tzk.flow.inverse(r)
        counts["tzk"] += int((~torch.isfinite(x.flatten(1))).any(dim=1).sum())

        y = torch.randint(0, DIGITS, (batch,), generator=generator)
        x_nf = _normflows_sample(trained.normflows, y, temperature)
        counts["normflows"] += int((~torch.isfinite(x_nf.flatten(1))).any(dim=1).sum())
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
        trained.tzk.sample(batch, mixture="label", generator=generator)
        middle = time.perf_counter()
        _normflows_sample(trained.normflows, torch.randint(0, DIGITS, (batch,)), 1.0)
        done = time.perf_counter()
        if round_:
            times["tzk"].append(middle - start)
            times["normflows"].append(done - middle)
    return {name: batch / statistics.median(v) for name, v in times.items()}


def bits(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"
