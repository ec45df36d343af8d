"""Reading a finished run back, whatever its variant: its config, ``eval`` and ``export``.

The variant's predictor (:mod:`noprop_dist.variants.registry`) does the variant-specific part: a
NoProp chain needs inference noise, a back-propagation baseline does not.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from noprop_dist.data import ArraySplit, load_dataset, validate_split
from noprop_dist.errors import CheckpointError, ConfigError
from noprop_dist.rundir import RunDir, atomic_write
from noprop_dist.training.preflight import device_memory_budget, evaluation_batch
from noprop_dist.variants.registry import get_variant


def load_predictor(run_dir: str | Path):
    """The finished run's predictor (checksums verified, no code executed)."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    try:
        variant = get_variant(manifest.get("variant", "dt"))
    except ConfigError as exc:
        raise CheckpointError(f"{run.path}: {exc}; use the noprop_dist release that wrote it") from None
    return variant.load(run)


def evaluate_run(run_dir: str | Path, split: ArraySplit | None = None) -> dict[str, Any]:
    """`noprop-dist eval`: evaluate a run on its own test split or on ``split`` (refused in one
    line where not even a forward pass of one example fits this machine's free memory)."""
    predictor = load_predictor(run_dir)
    manifest, cfg = predictor.manifest, predictor.cfg
    if split is None:

        split = load_dataset(cfg.data).test
    if tuple(split.x.shape[1:]) != tuple(manifest["input_shape"]):
        raise CheckpointError(
            f"data of shape {tuple(split.x.shape[1:])} does not match the run's input shape "
            f"{tuple(manifest['input_shape'])}; pass data of the kind the run was trained on")
    # Labels the run cannot predict (e.g. CIFAR-100 data for a CIFAR-10 run) would only
    # lower the accuracy silently.
    validate_split(split, "the evaluation data", manifest["num_classes"])
    # On the CPU, in forward passes that fit its free memory, as a run's final evaluation; the
    # scores do not depend on the pass size.
    setup = predictor.setup
    max_batch = evaluation_batch(setup.objective.step_probe(setup, 0), cfg.eval.batch_size,
                                 device_memory_budget(torch.device("cpu")), "this machine")
    scores = predictor.evaluate(split, cfg.eval, device="cpu", max_batch=max_batch)
    return {"examples": len(split), **scores, "eval_batch_size": cfg.eval.batch_size, "eval_forward_batch": max_batch}


def check_export_target(run_dir: str | Path, out_path: str | Path, force: bool = False) -> Path:
    """Refuse, before any work, a target that would damage something: one of the run
    directory's own files (always), an existing file (unless ``force``), a directory, a
    path under a file, or a place that cannot be written."""
    run, out = Path(run_dir).resolve(), Path(out_path)
    target = out.resolve()
    if target.is_relative_to(run) and target != run and (
            target.parent == run and target.name in RUN_FILES or target.is_relative_to(run / "units")):
        raise CheckpointError(f"{out} is one of the run directory's own files; export to another path")
    if target.is_dir():
        raise CheckpointError(f"{out} is a directory; give a file name such as {out / 'model.pt2'}")
    if target.exists() and not target.is_file():
        raise CheckpointError(f"{out} exists and is not a regular file (a device, pipe or socket); export to a "
                              "file path (--force replaces files only)")
    if target.exists() and not force:
        raise CheckpointError(f"{out} exists; choose another path or pass --force to replace it")
    existing = next(p for p in target.parents if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"cannot write {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: {existing} is not writable")
    return out


RUN_FILES = ("config.toml", "manifest.json", "metrics.jsonl", "summary.json", "training.png",
             "embedding.safetensors", ".lock")


def export_run(run_dir: str | Path, out_path: str | Path, force: bool = False) -> Path:
    """Write the run's predictor as one torch.export program (see the variant's
    ``export_program`` for its inputs). Load it with ``torch.export.load(path).module()``;
    no noprop_dist code is needed. The file appears whole or not at all."""
    out = check_export_target(run_dir, out_path, force)
    program = load_predictor(run_dir).export_program()
    # Serialised in memory, then written like a checkpoint: torch's own file writer aborts the
    # process (C++ terminate) when the disk fills, where this raises WriteFailed naming ``out``.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(out, buffer.getvalue())
    return out
