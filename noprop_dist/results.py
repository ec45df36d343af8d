"""What both trainers do around training: describe the run in its manifest, checkpoint
units, rebuild the inference chain from a run directory, evaluate it, write the summary and
the plot, and export the chain as one self-contained file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .checkpoint import RunDir
from .config import Config
from .data import ArraySplit, Dataset, validate_split
from .errors import CheckpointError, ConfigError
from .inference import NoPropChain, RawImageChain, draw_noise, evaluate
from .units import HEAD, UnitRunner, UnitSetup, build_module, unit_name

EMBEDDING_FILE = "embedding"


def all_units(T: int) -> list[int]:
    """Unit ids of a DT run: blocks 1..T, then the head (0)."""
    return list(range(1, T + 1)) + [HEAD]


def manifest_fields(cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
    return {
        "variant": cfg.variant, "T": setup.T,
        "schedule": {**config_mod.to_dict(cfg)["schedule"], "alpha_bar": list(setup.alpha_bar)},
        "dataset": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "input_dtype": str(data.train.x.dtype),
        "embedding": cfg.model.embedding, "embedding_dim": int(setup.embedding.shape[1]),
        "block": cfg.model.block, "normalization": {"mean": list(data.mean), "std": list(data.std)},
    }


def save_unit(run: RunDir, runner: UnitRunner, finished: bool) -> int:
    """Checkpoint one unit; returns the bytes written."""
    return run.save_unit(runner.name, runner.state_tensors(), runner.epochs_done, finished)["bytes"]


def epoch_is(every: int, epoch: int, last: int) -> bool:
    return epoch % every == 0 or epoch == last


def load_run_config(run: RunDir) -> Config:
    text = run.config_text()
    try:
        import tomllib

        return config_mod.from_dict(tomllib.loads(text))
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{run.path / 'config.toml'} is not a valid config ({exc})") from None


def load_chain(run_dir: str | Path) -> tuple[NoPropChain, Config, dict[str, Any]]:
    """Rebuild the trained chain from a run directory (checksums verified, no code executed)."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    cfg = load_run_config(run)
    embedding = run.load_tensors(EMBEDDING_FILE)["embedding"]
    setup = UnitSetup(model=cfg.model, train=cfg.train, alpha_bar=tuple(manifest["schedule"]["alpha_bar"]),
                      num_classes=manifest["num_classes"], input_shape=tuple(manifest["input_shape"]),
                      mean=tuple(manifest["normalization"]["mean"]), std=tuple(manifest["normalization"]["std"]),
                      embedding=embedding)
    modules = {}
    for unit in all_units(setup.T):
        module = build_module(unit, setup)
        tensors = run.load_unit(unit_name(unit))
        state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{unit_name(unit)} in {run.path} does not fit its config ({first})") from None
        modules[unit] = module
    chain = NoPropChain([modules[t] for t in range(1, setup.T + 1)], modules[HEAD], embedding,
                        np.array(setup.alpha_bar), setup.mean, setup.std)
    return chain.eval(), cfg, manifest


def finish_run(run: RunDir, cfg: Config, data: Dataset, train_seconds: float,
               extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the finished run's chain on the test split; write summary.json and the plot.

    ``train_seconds`` is this session's training phase; the summary adds the phases of
    earlier sessions of the same run that reached this point (a crashed session's is lost).
    """
    train_seconds += run.manifest().get("train_seconds_done", 0.0)
    run.update_manifest(train_seconds_done=train_seconds)
    chain, _, manifest = load_chain(run.path)
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    start = time.perf_counter()
    scores = evaluate(chain, data.test, cfg.eval.batch_size, cfg.eval.seed, device)
    units = manifest["units"]
    summary = {
        "test_accuracy": scores["chain_accuracy_noise" if cfg.eval.noise else "chain_accuracy_no_noise"],
        **scores,
        "eval_noise": cfg.eval.noise, "eval_seconds": time.perf_counter() - start,
        "train_seconds": train_seconds, "variant": cfg.variant, "T": cfg.schedule.T,
        "dataset": data.name, "train_examples": len(data.train), "test_examples": len(data.test),
        "epochs": cfg.train.epochs, "embedding": cfg.model.embedding, "block": cfg.model.block,
        "unit_epochs_done": {name: entry["epochs_done"] for name, entry in units.items()},
        **extra,
    }
    run.write_summary(summary)
    run.append_metrics({"event": "evaluation", **scores})
    run.update_manifest(status="finished")
    from .plots import plot_run

    plot_run(run)
    return summary


def evaluate_run(run_dir: str | Path, split: ArraySplit | None = None) -> dict[str, Any]:
    """`noprop-dist eval`: evaluate a run's chain on its own test split or on ``split``."""
    chain, cfg, manifest = load_chain(run_dir)
    if split is None:
        from .data import load_dataset

        split = load_dataset(cfg.data).test
    if tuple(split.x.shape[1:]) != tuple(manifest["input_shape"]):
        raise CheckpointError(
            f"data of shape {tuple(split.x.shape[1:])} does not match the run's input shape "
            f"{tuple(manifest['input_shape'])}; pass data of the kind the run was trained on")
    # Labels the run cannot predict (e.g. CIFAR-100 data for a CIFAR-10 run) would only
    # lower the accuracy silently.
    validate_split(split, "the evaluation data", manifest["num_classes"])
    scores = evaluate(chain, split, cfg.eval.batch_size, cfg.eval.seed)
    key = "chain_accuracy_noise" if cfg.eval.noise else "chain_accuracy_no_noise"
    return {"test_accuracy": scores[key], "examples": len(split), **scores}


def export_chain(run_dir: str | Path, out_path: str | Path) -> Path:
    """Write the chain as one torch.export program: ``(images, noise) -> logits``.

    ``images`` raw (N, C, H, W) of the training data's dtype (uint8 0..255 for the builtin
    datasets, float32 for float user files; torch.export fixes the dtype), normalised inside; ``noise``
    (T+1, N, d) as made by :func:`~noprop_dist.inference.draw_noise`. Load it with
    ``torch.export.load(path).module()``; no noprop_dist code is needed.
    """
    chain, _, manifest = load_chain(run_dir)
    model = RawImageChain(chain).eval()
    shape = manifest["input_shape"]
    # Trace with the raw dtype: the uint8 -> /255 branch is decided at export time.
    dtype = torch.float32 if manifest.get("input_dtype") == "float32" else torch.uint8
    images = torch.zeros(4, *shape, dtype=dtype)
    noise = draw_noise(chain.T, 4, chain.embedding.shape[1], torch.Generator().manual_seed(0), True)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (images, noise), dynamic_shapes=({0: batch}, {1: batch}))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # torch.export.save wants a .pt2 suffix
    torch.export.save(program, tmp)
    tmp.replace(out)
    return out
