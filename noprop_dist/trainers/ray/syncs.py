"""The Ray coordinator's book of shared tensors and checkpoints (no Ray in it).

Units on different workers finish their epochs at different times. At a sync point
(:func:`~noprop_dist.training.common.sync_due`: learned W_embed or CT's schedule) each unit's
result waits here until every unit has reached that epoch; then the shared tensors are
synchronised (averaged, or W_embed moved by the owner's summed-gradient step) and every unit is
checkpointed with them. The synchronised tensors of each epoch are kept (``history``) so that a
unit restarted after a worker's death, or a resumed run, replays the sync it had the first
time: the weights do not depend on when a worker died.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from noprop_dist.config import Config
from noprop_dist.rundir import RunDir
from noprop_dist.training.common import checkpoint_due, embedding_owner, sync_due, synchronise
from noprop_dist.variants.base import SHARED_EMBEDDING, UnitSetup, shared_of


class SyncBook:
    def __init__(self, cfg: Config, run: RunDir, setup: UnitSetup):
        self.cfg, self.run, self.setup = cfg, run, setup
        self.history: dict[int, dict[str, torch.Tensor]] = {}   # epoch -> synchronised shared tensors
        self.owner = embedding_owner(run, setup)    # summed_gradient: the one W_embed optimizer
        # The owner's state after each sync this session (and after the last one before a
        # resume): a unit checkpoint written at sync epoch e carries owner_history[e].
        self.owner_history: dict[int, dict[str, torch.Tensor]] = {}
        units = run.manifest()["units"]
        if self.owner is not None and units:
            self.owner_history[max(e["epochs_done"] for e in units.values())] = self.owner.state_tensors()
        self.waiting: dict[str, dict[str, Any]] = {}     # unit -> its result held until the sync

    def _due(self, epoch: int) -> bool:
        return self.setup.syncs_shared and sync_due(self.cfg.train, epoch)

    def learn_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Checkpoints of shared tensors are written at sync points, with the synchronised
        copies: after a resume (or restart) they are the sync of their epoch."""
        if self.setup.syncs_shared:
            self.history.setdefault(int(state["epochs_done"]),
                                    {k: v.clone() for k, v in shared_of(state, self.setup).items()})

    def blocks(self, epochs_done: int, unit: str) -> bool:
        """Must this unit wait before its next epoch (a sync point not yet synchronised)?"""
        return unit in self.waiting or (epochs_done > 0 and self._due(epochs_done) and epochs_done not in self.history)

    def shared_for(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """The synchronised tensors a unit takes before training ``epoch``."""
        return self.history.get(epoch - 1)

    def wants_shared(self, epoch: int) -> bool:
        return self._due(epoch)

    def forget(self, unit: str) -> None:
        self.waiting.pop(unit, None)

    def take(self, unit: str, result: dict[str, Any], order: list[str], save: Callable[[str, dict], None]) -> None:
        """A unit's epoch result: checkpoint it now, or hold it until its sync point's last unit."""
        epoch = result["metrics"]["epoch"]
        state = result.get("state")
        if self._due(epoch) and epoch in self.history:
            # A replayed epoch whose sync already happened (a resume after a crash that left
            # units at different epochs): it takes the recorded sync, as it did the first time.
            if state is not None:
                state.update({k: v.clone() for k, v in self.history[epoch].items()})
                self.save(unit, state, save)
        elif self._due(epoch):
            self.waiting[unit] = result
            if len(self.waiting) == len(order):
                self._synchronise(epoch, order, save)
        elif state is not None:
            self.save(unit, state, save)

    def _synchronise(self, epoch: int, order: list[str], save: Callable[[str, dict], None]) -> None:
        """Every unit has finished the sync epoch: synchronise the shared tensors, then
        checkpoint all units with them (units in the trainers' fixed order)."""
        held = [self.waiting[name] for name in order]
        grads = [r["embedding_grads"] for r in held] if self.owner is not None else None
        shared = synchronise([r["shared"] for r in held], grads, self.owner, epoch)
        if self.owner is not None:
            self.owner_history[epoch] = self.owner.state_tensors()
        self.history[epoch] = shared
        self.run.append_metrics({"event": "embedding_sync", "epoch": epoch})
        for name, result in zip(order, held):
            if result.get("state") is not None:
                result["state"].update({k: v.clone() for k, v in shared.items()})
                self.save(name, result["state"], save)
        self.waiting.clear()

    def save(self, unit: str, state: dict[str, torch.Tensor], save: Callable[[str, dict], None]) -> None:
        """Checkpoint ``state`` if its epoch is a checkpoint point (else it was fetched for
        ``--eval.every`` only), with the owner's state of that epoch."""
        epoch = int(state["epochs_done"])
        if not checkpoint_due(self.cfg.train, epoch, self.setup.syncs_shared):
            return
        if epoch in self.owner_history:
            state.update({f"owner/{k}": v for k, v in self.owner_history[epoch].items()})
        save(unit, state)

    def final_embedding(self) -> torch.Tensor:
        if self.setup.learnable_embedding:
            return self.history[self.cfg.train.epochs][SHARED_EMBEDDING]
        return self.setup.embedding
