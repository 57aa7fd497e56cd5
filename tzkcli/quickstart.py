"""``tzk quickstart``: the main job, end to end, on the bundled default data.

Six stages, each one call into the library that the matching command uses:

1. **ingest** (:func:`tzkcli.store.ingest`): three stores under ``OUT/stores/``: ``base.h5``
   (MNIST and the unlabelled Omniglot atlas), ``extended.h5`` (the same plus the labelled
   Omniglot zips) and ``omniglot.h5`` (the labelled Omniglot zips alone);
2. **train** (:func:`tzkcli.training.start_run`): a modest Glow on ``base.h5`` for most of the
   time budget, with the store's knowledge: ``dataset`` and MNIST's ``label``. Training takes
   every kind of its store, and adding ``label`` by extension instead would cost a flow pass
   over all 60,000 MNIST training images, more than the default budget leaves on 2 CPU cores;
3. **extend** (:func:`tzkcli.extension.extend_run`): the best checkpoint (by validation on
   training images) gains Omniglot's ``alphabet`` from ``extended.h5``, which adds
   ``dataset=omniglot`` too, in one flow pass over Omniglot's 3,872 training images and a
   random 20,000 of the split; the flow and ``p_0`` stay frozen, the trained priors are
   refitted (``calibrate``) and old and new priors refined together;
4. **sample** (:func:`tzkcli.report.samples.write_sample_grids`): grids from the joint, each
   dataset, each label and each alphabet, at temperatures 0.7 and 1;
5. **eval** (:func:`tzkcli.evaluation.evaluate`): the extended model on ``extended.h5``'s test
   split, and the model as trained (before the extension) on ``base.h5``'s test split with
   ``omniglot.h5`` as the out-of-distribution store it never saw;
6. **report** (:func:`tzkcli.report.write_report`): ``OUT/run/report.html``.

Data: the data root is ``data_root`` (``--data-root``), else ``$TZK_DATA_ROOT``, else
``../shared/data`` beside a checkout (beside the package source of an editable install, or
beside the current directory), else the real sample shipped in ``tzkcli/sample_data``.

Resuming: ``OUT/quickstart.json`` records each finished stage. A new quickstart refuses an
``OUT`` that exists and is not empty; with ``resume`` it skips the finished stages and
continues the others (training continues from its latest checkpoint, for what is left of its
share of the budget).

Warning:
    The time budget bounds training; the other stages take what they take, and are sized to
    fit in the rest of the default budget on 2 free CPU cores. The evaluation of the model
    before the extension (the OOD figures) is skipped, and says so, when the throughput
    measured by the extension predicts it would overrun the budget.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tzkcli import __version__, fsio
from tzkcli.errors import BadInputError, UsageError

DATA_ROOT_ENV = "TZK_DATA_ROOT"
STAGES = ("ingest", "train", "extend", "sample", "eval", "report")
STATE = "quickstart.json"
STATE_VERSION = 1
DEFAULT_BUDGET = 10.0
TRAIN_SHARE = 0.55
MIN_TRAIN_MINUTES = 0.05
BASE_DATASETS = ("mnist", "omniglot-atlas")
NEW_DATASET = "omniglot"
EXTEND_KINDS = ("alphabet",)
# The extension also refits the trained conditions on this many training images, so that they
# and the new ones are fits of one estimator on one flow (docs/quickstart.md), then refines
# old and new together for this many steps on the cached residuals.
CALIBRATE_IMAGES = 20_000
REFINE_STEPS = 300

# The model and optimisation of the quickstart; every other field keeps its tzk train default.
# Validation, which picks the best checkpoint (the one extended), reads training images: the
# test split is for the evaluation alone.
# Small enough for several hundred steps in the default budget on 2 CPU cores: a step costs
# about 0.4 of one of 3 levels x 4 steps x 64 hidden channels (measured side by side).
TRAIN_SETTINGS: dict[str, Any] = {
    "levels": 3, "flow_steps": 3, "hidden": 48, "batch_size": 64, "lr": 1e-3, "warmup": 20,
    "balance": "dataset", "val_split": "train", "val_images": 600, "val_every": 100,
    "checkpoint_every": 100,
    "log_every": 10, "keep_last": 2,
}


@dataclass
class QuickstartOptions:
    """What ``tzk quickstart`` runs.

    Attributes:
        out: the directory everything is written to.
        time_budget: minutes for the whole pipeline; training gets ``TRAIN_SHARE`` of it.
        data_root: the folder of the real datasets (None: find one, see the module docstring).
        resume: continue an ``out`` made by an earlier quickstart.
        sample: use the shipped sample even where a data root is found.
        device: ``auto`` (a GPU when present), ``cpu``, ``cuda`` or ``cuda:N``.
        train: overrides of :data:`TRAIN_SETTINGS` (training fields of ``tzk train``).
    """

    out: Path = Path("tzk-quickstart")
    time_budget: float = DEFAULT_BUDGET
    data_root: Path | None = None
    resume: bool = False
    sample: bool = False
    device: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataChoice:
    """Where the data comes from: ``root`` with the manifests in ``manifests``.

    ``source`` is ``--data-root``, ``TZK_DATA_ROOT``, ``checkout`` or ``sample``.
    """

    root: Path
    manifests: Path
    source: str

    def manifest(self, name: str) -> Path:
        return self.manifests / f"{name}.toml"


@dataclass
class Event:
    """One thing the pipeline reports: ``kind`` is ``start``, ``progress`` (``done`` of
    ``total``), ``record`` (a training record in ``record``), ``note``, ``wrote`` (``text``
    names a path), ``skip`` or ``done`` (``seconds`` the stage took)."""

    stage: str
    kind: str
    text: str = ""
    done: int = 0
    total: int = 0
    seconds: float = 0.0
    record: dict[str, Any] | None = None


@dataclass
class QuickstartResult:
    """What the quickstart did: per stage its seconds, and the report's path."""

    out: Path
    report: Path
    data: DataChoice
    seconds: dict[str, float]
    total_seconds: float


OnEvent = Callable[[Event], None]


# finding the data ------------------------------------------------------------------------------

def package_dir() -> Path:
    return Path(__file__).resolve().parent


def sample_choice() -> DataChoice:
    """The real sample shipped inside the package."""
    sample = package_dir() / "sample_data"
    return DataChoice(sample, sample / "manifests", "sample")


def real_manifests(cwd: Path) -> Path | None:
    """The folder of the real datasets' manifests: ``tzkcli/manifests`` when the package ships
    them, else ``data_manifests/`` of the checkout (beside the package source or in ``cwd``)."""
    for folder in (package_dir() / "manifests", package_dir().parent / "data_manifests",
                   cwd / "data_manifests"):
        if all((folder / f"{name}.toml").is_file() for name in (*BASE_DATASETS, NEW_DATASET)):
            return folder
    return None


def missing_files(root: Path, manifests: Path) -> list[str]:
    """The files the manifests name that are not under ``root``."""
    from tzkcli.store import load_manifest

    missing = []
    for name in (*BASE_DATASETS, NEW_DATASET):
        manifest = load_manifest(manifests / f"{name}.toml")
        missing.extend(entry.path for entry in manifest.files.values()
                       if not (root / entry.path).exists())
    return missing


def find_data(data_root: Path | None, environ: dict[str, str] | None = None,
              cwd: Path | None = None, sample: bool = False) -> DataChoice:
    """Choose the data root as the module docstring says (``sample``: the shipped sample).

    Raises:
        UsageError: both ``data_root`` and ``sample``.
        BadInputError: ``data_root`` or ``$TZK_DATA_ROOT`` is given but lacks a dataset's
            files, or no manifests of the real datasets are found for it.
    """
    if sample:
        if data_root is not None:
            raise UsageError(f"--sample with --data-root {data_root}: expected one of them")
        return sample_choice()
    environ = dict(os.environ) if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    given = [("--data-root", data_root)] if data_root is not None else []
    if not given and environ.get(DATA_ROOT_ENV):
        given = [(DATA_ROOT_ENV, Path(environ[DATA_ROOT_ENV]))]
    manifests = real_manifests(cwd)
    for source, root in given:
        if manifests is None:
            raise BadInputError(
                f"{source} {root}: no manifests of the real datasets found (looked for "
                f"data_manifests/ beside {package_dir()} and in {cwd}); expected a checkout "
                "of tzk"
            )
        missing = missing_files(root, manifests)
        if missing:
            raise BadInputError(
                f"{source} {root}: {missing[0]} not found ({len(missing)} files missing); "
                "expected the folder of the real datasets (MNIST, Omniglot)"
            )
        return DataChoice(root, manifests, source)

    if manifests is not None:
        for root in (package_dir().parent.parent / "shared" / "data",
                     cwd.parent / "shared" / "data"):
            if root.is_dir() and not missing_files(root, manifests):
                return DataChoice(root, manifests, "checkout")
    return sample_choice()


# the state file ---------------------------------------------------------------------------------

def _read_state(out: Path) -> dict[str, Any]:
    path = out / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"--resume {out}: no {STATE}; expected a folder made by "
                            "tzk quickstart") from None
    except (OSError, ValueError) as error:
        raise BadInputError(f"{path}: unreadable or not JSON ({error})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise BadInputError(f"{path}: not a quickstart state of version {STATE_VERSION}")
    return state


def _write_state(out: Path, state: dict[str, Any]) -> None:
    fsio.atomic_write_text(out / STATE, json.dumps(state, indent=2) + "\n")


def _prepare_out(options: QuickstartOptions, data: DataChoice) -> dict[str, Any]:
    out = options.out
    if options.resume:
        state = _read_state(out)
        state["resumed"] = state.get("resumed", 0) + 1
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--out {out}: exists and is not empty; expected a new folder, or "
                            "--resume to continue the quickstart in it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise fsio.write_error(out, error) from error
    return {"version": STATE_VERSION, "tzk": __version__, "time_budget": options.time_budget,
            "data": {"root": str(data.root), "manifests": str(data.manifests),
                     "source": data.source}, "stages": {}}


# the pipeline ---------------------------------------------------------------------------------

class _Pipeline:
    """The six stages over one output folder; each finished stage is recorded in the state."""

    def __init__(self, options: QuickstartOptions, data: DataChoice, state: dict[str, Any],
                 on_event: OnEvent | None) -> None:
        self.options = options
        self.data = data
        self.state = state
        self.on_event = on_event
        self.out = options.out
        self.stores = self.out / "stores"
        self.run = self.out / "run"
        self.stage_tick = time.monotonic()

    def emit(self, stage: str, kind: str, text: str = "", **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(Event(stage, kind, text, **fields))

    def progress(self, stage: str) -> Callable[[str, int, int], None]:
        def report(label: str, done: int, total: int) -> None:
            self.emit(stage, "progress", label, done=done, total=total)

        return report

    def store(self, name: str) -> Path:
        return self.stores / f"{name}.h5"

    def run_all(self) -> dict[str, float]:
        seconds = {}
        for stage in STAGES:
            record = self.state["stages"].get(stage)
            if record and record.get("done"):
                self.emit(stage, "skip", "finished by an earlier run")
                seconds[stage] = 0.0
                continue
            self.emit(stage, "start", _DESCRIPTIONS[stage])
            self.stage_tick = time.monotonic()
            details = getattr(self, f"stage_{stage}")() or {}
            seconds[stage] = time.monotonic() - self.stage_tick
            self.state["stages"][stage] = {"done": True, "seconds": seconds[stage], **details}
            _write_state(self.out, self.state)
            self.emit(stage, "done", seconds=seconds[stage])
        return seconds

    # 1. ingest
    def stage_ingest(self) -> dict[str, Any]:
        from tzkcli.store import ingest, load_manifest

        try:
            self.stores.mkdir(exist_ok=True)
        except OSError as error:
            raise fsio.write_error(self.stores, error) from error
        plan = {"base": BASE_DATASETS, "extended": (*BASE_DATASETS, NEW_DATASET),
                "omniglot": (NEW_DATASET,)}
        images = {}
        for store, names in plan.items():
            manifests = [load_manifest(self.data.manifest(name)) for name in names]
            report = ingest(manifests, self.store(store), self.data.root,
                            progress=self.progress("ingest"))
            images[store] = report.images
            counts = ", ".join(f"{o.name} {o.images:,}" for o in report.outcomes)
            self.emit("ingest", "wrote", f"{report.path}: {report.images:,} images ({counts})")
        return {"images": images}

    # 2. train
    def train_minutes(self) -> float:
        ingest = self.state["stages"].get("ingest", {}).get("seconds", 0.0) / 60
        return max(MIN_TRAIN_MINUTES, self.options.time_budget * TRAIN_SHARE - ingest)

    def stage_train(self) -> dict[str, Any]:
        from tzkcli.training import resume_run, start_run
        from tzkcli.training.config import resolve

        minutes = self.train_minutes()
        on_record = self._on_record
        if _has_checkpoint(self.run):
            from tzkcli.report.history import read_history

            history = read_history(self.run)
            done = history.train_seconds / 60
            left = minutes - done
            if left < MIN_TRAIN_MINUTES:
                self.emit("train", "note", f"{done:.1f} of {minutes:.1f} minutes trained "
                          "already; nothing left to train")
                return {"minutes": minutes}
            self.emit("train", "note", f"continuing {self.run} for {left:.1f} more minutes")
            # a new budget replaces the saved one whole: keep the run's own step/epoch limits
            budget = {"time_budget": left, "steps": history.config.get("steps"),
                      "epochs": history.config.get("epochs"), "device": self.options.device}
            result = resume_run(self.run, budget, on_record=on_record)
        else:
            if self.run.exists():
                # an earlier start that wrote no checkpoint; the lock fails if it still runs
                with fsio.exclusive_lock(self.run, "run directory"):
                    shutil.rmtree(self.run)
            flags = {**TRAIN_SETTINGS, **self.options.train, "time_budget": minutes,
                     "device": self.options.device}
            config = resolve({}, flags, "tzk quickstart")
            self.emit("train", "note", f"training for {minutes:.1f} minutes: levels "
                      f"{config.levels}, flow steps {config.flow_steps}, hidden "
                      f"{config.hidden}, batch {config.batch_size}, on {self.store('base')}")
            result = start_run(self.store("base"), self.run, config, on_record=on_record)
        best = "none" if result.best_bpd is None else f"{result.best} ({result.best_bpd:.4f} bpd)"
        self.emit("train", "wrote", f"{self.run}: step {result.step} ({result.stop_reason}); "
                  f"latest {result.latest}; best {best}")
        return {"minutes": minutes, "step": result.step, "checkpoint": result.latest}

    def _on_record(self, record: dict[str, Any]) -> None:
        self.emit("train", "record", record=record)

    # 3. extend
    def stage_extend(self) -> dict[str, Any]:
        from tzkcli.evaluation import read_run_record
        from tzkcli.extension import ExtendOptions, extend_run

        record = read_run_record(self.run)
        if "-extend-" in str(record.get("latest")):
            self.emit("extend", "note", f"{record['latest']} is already an extension")
            return {"checkpoint": record["latest"], "base": record.get("extended_from")}
        options = ExtendOptions(conditions=list(EXTEND_KINDS), store=self.store("extended"),
                                calibrate=CALIBRATE_IMAGES, refine_steps=REFINE_STEPS,
                                checkpoint="best" if record.get("best") else "latest",
                                device=_device(self.options.device))
        tick = time.monotonic()
        result = extend_run(self.run, options, progress=self.progress("extend"))
        seconds = time.monotonic() - tick
        for condition in result.conditions:
            self.emit("extend", "note", f"{condition.spec}: {condition.images:,} images, bpd "
                      f"{condition.bpd_base:.4f} under p_0 -> {condition.bpd:.4f} under its "
                      f"prior (gain {condition.gain:+.4f})")
        for fit in result.calibrated:
            self.emit("extend", "note", f"{fit.spec} refitted: {fit.images:,} images, bpd "
                      f"{fit.bpd_before:.4f} -> {fit.bpd:.4f} under its prior")
        images = result.images
        self.emit("extend", "wrote", f"{self.run / 'checkpoints' / result.checkpoint} "
                  f"({len(result.conditions)} new conditions, {len(result.calibrated)} "
                  f"refitted, {result.frozen_conditions} frozen; from {result.base})")
        return {"checkpoint": result.checkpoint, "base": result.base,
                "images_per_s": images / seconds if seconds > 0 else None}

    # 4. sample
    def stage_sample(self) -> dict[str, Any]:
        from tzkcli.report.samples import write_sample_grids

        index = write_sample_grids(self.run, device=self.options.device,
                                   progress=self.progress("sample"))
        grids = json.loads(index.read_text(encoding="utf-8"))["grids"]
        self.emit("sample", "wrote", f"{index.parent}: {len(grids)} grids ({index.name})")
        return {"grids": len(grids)}

    # 5. eval
    def stage_eval(self) -> dict[str, Any]:
        extended = self._evaluate("latest", self.store("extended"), ood=(), samples=16)
        base = self.state["stages"]["extend"].get("base")
        rate = self.state["stages"]["extend"].get("images_per_s")
        images = self._images("base") + self._images("omniglot")
        left = self.options.time_budget * 60 - self._elapsed()
        if base and rate and images / rate > max(left, 0) * 1.2:
            self.emit("eval", "note", f"skipped the evaluation of {base} with "
                      f"--ood {self.store('omniglot')}: {images:,} images would take about "
                      f"{images / rate / 60:.1f} minutes, beyond the budget")
            return {"results": [str(extended)]}
        results = [extended]
        if base:
            results.append(self._evaluate(base, self.store("base"),
                                          ood=(self.store("omniglot"),), samples=0))
        return {"results": [str(path) for path in results]}

    def _evaluate(self, which: str, store: Path, ood: tuple[Path, ...], samples: int) -> Path:
        from tzkcli.evaluation import EvalOptions, evaluate, open_run, write_results

        opened = open_run(self.run, which)
        options = EvalOptions(split="test", ood=list(ood), samples=samples,
                              device=_device(self.options.device))
        report = evaluate(opened.model, store, options, progress=self.progress("eval"))
        report = {"run": str(self.run), "checkpoint": opened.checkpoint} | report
        path = write_results(self.run, opened.checkpoint, options.split, report)
        gains = [row["gain"] for row in report["bpd"]["by_condition"].values()
                 if row.get("gain") is not None]
        self.emit("eval", "wrote", f"{path}: bpd under p_0 {report['bpd']['joint']:.4f} on "
                  f"{report['images']:,} images; {sum(g > 0 for g in gains)} of {len(gains)} "
                  "conditions with a positive knowledge gain")
        return path

    def _images(self, store: str) -> int:
        """Images of a store's test split (the whole store when it has none, as eval reads
        an OOD store)."""
        from tzkcli.store import open_store

        with open_store(self.store(store)) as opened:
            split = "test" if "test" in opened.split_names else None
            return len(opened.indices(split=split))

    def _elapsed(self) -> float:
        """Seconds spent so far: the finished stages and the current one."""
        finished = sum(s.get("seconds", 0.0) for s in self.state["stages"].values())
        return finished + time.monotonic() - self.stage_tick

    # 6. report
    def stage_report(self) -> dict[str, Any]:
        from tzkcli.report import write_report

        result = write_report(self.run, device=self.options.device)
        self.emit("report", "wrote", f"{result.path} ({result.bytes / 1e6:.1f} MB, "
                  f"{result.images} images)")
        return {"path": str(result.path)}


_DESCRIPTIONS = {
    "ingest": "ingest MNIST and Omniglot into three stores",
    "train": "train a Glow on MNIST and the Omniglot atlas, with dataset and label",
    "extend": "extend it with Omniglot and its alphabets (the flow stays frozen)",
    "sample": "draw sample grids at two temperatures",
    "eval": "evaluate: bpd, knowledge gain, accuracy, OOD",
    "report": "write the HTML report",
}


def _has_checkpoint(run: Path) -> bool:
    return any(p.is_dir() for p in (run / "checkpoints").glob("step-*")) if run.is_dir() else False


def _device(name: str) -> Any:
    from tzkcli.training.distributed import choose_device

    return choose_device(name)


def check_options(options: QuickstartOptions) -> None:
    """Raises UsageError for a budget that is not a positive number of minutes."""
    budget = options.time_budget
    if not (isinstance(budget, (int, float)) and budget == budget and 0 < budget < 1e6):
        raise UsageError(f"--time-budget {budget}: expected a positive number of minutes")


def quickstart(options: QuickstartOptions, on_event: OnEvent | None = None) -> QuickstartResult:
    """Run (or continue) the whole pipeline into ``options.out``; see the module docstring.

    Raises:
        UsageError: a bad time budget.
        BadInputError: ``out`` exists and is not empty without ``resume``; a data root that
            lacks the datasets; any stage's bad input.
        BusyError: another process holds a store or the run.
        RunFailedError: training diverged or a write failed; ``resume`` continues.
    """
    check_options(options)
    data = find_data(options.data_root, sample=options.sample)
    state = _prepare_out(options, data)
    if options.resume:
        recorded = state.get("data", {})
        data = DataChoice(Path(recorded.get("root", data.root)),
                          Path(recorded.get("manifests", data.manifests)),
                          str(recorded.get("source", data.source)))
    _write_state(options.out, state)

    pipeline = _Pipeline(options, data, state, on_event)
    started = time.monotonic()
    seconds = pipeline.run_all()
    report = Path(state["stages"]["report"].get("path", options.out / "run" / "report.html"))
    return QuickstartResult(options.out, report, data, seconds, time.monotonic() - started)


def describe(data: DataChoice) -> str:
    """One line on where the data comes from."""
    where = {"--data-root": "--data-root", DATA_ROOT_ENV: f"${DATA_ROOT_ENV}",
             "checkout": "../shared/data beside the checkout",
             "sample": "the real sample shipped with tzk (no data root found)"}[data.source]
    return f"data: {data.root} ({where})"


__all__ = ["DEFAULT_BUDGET", "STAGES", "DataChoice", "Event", "QuickstartOptions",
           "QuickstartResult", "describe", "find_data", "quickstart"]
