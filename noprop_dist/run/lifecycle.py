"""The run lifecycle that every trainer shares: prepare a run, decide when to checkpoint,
finish and evaluate it.

A trainer (:mod:`noprop_dist.trainers.registry` lists them) does only its own part, training::

    data = load_data(cfg)                       # before anything is written
    ... trainer-specific checks (cluster reachable, placement fits) ...
    with open_run(cfg, run_dir, resume, fields) as run:   # the run directory, locked
        ... train, checkpointing when ``checkpoint_due(...)`` says so ...
        return finish_run(run, cfg, data, train_seconds, extra)   # evaluate, summary, plot

``finish_run`` evaluates through the variant's own predictor (:mod:`noprop_dist.variants.registry`),
so a NoProp chain and a back-propagation baseline share the run directory format, the
summary, ``eval``, ``export`` and the plot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Iterator

from noprop_dist import config as config_mod
from noprop_dist.run.rundir import LOCK_FILE, RunDir
from noprop_dist.errors import CheckpointError
from noprop_dist.config import Config, TrainConfig
from noprop_dist.data import Dataset, load_dataset
from noprop_dist.training.preflight import StepEstimate, device_memory_budget, fitting_batch


def load_data(cfg: Config) -> Dataset:
    """The run's dataset (converted once to the Arrow cache, then memory-mapped)."""
    return load_dataset(cfg.data)


@contextlib.contextmanager
def open_run(cfg: Config, run_dir: str | Path, resume: bool, fields: dict[str, Any]) -> Iterator[RunDir]:
    """Create the run directory (or reopen it on resume) with the resolved config and manifest,
    and hold its lock until the ``with`` block ends: one process trains in a run at a time."""
    run = RunDir(run_dir)
    if not resume and not (run.path / LOCK_FILE).exists():
        run.refuse_existing()        # no side effect yet: a refused run leaves nothing behind
    run.path.mkdir(parents=True, exist_ok=True)
    with RunLock(run.path):
        # Under the lock (a directory with a lock file is checked only here, so that a run
        # being created by another process is reported as in use, not as foreign files).
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
    import json

    summary_path = run.path / "summary.json"
    if run.manifest().get("status") != "finished" or not summary_path.exists():
        return None
    try:
        return json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None   # a damaged summary: finishing again rewrites it


def epoch_is(every: int, epoch: int, last: int) -> bool:
    """True every ``every`` epochs and at the last one."""
    return epoch % every == 0 or epoch == last


def sync_due(train: TrainConfig, epoch: int) -> bool:
    """Is ``epoch`` an embedding synchronisation point (learned/prototype embedding)?"""
    return epoch_is(train.embed_sync_every, epoch, train.epochs)


def checkpoint_due(train: TrainConfig, epoch: int, shared_embedding: bool) -> bool:
    """Is ``epoch`` a checkpoint point? The one policy of every trainer.

    With a shared (learned/prototype) embedding, units are checkpointed together at sync
    points only, each holding the synchronised embedding, so that a resume sees one
    consistent epoch; otherwise every ``train.checkpoint_every`` epochs and at the end.
    """
    if shared_embedding:
        return sync_due(train, epoch)
    return epoch_is(train.checkpoint_every, epoch, train.epochs)


def finish_run(run: RunDir, cfg: Config, data: Dataset, train_seconds: float,
               extra: dict[str, Any], step: StepEstimate | None = None) -> dict[str, Any]:
    """Evaluate the finished run on the test split; write summary.json and the plot.

    ``step`` (the trainer's preflight estimate) sizes the evaluation's forward passes to the
    device's free memory; the scores do not depend on that size.

    ``train_seconds`` is this session's training phase; the summary adds the phases of
    earlier sessions of the same run that reached this point (a crashed session's is lost).
    ``extra`` holds the trainer's own figures (backend, workers, bytes, memory).
    """
    from noprop_dist.run.plots import plot_run
    from noprop_dist.variants.base import resolve_device
    from noprop_dist.variants.registry import get_variant

    train_seconds += run.manifest().get("train_seconds_done", 0.0)
    run.update_manifest(train_seconds_done=train_seconds)
    predictor = get_variant(cfg.variant).load(run)
    device = resolve_device(cfg.train.device)
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
