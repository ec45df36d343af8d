"""What the NoProp trainers (in-process :mod:`~noprop_dist.trainers.local`, Ray
:mod:`~noprop_dist.trainers.ray.coordinator`) share around the unit loop, for every variant: the unit
checkpoints, the synchronisation of shared tensors, ``--eval.every``, and rebuilding a
run's units from its directory for the variant's predictor.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from noprop_dist.config import EvalConfig, TrainConfig
from noprop_dist.data import ArraySplit
from noprop_dist.rundir import RunDir
from noprop_dist.training.embedding_sync import EmbeddingOwner
from noprop_dist.training.runner import UnitRunner
from noprop_dist.variants.base import SHARED_EMBEDDING, UnitSetup, average_shared, shared_of


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


def synchronise(copies: list[dict[str, torch.Tensor]], grads: list[torch.Tensor] | None,
                owner: EmbeddingOwner | None, epoch: int) -> dict[str, torch.Tensor]:
    """The shared tensors after the sync point at ``epoch``, from the units' copies (units in
    the trainers' fixed order): every key averaged, except W_embed under ``summed_gradient``,
    which the owner moves by the units' summed gradients (``grads``, one per unit)."""
    shared = average_shared(copies)
    if owner is not None:
        shared[SHARED_EMBEDDING] = owner.apply(grads, epoch)
    return shared


def save_unit(run: RunDir, runner: UnitRunner, finished: bool, owner: EmbeddingOwner | None = None) -> int:
    """Checkpoint one unit (with the embedding owner's state, if any); returns the bytes written."""
    tensors = runner.state_tensors()
    if owner is not None:
        tensors.update({f"owner/{k}": v for k, v in owner.state_tensors().items()})
    return run.save_unit(runner.name, tensors, runner.epochs_done, finished)["bytes"]


def eval_due(eval_cfg: EvalConfig, epoch: int, last: int) -> bool:
    """Is ``epoch`` an ``--eval.every`` point (never the last epoch: the final evaluation covers it)?"""
    return eval_cfg.every > 0 and epoch % eval_cfg.every == 0 and epoch != last


def evaluate_during_training(run: RunDir, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]],
                             test: ArraySplit, eval_cfg: EvalConfig, epoch: int,
                             device: torch.device | str = "cpu") -> dict[str, Any]:
    """``--eval.every``: score the predictor of the units' states after ``epoch`` (by unit
    name; the shared tensors are averaged over the units, as at a sync) on the test split, and
    record it (an ``eval`` event in metrics.jsonl, with what it cost)."""
    start = time.perf_counter()
    objective = setup.objective
    order = [u.name for u in objective.units(setup)]
    shared = average_shared([shared_of(states[name], setup) for name in order])
    embedding = shared.get(SHARED_EMBEDDING, setup.embedding)
    states = {name: {**states[name], **{k: v for k, v in shared.items() if k != SHARED_EMBEDDING}}
              for name in order}
    chain = objective.chain(setup, states, embedding, run.path)
    record = {"event": "eval", "epoch": epoch, **objective.progress_scores(chain, test, eval_cfg, device),
              "eval_seconds": time.perf_counter() - start}
    run.append_metrics(record)
    return record
