"""The run lifecycle that every trainer shares: prepare a run, decide when to checkpoint,
finish and evaluate it.

A trainer (:mod:`noprop_dist.trainers` lists them) does only its own part, training::

    data = load_data(cfg)                       # before anything is written
    ... trainer-specific checks (cluster reachable, placement fits) ...
    run = open_run(cfg, run_dir, resume, fields)  # the run directory, config.toml, manifest
    ... train, checkpointing when ``checkpoint_due(...)`` says so ...
    return finish_run(run, cfg, data, train_seconds, extra)   # evaluate, summary, plot

``finish_run`` evaluates through the variant's own predictor (:mod:`noprop_dist.variants`),
so a NoProp chain and a back-propagation baseline share the run directory format, the
summary, ``eval``, ``export`` and the plot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import config as config_mod
from .checkpoint import RunDir
from .config import Config, TrainConfig
from .data import Dataset, load_dataset


def load_data(cfg: Config) -> Dataset:
    """The run's dataset (converted once to the Arrow cache, then memory-mapped)."""
    return load_dataset(cfg.data)


def open_run(cfg: Config, run_dir: str | Path, resume: bool, fields: dict[str, Any]) -> RunDir:
    """Create the run directory (or reopen it on resume) with the resolved config and manifest."""
    run = RunDir(run_dir)
    run.create(config_mod.to_toml(cfg), {"variant": cfg.variant, **fields}, resume=resume)
    return run


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
               extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the finished run on the test split; write summary.json and the plot.

    ``train_seconds`` is this session's training phase; the summary adds the phases of
    earlier sessions of the same run that reached this point (a crashed session's is lost).
    ``extra`` holds the trainer's own figures (backend, workers, bytes, memory).
    """
    from .plots import plot_run
    from .units import resolve_device
    from .variants import get_variant

    train_seconds += run.manifest().get("train_seconds_done", 0.0)
    run.update_manifest(train_seconds_done=train_seconds)
    predictor = get_variant(cfg.variant).load(run)
    start = time.perf_counter()
    scores = predictor.evaluate(data.test, cfg.eval, device=resolve_device(cfg.train.device))
    units = run.manifest()["units"]
    summary = {
        **scores,
        "eval_seconds": time.perf_counter() - start,
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
