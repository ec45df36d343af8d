"""NoProp-DT's side of a run directory: its units, manifest fields, unit checkpoints, and
its predictor (the Eq. 3 chain rebuilt from the run directory, evaluated and exported).

The trainers (:mod:`~noprop_dist.local`, :mod:`~noprop_dist.coordinator`) write what this
module reads back; ``eval``/``export`` reach it through :mod:`noprop_dist.variants`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .checkpoint import RunDir, is_numbers
from .config import Config, EvalConfig
from .data import ArraySplit, Dataset
from .embedding_sync import EmbeddingOwner
from .errors import CheckpointError
from .inference import NoPropChain, RawImageChain, draw_noise, evaluate
from .units import HEAD, UnitRunner, UnitSetup, build_module, unit_name

EMBEDDING_FILE = "embedding"


def all_units(T: int) -> list[int]:
    """Unit ids of a DT run: blocks 1..T, then the head (0)."""
    return list(range(1, T + 1)) + [HEAD]


def manifest_fields(cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
    return {
        "T": setup.T,
        "schedule": {**config_mod.to_dict(cfg)["schedule"], "alpha_bar": list(setup.alpha_bar)},
        "dataset": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "input_dtype": str(data.train.x.dtype),
        "embedding": cfg.model.embedding, "embedding_dim": int(setup.embedding.shape[1]),
        "block": cfg.model.block, "normalization": {"mean": list(data.mean), "std": list(data.std)},
    }


MANIFEST_SCHEMA = {
    # What manifest_fields writes, checked on every read of the manifest (the vocabulary is
    # noprop_dist.checkpoint's; a check may read the keys above it).
    "T": "a positive integer",
    "schedule": {"alpha_bar": (lambda v, m: is_numbers(v, m["T"] + 1) and all(0 < a < 1 for a in v),
                               "T + 1 numbers in (0, 1)")},
    "dataset": "a string", "num_classes": "a positive integer", "input_shape": "3 positive integers (C, H, W)",
    "input_dtype": '"uint8" or "float32"', "embedding": "a string", "embedding_dim": "a positive integer",
    "block": "a string",
    "normalization": {"mean": "C numbers (C = input_shape[0])", "std": "C positive numbers (C = input_shape[0])"},
    "units": (lambda units, m: set(units) <= {unit_name(u) for u in all_units(m["T"])},
              "units named block_01..block_T and head"),
}


def embedding_owner(run: RunDir, setup: UnitSetup) -> EmbeddingOwner | None:
    """The trainer's :class:`EmbeddingOwner` of a ``summed_gradient`` run (None otherwise).

    Its state (W_embed and AdamW moments, ``owner/...``) travels in every unit checkpoint
    written at a sync point, so a resume restores it from the most advanced unit: the state
    after that unit's last sync, consistent with the sync history rebuilt from the units."""
    if not (setup.learnable_embedding and setup.train.embed_sync == "summed_gradient"):
        return None
    owner = EmbeddingOwner(setup.embedding, setup.train)
    units = run.manifest()["units"]
    if units:
        latest = max(units, key=lambda name: units[name]["epochs_done"])
        tensors = run.load_unit(latest)
        if any(k.startswith("owner/") for k in tensors):
            owner.load_state_tensors({k[len("owner/"):]: v for k, v in tensors.items() if k.startswith("owner/")})
    return owner


def save_unit(run: RunDir, runner: UnitRunner, finished: bool, owner: EmbeddingOwner | None = None) -> int:
    """Checkpoint one unit (with the embedding owner's state, if any); returns the bytes written."""
    tensors = runner.state_tensors()
    if owner is not None:
        tensors.update({f"owner/{k}": v for k, v in owner.state_tensors().items()})
    return run.save_unit(runner.name, tensors, runner.epochs_done, finished)["bytes"]


def load_chain(run_dir: str | Path) -> tuple[NoPropChain, Config, dict[str, Any]]:
    """Rebuild the trained chain from a run directory (checksums verified, no code executed)."""
    from .results import load_run_config

    run = RunDir(run_dir)
    manifest = run.manifest()
    cfg = load_run_config(run)
    embedding = run.load_tensors(EMBEDDING_FILE)["embedding"]
    setup = UnitSetup(model=cfg.model, train=cfg.train, alpha_bar=tuple(manifest["schedule"]["alpha_bar"]),
                      num_classes=manifest["num_classes"], input_shape=tuple(manifest["input_shape"]),
                      mean=tuple(manifest["normalization"]["mean"]), std=tuple(manifest["normalization"]["std"]),
                      embedding=embedding)
    states = {unit: run.load_unit(unit_name(unit)) for unit in all_units(setup.T)}
    return chain_from_states(setup, states, embedding, run.path), cfg, manifest


def chain_from_states(setup: UnitSetup, states: dict[int, dict[str, torch.Tensor]], embedding: torch.Tensor,
                      where: Path | str = "") -> NoPropChain:
    """The Eq. 3 chain of units whose ``model/...`` tensors are ``states`` (by unit id)."""
    modules = {unit: load_module_state(build_module(unit, setup), states[unit], unit_name(unit), Path(where))
               for unit in all_units(setup.T)}
    chain = NoPropChain([modules[t] for t in range(1, setup.T + 1)], modules[HEAD], embedding,
                        np.array(setup.alpha_bar), setup.mean, setup.std)
    return chain.eval()


def evaluate_during_training(run: RunDir, setup: UnitSetup, states: dict[int, dict[str, torch.Tensor]],
                             embedding: torch.Tensor, test: ArraySplit, eval_cfg: EvalConfig, epoch: int,
                             device: torch.device | str = "cpu") -> dict[str, Any]:
    """``--eval.every``: score the chain of the units' weights after ``epoch`` on the test split
    and record it (an ``eval`` event in metrics.jsonl, with what it cost)."""
    start = time.perf_counter()
    scores = evaluate(chain_from_states(setup, states, embedding, run.path), test, eval_cfg.batch_size,
                      eval_cfg.seed, device)
    record = {"event": "eval", "epoch": epoch, "chain_accuracy_noise": scores["chain_accuracy_noise"],
              "chain_accuracy_no_noise": scores["chain_accuracy_no_noise"],
              "best_block_alone": max(scores["block_alone_accuracy"].values()),
              "block_alone_accuracy": scores["block_alone_accuracy"],
              "block_in_chain_accuracy": scores["block_in_chain_accuracy"],
              "eval_seconds": time.perf_counter() - start}
    run.append_metrics(record)
    return record


def eval_due(eval_cfg: EvalConfig, epoch: int, last: int) -> bool:
    """Is ``epoch`` an ``--eval.every`` point (never the last epoch: the final evaluation covers it)?"""
    return eval_cfg.every > 0 and epoch % eval_cfg.every == 0 and epoch != last


def load_module_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str,
                      where: Path) -> torch.nn.Module:
    """Load the ``model/...`` tensors of a unit checkpoint into ``module`` (one-line error on mismatch)."""
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{name} in {where} does not fit its config ({first})") from None
    return module


class ChainPredictor:
    """A finished DT run as a predictor: evaluate the Eq. 3 chain, export it."""

    def __init__(self, run: RunDir):
        self.chain, self.cfg, self.manifest = load_chain(run.path)

    def evaluate(self, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str = "cpu",
                 max_batch: int | None = None) -> dict:
        scores = evaluate(self.chain, split, eval_cfg.batch_size, eval_cfg.seed, device, max_batch)
        key = "chain_accuracy_noise" if eval_cfg.noise else "chain_accuracy_no_noise"
        return {"test_accuracy": scores[key], **scores, "eval_noise": eval_cfg.noise}

    def export_program(self):
        """A torch.export program ``(images, noise) -> logits``.

        ``images`` raw (N, C, H, W) of the training data's dtype (uint8 0..255 for the builtin
        datasets, float32 for float user files; torch.export fixes the dtype), normalised
        inside; ``noise`` (T+1, N, d) as made by :func:`~noprop_dist.inference.draw_noise`.
        """
        model = RawImageChain(self.chain).eval()
        images = example_images(self.manifest)
        noise = draw_noise(self.chain.T, 4, self.chain.embedding.shape[1], torch.Generator().manual_seed(0), True)
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(model, (images, noise), dynamic_shapes=({0: batch}, {1: batch}))


def example_images(manifest: dict[str, Any]) -> torch.Tensor:
    """Four zero images of the run's raw dtype: the uint8 -> /255 branch is decided at export time."""
    dtype = torch.float32 if manifest.get("input_dtype") == "float32" else torch.uint8
    return torch.zeros(4, *manifest["input_shape"], dtype=dtype)
