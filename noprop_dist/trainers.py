"""The registry of trainers: which backend trains which variant family, found by name.

The CLI looks a trainer up here instead of branching; a new trainer registers one line.
Targets are ``"module:function"`` strings imported only when used, so that looking a
trainer up imports neither Ray nor torch.distributed. Ray is imported only by the trainer
modules that need it (:mod:`~noprop_dist.coordinator`, :mod:`~noprop_dist.ddp`).

Every trainer function has the signature
``train(cfg, run_dir, resume=False, show_progress=True) -> summary dict``
and uses :mod:`noprop_dist.lifecycle` for data, run directory, checkpoint policy and the
final evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Trainer:
    backend: str
    family: str
    target: str
    doc: str

    def function(self) -> Callable:
        from .variants import load_target

        return load_target(self.target)


TRAINERS: tuple[Trainer, ...] = (
    Trainer("ray", "noprop", "noprop_dist.coordinator:train_ray",
            "Ray coordinator, one worker per block, no traffic between workers"),
    Trainer("local", "noprop", "noprop_dist.local:train_local",
            "every unit in this process, one after another"),
    Trainer("ddp", "backprop", "noprop_dist.ddp:train_ddp",
            "PyTorch DDP across Ray Train workers (TorchTrainer); gloo on CPU, nccl on GPU"),
    Trainer("local", "backprop", "noprop_dist.backprop:train_backprop_local",
            "one process, no process group (the N = 1 point of DDP)"),
)


def find_trainer(backend: str, variant: str) -> Trainer:
    """The trainer of ``variant`` on ``backend``, or a ConfigError naming the ones that exist."""
    from .variants import get_variant

    family = get_variant(variant).family
    for trainer in TRAINERS:
        if trainer.backend == backend and trainer.family == family:
            return trainer
    usable = ", ".join(t.backend for t in TRAINERS if t.family == family)
    raise ConfigError(f"variant {variant} cannot train with cluster.backend={backend}; "
                      f"use --cluster.backend= one of {usable}")
