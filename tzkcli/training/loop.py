"""The training loop: maximum likelihood on a store, resumable, on one CPU or many GPUs.

:func:`start_run` trains a new model into a new run directory; :func:`resume_run` continues a
run from its latest checkpoint. Both hold an exclusive lock on the run directory for as long as
they train (a second writer fails at once with :class:`~tzkcli.errors.BusyError`), report every
record of ``metrics.jsonl`` to an optional ``on_record`` callback (the CLI draws its progress
from it), and return a :class:`TrainResult`.

One optimiser step:

1. draw the next global batch of the data order and take this rank's share of it;
2. hide labels of the positions outside ``--label-fraction``;
3. ``loss, parts = model.objective(x, codes, beta, impute)`` (DDP-wrapped on several ranks);
4. if the loss is non-finite on any rank, skip the step; otherwise backward, clip the gradient
   norm, and skip if that norm is non-finite; otherwise take the optimiser step.

After ``max_bad_steps`` skipped steps in a row the last good state (model and optimiser as of
the last checkpoint) is restored and the learning rate multiplied by ``bad_lr_factor``; after
``max_recoveries`` such recoveries the run writes that good state as a checkpoint and stops
with :class:`~tzkcli.errors.RunFailedError` (exit code 5).

Warning:
    Bit-identical resumption holds on the CPU with the same world size and thread count. A
    resume with another world size continues correctly, but from reseeded RNG streams.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tzkcli import fsio
from tzkcli.errors import BadInputError, RunFailedError, TzkError, UsageError
from tzkcli.training import checkpoint as ckpt
from tzkcli.training import distributed, setup
from tzkcli.training.config import RESUMABLE, TrainConfig, read_config_file, resolve, to_toml
from tzkcli.training.data import DataOrder, RankBatches, batch_stream, labelled_mask
from tzkcli.training.metrics import MetricsLog

log = logging.getLogger("tzkcli.training")

OnRecord = Callable[[dict[str, Any]], None]
BUDGET = ("steps", "epochs", "time_budget")


@dataclass
class TrainResult:
    """How a run ended: its last step, why it stopped, and its checkpoints."""

    run: Path
    step: int
    stop_reason: str
    latest: str | None
    best: str | None
    best_bpd: float | None
    last: dict[str, Any]


def start_run(
    store: Path, run: Path, config: TrainConfig, on_record: OnRecord | None = None
) -> TrainResult:
    """Train a new model on ``store`` into the new run directory ``run``.

    Raises:
        BadInputError: ``run`` exists (use :func:`resume_run`), or the store does not fit the
            configuration (shape, kinds named by ``prior``).
        BusyError: another process holds ``run``.
        RunFailedError: training diverged (a usable checkpoint is left) or a write failed.
    """
    world = distributed.setup(config.device)
    try:
        problem = None
        if world.writer and run.exists() and (not run.is_dir() or any(run.iterdir())):
            problem = f"{run}: run directory exists; expected a new --out, or --resume {run}"
        problem = distributed.broadcast_object(problem, world)
        if problem:
            raise BadInputError(problem)

        # everything that can reject the input happens before the run directory exists
        trainer = _Trainer(Path(store), run, config, world, on_record)
        trainer.build()
        if world.writer:
            try:
                run.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise fsio.write_error(run, error) from error
        if world.distributed:
            torch.distributed.barrier()
        with _run_lock(run, world):
            trainer.fresh()
            return trainer.loop()
    finally:
        distributed.teardown(world)


def resume_run(
    run: Path,
    flag_values: dict[str, Any],
    store: Path | None = None,
    on_record: OnRecord | None = None,
) -> TrainResult:
    """Continue ``run`` from its latest checkpoint; ``flag_values`` may change the budget and
    the reporting fields (a new budget replaces the saved one as a whole).

    Raises:
        BadInputError: no run, no checkpoint, a corrupt checkpoint, or a store that is not the
            run's store.
        UsageError: a flag that would change the model or the optimisation.
    """
    config, record = _resumed_config(run, flag_values)
    world = distributed.setup(config.device)
    try:
        with _run_lock(run, world):
            store_path = Path(store) if store is not None else Path(record["store"])
            trainer = _Trainer(store_path, run, config, world, on_record)
            trainer.restore(record)
            return trainer.loop()
    finally:
        distributed.teardown(world)


def read_run_record(run: Path) -> dict[str, Any]:
    """``RUN/run.json``: store, store digest, latest and best checkpoints, status."""
    path = run / "run.json"
    if not run.is_dir():
        raise BadInputError(f"--resume {run}: no such run directory; expected a tzk run")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(
            f"{path}: missing; expected a run directory made by tzk train"
        ) from None
    except (OSError, ValueError) as error:
        raise BadInputError(f"{path}: unreadable or not JSON ({error})") from None


def _resumed_config(run: Path, flag_values: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    record = read_run_record(run)
    saved = resolve(read_config_file(run / "config.toml"), {}, str(run / "config.toml"))
    given = {k: v for k, v in flag_values.items() if v is not None}
    values = saved.to_dict()
    if any(k in given for k in BUDGET):
        values.update({k: None for k in BUDGET})
    for key, value in given.items():
        if key not in RESUMABLE and value != values[key]:
            raise UsageError(
                f"--{key.replace('_', '-')} {value}: cannot change on --resume (the run uses "
                f"{values[key]!r}); expected only budget, reporting and device flags"
            )
        values[key] = value
    return resolve({}, values, "flags"), record


@contextmanager
def _run_lock(run: Path, world: distributed.World) -> Iterator[None]:
    """Rank 0 holds the run's lock; when it cannot, every rank raises its error."""
    with ExitStack() as stack:
        problem: TzkError | None = None
        if world.writer:
            try:
                stack.enter_context(fsio.exclusive_lock(run, "run directory"))
            except TzkError as error:
                problem = error
            else:
                for stem in ("run.json", "config.toml"):
                    fsio.remove_stale_temporaries(run, stem)
        problem = distributed.broadcast_object(problem, world)
        if problem is not None:
            raise problem
        yield


@contextmanager
def _stop_signals() -> Iterator[list[str]]:
    """Turn SIGINT and SIGTERM into a request to stop after the current step."""
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(number: int, _frame: object) -> None:
        requested.append(signal.Signals(number).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


class _Objective(nn.Module):
    """``forward`` = the model's objective, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, beta: float, impute: str) -> None:
        super().__init__()

        self.model = model
        self.beta = beta
        self.impute = impute

    def forward(
        self, x: torch.Tensor, codes: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, Any]:
        return self.model.objective(x, codes, beta=self.beta, impute=self.impute,
                                    generator=generator)


class _Trainer:
    """The state of one training process; ``fresh`` or ``restore``, then ``loop``."""

    def __init__(
        self,
        store: Path,
        run: Path,
        config: TrainConfig,
        world: distributed.World,
        on_record: OnRecord | None,
    ) -> None:
        self.run = run
        self.config = config
        self.world = world
        self.on_record = on_record
        self.data = setup.open_training_data(store, config)
        self.order = DataOrder(
            self.data.train_groups, config.batch_size, config.seed, config.balance
        )
        if config.batch_size % world.size:
            raise UsageError(
                f"--batch-size {config.batch_size}: not divisible by the {world.size} "
                "processes; expected a multiple of the world size"
            )
        self.labelled = labelled_mask(self.data.train_groups, config.label_fraction, config.seed)
        self.metrics: MetricsLog | None = None
        self.checkpoints = run / "checkpoints"
        self.step = 0
        self.lr_scale = 1.0
        self.recoveries = 0
        self.best: str | None = None
        self.best_bpd: float | None = None
        self.latest: str | None = None
        self.good: dict[str, Any] | None = None
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None

    # set-up ------------------------------------------------------------------------------

    def build(self) -> None:
        """Build the new model (seeded): the registry from the store, the flow, the priors."""
        torch.manual_seed(self.config.seed)
        self.model = setup.build_model(self.config, self.data).place(self.world.device)

    def fresh(self) -> None:
        """Write the run's configuration and first record, initialise actnorm."""
        self.metrics = MetricsLog(self.run, enabled=self.world.writer)
        if self.world.writer:
            fsio.atomic_write_text(self.run / "config.toml", to_toml(self.config))
            self._write_run_record("running")
        self._emit({
            "type": "config", "config": self.config.to_dict(), "store": self.data.describe(),
            "world_size": self.world.size, "device": str(self.world.device),
        })
        self.model.rates.count(torch.from_numpy(self.data.visible_codes(self.labelled)))
        self._initialize_actnorm()
        self._apply_precision()
        self._make_optimizer()
        self._reseed(self.config.seed)
        self._remember_good()

    def _initialize_actnorm(self) -> None:
        """Named step: data-dependent actnorm initialisation on the first global batch.

        Every rank initialises on the same whole batch before any DDP wrapping, so that all
        ranks start from identical parameters.
        """
        start = time.perf_counter()
        positions = self.order.batch(0)
        x, _ = self.data.train.batch(positions)
        generator = step_generator(self.config.seed, -1, self.world.device)
        self.model.initialize(x.to(self.world.device), generator=generator)
        self._emit({
            "type": "actnorm_init", "step": 0, "images": len(positions),
            "seconds": time.perf_counter() - start,
        })
        log.info("actnorm initialised on %d images", len(positions))

    def restore(self, record: dict[str, Any]) -> None:
        """Load the latest checkpoint (verified) and check the store is the run's store."""
        from tzkcli.model import TzK

        if record.get("store_digest") != self.data.digest:
            raise BadInputError(
                f"{self.data.path}: store digest {self.data.digest[:12]} does not match the "
                f"run's store {str(record.get('store_digest'))[:12]}; expected the store the "
                f"run was trained on ({record.get('store')})"
            )
        found = ckpt.list_checkpoints(self.checkpoints)
        if not found:
            raise BadInputError(f"{self.checkpoints}: no checkpoint; nothing to resume from")
        latest = found[-1]
        state = ckpt.load_state(latest)
        self.model = TzK.load(latest.model_dir).place(self.world.device)
        self.data.check_registry(self.model.registry)
        self.metrics = MetricsLog(self.run, enabled=self.world.writer)
        self._apply_precision()
        self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.order.drawn = int(state["drawn"])
        self.lr_scale = float(state["lr_scale"])
        self.recoveries = int(state["recoveries"])
        self.best = state["best"] or None
        self.best_bpd = None if state["best"] == "" else float(state["best_bpd"])
        self.latest = latest.name
        rng = state["rng"]
        if len(rng) == self.world.size:
            ckpt.restore_rng(rng[self.world.rank])
        else:
            self._reseed(self.config.seed + self.step)
        if self.world.writer:
            fsio.atomic_write_text(self.run / "config.toml", to_toml(self.config))
        self._emit({
            "type": "resume", "step": self.step, "checkpoint": latest.name,
            "config": self.config.to_dict(), "world_size": self.world.size,
        })
        self._remember_good()

    def _apply_precision(self) -> None:
        """``--precision bf16``: the coupling networks alone compute in bf16 (autocast)."""
        from tzkcli.flows.layers import CouplingNetwork

        dtype = torch.bfloat16 if self.config.precision == "bf16" else None
        for module in self.model.modules():
            if isinstance(module, CouplingNetwork):
                module.compute_dtype = dtype

    def _reseed(self, seed: int) -> None:
        torch.manual_seed(seed * 1_000_003 + self.world.rank + 1)

    def _make_optimizer(self) -> None:
        """Adam runs fused (one kernel over all parameters) on the CPU and CUDA: 1.7 against
        6.7 ms a step for the benchmark's Glow on 2 CPU cores (docs/benchmarks.md)."""
        options = {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
        if self.config.optimizer == "adam":
            fused = self.world.device.type in ("cpu", "cuda")
            self.optimizer = torch.optim.Adam(self.model.parameters(), fused=fused, **options)
        else:
            self.optimizer = torch.optim.Adamax(self.model.parameters(), **options)
        if self.world.distributed:
            self.step_module: nn.Module = nn.parallel.DistributedDataParallel(
                _Objective(self.model, self.config.beta, self.config.impute),
                device_ids=[self.world.device] if self.world.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
        else:
            self.step_module = _Objective(self.model, self.config.beta, self.config.impute)

    # the loop ------------------------------------------------------------------------------

    def lr(self) -> float:
        """Linear warmup over ``warmup`` steps, then constant; scaled after recoveries."""
        warm = min(1.0, (self.step + 1) / self.config.warmup) if self.config.warmup else 1.0
        return self.config.lr * warm * self.lr_scale

    def total_steps(self) -> int:
        """The step at which the step/epoch budget ends (time is checked separately)."""
        limits = []
        if self.config.steps is not None:
            limits.append(self.config.steps)
        if self.config.epochs is not None:
            limits.append(math.ceil(self.config.epochs * self.order.batches_per_epoch))
        return min(limits) if limits else 2**62

    def loop(self) -> TrainResult:
        """Train until the budget is spent; checkpoint on the way and at the end."""
        total = self.total_steps()
        self.begin(total)
        reason = "steps" if total == self.config.steps else "epochs"
        with _stop_signals() as stop:
            while self.step < total:
                stopped = self.iteration(stop)
                if stopped is not None:
                    reason = stopped
                    break

        del self.stream
        if reason != "interrupted" and self.step % self.config.val_every and self.data.validation:
            self._validate()
        if self.latest != ckpt.checkpoint_name(self.step):
            self._checkpoint()
        self._emit({"type": "end", "step": self.step, "reason": reason,
                    "best": self.best, "best_bpd": self.best_bpd, "latest": self.latest})
        if self.world.writer:
            self._write_run_record("interrupted" if reason == "interrupted" else "finished")
        self.metrics.close()
        if reason == "interrupted":
            raise KeyboardInterrupt
        return TrainResult(self.run, self.step, reason, self.latest, self.best,
                           self.best_bpd, self.last)

    def begin(self, total: int) -> None:
        """Open the batch stream and the clock of this invocation."""
        self._emit({"type": "start", "step": self.step, "total_steps": total,
                    "time_budget": self.config.time_budget})
        batches = RankBatches(self.data.train, self.order, self.labelled, self.world.rank,
                              self.world.size)
        self.stream = batch_stream(batches, self.order.drawn, self.config.workers)
        self.started = time.monotonic()
        self.bad_in_row = 0
        self.window = _Window()
        self.last: dict[str, Any] = {}

    def iteration(self, stop: list[str]) -> str | None:
        """One pass of the loop: a step (or a skip, or a recovery), its records, validation
        and checkpoint when due; returns why to stop now (``interrupted``, ``time_budget``)."""
        outcome = self._one_step(self.window)
        if outcome is None:
            self.bad_in_row += 1
            if self.bad_in_row >= self.config.max_bad_steps:
                self._recover()
                self.bad_in_row = 0
        else:
            self.bad_in_row = 0
            self.last = outcome
            self._after_step(outcome, self.window)

        budget = self.config.time_budget
        out_of_time = budget is not None and (time.monotonic() - self.started) / 60 >= budget
        interrupted, out_of_time = distributed.any_flags([bool(stop), out_of_time], self.world)
        if interrupted:
            return "interrupted"
        return "time_budget" if out_of_time else None

    def _one_step(self, window: _Window) -> dict[str, Any] | None:
        """One optimiser step; ``None`` when it was skipped for a non-finite loss or gradient."""
        tick = time.perf_counter()
        positions, x, codes = next(self.stream)
        self.order.drawn += 1
        x = x.to(self.world.device, non_blocking=True)
        codes = codes.to(self.world.device, non_blocking=True)

        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        generator = step_generator(self.config.seed, self.order.drawn - 1, self.world.device)
        _skip_to_rank_share(generator, x, self.world)
        loss, parts = self.step_module(x, codes, generator)
        if distributed.any_true(not bool(torch.isfinite(loss)), self.world):
            self._skip("loss", loss)
            return None

        loss.backward()
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not bool(torch.isfinite(grad_norm)):
            self._skip("gradient norm", grad_norm)
            return None
        self.optimizer.step()
        self.step += 1

        record = {"type": "train", "step": self.step, "epoch": round(self.order.epoch, 4),
                  "loss": float(distributed.mean(loss.detach(), self.world)), "lr": lr,
                  "grad_norm": float(grad_norm)}
        record.update(_parts(parts, self.world))
        window.add(len(positions) * self.world.size, time.perf_counter() - tick)
        return record

    def _skip(self, what: str, value: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._emit({"type": "skip", "step": self.step, "drawn": self.order.drawn,
                    "reason": f"non-finite {what}", "value": float(value.detach().float())})
        log.warning("step %d skipped: non-finite %s", self.step, what)

    def _recover(self) -> None:
        """Restore the last good state with a lower learning rate, or give up (exit 5)."""
        good = self.good
        self.model.load_state_dict(good["model"])
        self.optimizer.load_state_dict(good["optimizer"])
        self.step = good["step"]
        if self.recoveries >= self.config.max_recoveries:
            self._checkpoint()
            self._emit({"type": "end", "step": self.step, "reason": "diverged",
                        "latest": self.latest})
            if self.world.writer:
                self._write_run_record("diverged")
            self.metrics.close()
            raise RunFailedError(
                f"{self.run}: training diverged (non-finite loss in {self.config.max_bad_steps} "
                f"steps in a row after {self.recoveries} recoveries at --lr x "
                f"{self.lr_scale:g}); the last good state (step {self.step}) is checkpoint "
                f"{self.latest}; expected finite losses: try a lower --lr or larger --warmup"
            )
        self.recoveries += 1
        self.lr_scale *= self.config.bad_lr_factor
        self._emit({"type": "recover", "step": self.step, "lr_scale": self.lr_scale,
                    "recoveries": self.recoveries})
        log.warning("restored step %d with learning rate x %g", self.step, self.lr_scale)

    def _after_step(self, record: dict[str, Any], window: _Window) -> None:
        if self.step % self.config.log_every == 0 or self.step == 1:
            record["images_per_s"] = window.rate()
            self._emit(record)
        if self.step % self.config.val_every == 0 and self.data.validation:
            self._validate()
        if self.step % self.config.checkpoint_every == 0:
            self._checkpoint()

    # validation, checkpoints, records ---------------------------------------------------

    def _validate(self) -> None:
        """bpd on the validation subset under ``p_0`` and under each dataset's own prior.

        Runs on rank 0 under a forked, fixed RNG, so it neither depends on nor changes the
        training's random streams.
        """
        record: dict[str, Any] | None = None
        if self.world.writer:
            record = self.data.validate(self.model, self.config, self.world.device, self.step)
            if self.best_bpd is None or record["bpd_base"] < self.best_bpd:
                self.best_bpd = record["bpd_base"]
                self.best = ckpt.checkpoint_name(self.step)
                record["best"] = True
            self._emit(record)
        self.best, self.best_bpd = distributed.broadcast_object((self.best, self.best_bpd),
                                                                self.world)

    def _checkpoint(self) -> None:
        rng = ckpt.capture_rng()
        if self.world.distributed:
            gathered: list[Any] = [None] * self.world.size
            torch.distributed.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        name = ckpt.checkpoint_name(self.step)
        if self.world.writer:
            state = {
                "step": self.step, "drawn": self.order.drawn, "lr_scale": self.lr_scale,
                "recoveries": self.recoveries, "best": self.best or "",
                "best_bpd": self.best_bpd if self.best_bpd is not None else math.nan,
                "rng": rng_all, "optimizer": self.optimizer.state_dict(),
                "world_size": self.world.size,
            }
            start = time.perf_counter()
            ckpt.write_checkpoint(self.checkpoints, self.step, self.model.save, state)
            self.latest = name
            ckpt.prune(self.checkpoints, self.config.keep_last, self.best)
            self._write_run_record("running")
            self._emit({"type": "checkpoint", "step": self.step, "name": name,
                        "seconds": time.perf_counter() - start})
        self.latest = name
        self._remember_good()
        if self.world.distributed:
            torch.distributed.barrier()

    def _remember_good(self) -> None:
        """Keep the model and optimiser in memory as the state to fall back to."""
        self.good = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self.step,
        }

    def _write_run_record(self, status: str) -> None:
        ckpt.write_run_record(self.run, {
            "status": status, "step": self.step, "store": str(self.data.path.resolve()),
            "store_digest": self.data.digest, "latest": self.latest, "best": self.best,
            "best_bpd": self.best_bpd,
        })

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.world.writer:
            return
        self.metrics.write(record)
        if self.on_record is not None:
            self.on_record(record)


def step_generator(seed: int, drawn: int, device: torch.device) -> torch.Generator:
    """The generator of batch ``drawn``'s dequantisation noise and imputation draws.

    A pure function of ``(seed, drawn)``, so a resumed run draws exactly the noise that an
    uninterrupted one would, whatever happened to the global RNG (``drawn = -1``: the actnorm
    initialisation batch).
    """
    state = np.random.SeedSequence([seed, 3, drawn + 1]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return generator


def _skip_to_rank_share(generator: torch.Generator, x: torch.Tensor,
                        world: distributed.World) -> None:
    """Advance ``generator`` past the noise of the ranks before this one.

    On the CPU the uniform stream is sequential, so rank ``r`` then draws exactly the noise that
    a single process would draw for its rows of the global batch: the trained parameters do
    not depend on the number of processes beyond floating-point summation order. On CUDA the
    noise is a different (equally valid) draw.
    """
    if world.distributed and world.rank:
        torch.rand(world.rank * x.numel(), generator=generator, device=x.device)


def _parts(parts: Any, world: distributed.World) -> dict[str, float]:
    """The bpd parts reported by ``model.objective`` as floats (mean over ranks)."""
    out = {}
    items = parts.items() if isinstance(parts, dict) else vars(parts).items()
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(distributed.mean(value.detach().float(), world))
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class _Window:
    """Images per second over the steps since the last report."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds

    def rate(self) -> float:
        rate = self.images / self.seconds if self.seconds > 0 else math.nan
        self.images, self.seconds = 0, 0.0
        return rate



