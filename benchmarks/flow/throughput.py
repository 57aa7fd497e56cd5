"""Training throughput: forward, backward and an Adam step, subjects interleaved."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.flow.data import dequantise


@dataclass
class Throughput:
    """Medians over every timed step of one subject; ``page_faults``: the process's minor
    page faults during the step (first touches of memory the allocator took from the
    system)."""

    name: str
    forward_ms: float
    backward_ms: float
    adam_ms: float
    steps: int
    page_faults: float

    @property
    def step_ms(self) -> float:
        return self.forward_ms + self.backward_ms + self.adam_ms

    def images_per_second(self, batch: int) -> float:
        return 1000.0 * batch / self.step_ms


def _timed_step(subject, optimizer: torch.optim.Optimizer, x: Tensor,
                y: Tensor) -> tuple[float, float, float, int]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = subject.loss(x, y)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    done = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    if not torch.isfinite(loss):
        raise RuntimeError(f"{subject.name}: non-finite training loss")
    return forward - start, backward - forward, done - backward, faults


def training_throughput(subjects: list, images: Tensor, labels: Tensor, batch: int,
                        rounds: int, steps: int, seed: int = 0) -> list[Throughput]:
    """Train every subject ``rounds`` times ``steps`` Adam steps, alternating subjects each
    round (and reversing their order every other round) so that drift hits all alike.

    The first round of each subject warms it up and is not timed. Every subject sees the
    same batches.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizers = {s.name: torch.optim.Adam(s.parameters(), lr=1e-3) for s in subjects}
    times: dict[str, list[tuple[float, float, float, int]]] = {s.name: [] for s in subjects}

    for round_ in range(rounds + 1):
        picks = [torch.randint(0, len(images), (batch,), generator=generator)
                 for _ in range(steps)]
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        order = subjects if round_ % 2 == 0 else subjects[::-1]
        for subject in order:
            noise = torch.Generator().manual_seed(noise_seed)
            for pick in picks:
                x = dequantise(images[pick], noise)
                timing = _timed_step(subject, optimizers[subject.name], x, labels[pick])
                if round_ > 0:
                    times[subject.name].append(timing)

    results = []
    for subject in subjects:
        forward, backward, adam, faults = zip(*times[subject.name])
        results.append(Throughput(subject.name, 1e3 * statistics.median(forward),
                                  1e3 * statistics.median(backward),
                                  1e3 * statistics.median(adam), len(forward),
                                  statistics.median(faults)))
    return results
