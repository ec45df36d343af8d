"""The run lifecycle: one template that every trainer goes through (:func:`train_run`).

::

    data = load_data(cfg); setup = make_setup(cfg, data)      # before anything is written
    placement = trainer.place(cfg, data, setup)                # cluster reachable, workers, memory
    trainer.start_workers(...)                                 # Ray: spawned now, start up meanwhile
    step = check_unit(...)                                     # the preflight: the step fits
    with trainer.open(cfg, run_dir, resume, manifest) as run:  # the run directory, locked
        if finished: return its summary                        # a --resume of a finished run
        seconds, extra = trainer.train(run, ...)               # the trainer's own part
        return finish_run(...)                                 # evaluate, summary.json, plot
    trainer.close()                                            # whatever the outcome

Each phase is timed on a :class:`~noprop_dist.run.startup.StartupClock` (``startup_s`` and
``launch_to_first_step_s`` in summary.json).

A trainer (:class:`RunTrainer`; the registry in :mod:`noprop_dist.variants.registry` finds
them) supplies only what differs: where it trains (:class:`Placement`), the training body and
its own summary fields; :func:`session_figures` reads the rest from this session's metrics.
``finish_run`` evaluates through the variant's own predictor, so every variant shares the run
directory format, the summary, ``eval``, ``export`` and the plot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator

from noprop_dist import config as config_mod
from noprop_dist.config import Config
from noprop_dist.data import Dataset, load_dataset
from noprop_dist.errors import CheckpointError
from noprop_dist.run.plots import plot_run
from noprop_dist.run.signals import keep_stopping_on_signals
from noprop_dist.run.startup import StartupClock
from noprop_dist.rundir import LOCK_FILE, MANIFEST, RunDir
from noprop_dist.training.preflight import StepEstimate, check_unit, device_memory_budget, fitting_batch
from noprop_dist.variants.base import UnitSetup, check_gpu, evaluation_device, make_setup
from noprop_dist.variants.registry import find_trainer, get_variant, load_target


def load_data(cfg: Config) -> Dataset:
    """The run's dataset (converted once to the Arrow cache, then memory-mapped)."""
    return load_dataset(cfg.data)


@dataclass
class Placement:
    """Where a trainer will train, decided before anything is written (the preflight's input)."""
    workers: int
    batch_share: int           # the most examples of a global batch one worker trains at once
    budget: int | None         # bytes each worker may use (None: unknown)
    sharing: int               # workers sharing that budget
    where: str                 # for messages: "this machine (cpu)", "a Ray worker (...)"
    units_held: int = 1        # units one worker holds at once (one trains at a time)
    plan: Any = None           # the trainer's own plan (Ray's layout)


def batch_share(cfg: Config, data: Dataset, workers: int) -> int:
    """The largest share of a global batch among ``workers`` data-parallel ranks."""
    return -(-min(cfg.train.batch_size, len(data.train)) // workers)


class RunTrainer:
    """What a trainer supplies to :func:`train_run`."""
    def place(self, cfg: Config, data: Dataset, setup: UnitSetup) -> Placement:
        """Connect, plan the workers and their memory; refuse (one line) before anything is written."""
        raise NotImplementedError

    def train(self, run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
              show_progress: bool) -> tuple[float, dict[str, Any]]:
        """Train every unit to ``train.epochs``; returns (training seconds, the trainer's summary fields)."""
        raise NotImplementedError

    def start_workers(self, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
                      run_dir: str | Path) -> None:
        """Start what can start before the preflight and the run directory (the Ray trainer's
        worker processes, so that their start-up overlaps the driver's); writes nothing."""

    def close(self) -> None:
        """Release what :meth:`start_workers` started if :meth:`train` did not (a refused
        preflight, a stop); called once the run ends, whatever the outcome."""

    def open(self, cfg: Config, run_dir: str | Path, resume: bool, fields: dict[str, Any]) -> ContextManager[RunDir]:
        return open_run(cfg, run_dir, resume, fields)

    def check_devices(self, cfg: Config) -> None:
        """Refuse (one line) a ``train.device`` GPU the training cannot have; runs after
        :meth:`place` (connected), before anything is written. The backend's registry entry
        says whose GPUs count: this machine's, or the Ray cluster's (its workers')."""
        gpus, where = load_target(find_trainer(cfg.cluster.backend, cfg.variant).gpus)(cfg.cluster)
        check_gpu(cfg.train.device, gpus, where)

    writes = True
    """Does this process finish the run (evaluate, write the summary)? Ranks other than 0 do not."""

    startup: StartupClock | None = None
    """The run's start-up phases (set by :func:`train_run`); a trainer marks its own."""

    def mark(self, phase: str) -> None:
        if self.startup is not None:
            self.startup.mark(phase)

def train_run(trainer: RunTrainer, cfg: Config, run_dir: str | Path, resume: bool = False,
              show_progress: bool = True) -> dict[str, Any] | None:
    """Train a run with ``trainer``: the one lifecycle of every entry point; returns the summary."""
    clock = trainer.startup = StartupClock()
    started = time.time()
    data = load_data(cfg)
    clock.mark("data")
    setup = make_setup(cfg, data)
    objective = setup.objective
    clock.mark("setup")
    placement = trainer.place(cfg, data, setup)
    clock.mark("place")
    keep_stopping_on_signals()    # placing may have started Ray, which takes SIGTERM over
    trainer.check_devices(cfg)
    try:
        trainer.start_workers(cfg, data, setup, placement, run_dir)
        clock.mark("start workers")
        step = check_unit(objective.step_probe(setup, len(data.train)), placement.batch_share, data.input_shape,
                          placement.budget, placement.sharing, placement.where, units_held=placement.units_held)
        clock.mark("preflight")
        with trainer.open(cfg, run_dir, resume, objective.manifest_fields(cfg, data, setup)) as run:
            clock.mark("open")
            if (done := finished_summary(run)) is not None:
                return done
            train_seconds, extra = trainer.train(run, cfg, data, setup, placement, show_progress)
            if not trainer.writes:
                return None
            figures = session_figures(run.read_metrics(), started)
            first = figures.pop("first_step_at")
            figures.update({"startup_s": clock.phases(first),
                            "launch_to_first_step_s": clock.launch_to_first_step(first)})
            return finish_run(run, cfg, data, train_seconds, {**figures, **extra}, step)
    finally:
        trainer.close()


def session_figures(records: list[dict[str, Any]], since: float) -> dict[str, Any]:
    """The summary's figures of this session's training, from the metrics every trainer writes:
    per epoch the seconds of all units (summed: a worker's time, the units of a Ray epoch
    overlap), the bytes a worker all-reduced in the last epoch (data-parallel units), peak
    training memory per unit, the largest RSS, and what ``--eval.every`` cost."""
    records = [r for r in records if r.get("time", 0) >= since]
    unit_epochs = [r for r in records if r.get("event") == "unit_epoch"]
    last: dict[str, dict[str, Any]] = {}
    seconds: dict[int, float] = {}
    peak: dict[str, int] = {}
    for r in unit_epochs:
        last[r["unit"]] = r
        seconds[r["epoch"]] = seconds.get(r["epoch"], 0.0) + r["seconds"]
        peak[r["unit"]] = max(peak.get(r["unit"], 0), r["peak_memory_bytes"])
    first_steps = [r["first_step_at"] for r in unit_epochs if r.get("first_step_at")]
    return {"epoch_seconds": [seconds[e] for e in sorted(seconds)],
            "first_step_at": min(first_steps, default=None),
            "allreduce_bytes_per_worker_per_epoch": sum(r.get("allreduce_bytes", 0) for r in last.values()),
            "peak_memory_bytes": peak, "rss_bytes": max((r["rss_bytes"] for r in unit_epochs), default=0),
            "eval_every_seconds": sum(r["eval_seconds"] for r in records if r.get("event") == "eval")}


@contextlib.contextmanager
def open_run(cfg: Config, run_dir: str | Path, resume: bool, fields: dict[str, Any]) -> Iterator[RunDir]:
    """Create the run directory (or reopen it on resume) with the resolved config and manifest,
    and hold its lock until the ``with`` block ends: one process trains in a run at a time."""
    run = RunDir(run_dir)
    if not resume and not (run.path / LOCK_FILE).exists():
        try:
            run.refuse_existing()    # no side effect yet: a refused run leaves nothing behind
        except CheckpointError:
            # Another process created the run meanwhile (its lock file and config appeared
            # between the two checks): decided under the lock, as "in use" or "holds a run",
            # not as foreign files.
            if not (run.path / LOCK_FILE).exists():
                raise
    run.path.mkdir(parents=True, exist_ok=True)
    with RunLock(run.path):
        # Under the lock (a directory with a lock file is checked only here, so that a run
        # being created by another process is reported as in use, not as foreign files).
        if resume and (run.path / MANIFEST).exists():
            for file in run.undo_interrupted_commits():
                print(f"noprop-dist: {run.path / file}: the last run stopped while recording it; its previous "
                      "checkpoint is back (that unit trains its unrecorded epoch again)")
        run.create(config_mod.to_toml(cfg), {"variant": cfg.variant, **fields}, resume=resume)
        yield run


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``, held while a process trains in the run.

    The kernel drops it when the holder exits, however it exits (no stale lock after a crash
    or a kill); the file keeps the last holder's PID for the message a second process sees.
    """

    def __init__(self, run_path: Path):
        self.path = run_path / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is in use by process {holder} (a train or --resume running in it); "
                f"wait for it to finish or stop it (kill {holder}), then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)        # closing the descriptor releases the flock
            self.fd = None


def finished_summary(run: RunDir) -> dict[str, Any] | None:
    """The summary of a run that already finished, or None. A ``--resume`` of a finished run
    returns it and changes nothing in the run directory (no retraining, no re-evaluation)."""
    summary_path = run.path / "summary.json"
    if run.manifest().get("status") != "finished" or not summary_path.exists():
        return None
    try:
        return json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None   # a damaged summary: finishing again rewrites it


def finish_run(run: RunDir, cfg: Config, data: Dataset, train_seconds: float,
               extra: dict[str, Any], step: StepEstimate | None = None) -> dict[str, Any]:
    """Evaluate the finished run on the test split; write summary.json and the plot.

    ``step`` (the trainer's preflight estimate) sizes the evaluation's forward passes to the
    device's free memory; the scores do not depend on that size.

    ``train_seconds`` is this session's training phase; the summary adds the phases of
    earlier sessions of the same run that reached this point (a crashed session's is lost).
    ``extra`` holds the trainer's own figures (backend, workers, bytes, memory).
    """
    train_seconds += run.manifest().get("train_seconds_done", 0.0)
    run.update_manifest(train_seconds_done=train_seconds)
    predictor = get_variant(cfg.variant).load(run)
    device = evaluation_device(cfg.train.device)
    max_batch = None if step is None else fitting_batch(step, device_memory_budget(device), cfg.eval.batch_size)
    start = time.perf_counter()
    scores = predictor.evaluate(data.test, cfg.eval, device=device, max_batch=max_batch)
    units = run.manifest()["units"]
    summary = {
        **scores,
        "eval_seconds": time.perf_counter() - start, "eval_forward_batch": max_batch or cfg.eval.batch_size,
        "train_seconds": train_seconds, "variant": cfg.variant,
        "dataset": data.name, "train_examples": len(data.train), "test_examples": len(data.test),
        "epochs": cfg.train.epochs, "embedding": cfg.model.embedding, "block": cfg.model.block,
        "T": cfg.schedule.T,
        "unit_epochs_done": {name: entry["epochs_done"] for name, entry in units.items()},
        **extra,
    }
    run.write_summary(summary)
    run.append_metrics({"event": "evaluation", **scores})
    run.update_manifest(status="finished")
    plot_run(run)
    return summary
