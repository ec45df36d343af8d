"""The one registry: what each variant is, which backends train it, and how its finished run is
read back. ``Config.variant`` names a :class:`Variant`, ``cluster.backend`` a :class:`Trainer`.

Targets are ``"module:name"`` strings imported only when used, so that looking an entry up
imports neither torch.distributed nor Ray (the CLI and the config check do it before any work).

Variants (each names its :class:`~noprop_dist.variants.base.UnitObjective`, the part the unit
loop calls, and its predictor, built from a run directory, with ``evaluate(split, eval_cfg,
device)`` returning at least ``test_accuracy`` and ``export_program()``; and the schema of its
manifest fields, checked on every read):

* ``dt``: NoProp-DT, T blocks each trained alone on closed-form noisy targets (Eq. 8), chained
  only at inference (Eq. 3); distributed by block.
* ``ct``: NoProp-CT, a time-conditioned network with a learned schedule (Eq. 9); distributed by
  time interval (``continuous.intervals`` networks on as many workers), data-parallel, or both.
* ``fm``: NoProp-FM, a flow-matching velocity field (Eqs. 10-13); distributed as CT.
* ``backprop``: the paper's structure-matched baseline (Eqs. 17-19): the T blocks chained end to
  end, cross-entropy through all of them; one unit (the network), data-parallel.
* ``backprop_cnn``: a plain single-tower CNN (Figure-6 image path + linear head), as backprop.

Trainers (``cluster.backend``), each a ``train(cfg, run_dir, resume, show_progress)`` entry that
goes through :func:`noprop_dist.run.lifecycle.train_run`:

* ``local``: every unit in this process, one after another (:mod:`~noprop_dist.trainers.local`).
* ``ray``: a coordinator and Ray workers, one per unit where the cluster has room; units never
  talk to each other (:mod:`~noprop_dist.trainers.ray.coordinator`).
* ``ddp``: N Ray Train workers, each a rank that holds every unit and trains image-reading units
  on its share of every global batch (:mod:`~noprop_dist.trainers.ddp`). ``torchrun`` runs the
  same ranks without Ray (:mod:`~noprop_dist.trainers.torchrun`, a launcher, not a backend).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from noprop_dist.errors import ConfigError


@dataclass(frozen=True)
class Trainer:
    backend: str
    target: str        # "module:function" of its train(cfg, run_dir, resume, show_progress) entry
    doc: str
    gpus: str = "noprop_dist.variants.base:local_gpus"
    """"module:function" of ``(cluster config) -> (GPUs its training can use, where)``: the
    input of the missing-GPU check (this machine's, or the connected Ray cluster's)."""

    def function(self) -> Callable:
        return load_target(self.target)


_CLUSTER_GPUS = "noprop_dist.trainers.ray.cluster:cluster_gpus"
TRAINERS: dict[str, Trainer] = {t.backend: t for t in (
    Trainer("local", "noprop_dist.trainers.local:train_local", "every unit in this process, one after another"),
    Trainer("ray", "noprop_dist.trainers.ray.coordinator:train_ray",
            "Ray coordinator, one worker per unit, no traffic between workers", _CLUSTER_GPUS),
    Trainer("ddp", "noprop_dist.trainers.ddp:train_ddp",
            "data-parallel ranks on Ray Train workers (DDP; gloo on CPU, nccl on GPU)", _CLUSTER_GPUS),
)}


@dataclass(frozen=True)
class Variant:
    name: str
    doc: str
    objective_class: str   # "module:Class" of its UnitObjective
    predictor: str         # "module:Class", built from a RunDir
    manifest_schema: str   # "module:NAME" of the schema of its manifest fields
    backends: tuple[str, ...]
    """The cluster.backend values that train it."""
    backend_note: str = ""
    """Why the other backends are refused and what to use instead (the config error's text)."""

    def load(self, run):
        return load_target(self.predictor)(run)

    def objective(self):
        """The variant's :class:`~noprop_dist.variants.base.UnitObjective` (one shared instance)."""
        if self.objective_class not in _OBJECTIVES:
            _OBJECTIVES[self.objective_class] = load_target(self.objective_class)()
        return _OBJECTIVES[self.objective_class]


_OBJECTIVES: dict[str, object] = {}


def load_target(target: str):
    """The object named by ``"package.module:name"``, imported only now (registries stay light)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_CONTINUOUS = "noprop_dist.variants.continuous"
_BASELINE = ("noprop_dist.variants.backprop:BackpropObjective", "noprop_dist.variants.backprop:NetworkPredictor",
             "noprop_dist.variants.backprop:MANIFEST_SCHEMA", ("ddp", "local"),
             "a baseline is one network: it is distributed data-parallel; use --cluster.backend=ddp (or local)")

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dt", "NoProp-DT: T blocks, each trained alone (Eq. 8), chained at inference (Eq. 3)",
            "noprop_dist.variants.dt:DTObjective", "noprop_dist.variants.dt:ChainPredictor",
            "noprop_dist.variants.dt:MANIFEST_SCHEMA", ("ray", "local"),
            "NoProp-DT is distributed by block, not data-parallel (replicated blocks with global BatchNorm "
            "are not built yet); use --cluster.backend=ray (or local)"),
    Variant("ct", "NoProp-CT: time-conditioned network, learned schedule (Eq. 9), integrated at inference",
            f"{_CONTINUOUS}:CTObjective", f"{_CONTINUOUS}:ContinuousPredictor", f"{_CONTINUOUS}:CT_MANIFEST_SCHEMA",
            ("ray", "local", "ddp")),
    Variant("fm", "NoProp-FM: flow-matching velocity field (Eqs. 10-13), Euler-integrated at inference",
            f"{_CONTINUOUS}:FMObjective", f"{_CONTINUOUS}:ContinuousPredictor", f"{_CONTINUOUS}:FM_MANIFEST_SCHEMA",
            ("ray", "local", "ddp")),
    Variant("backprop", "structure-matched back-propagation baseline (Eqs. 17-19)", *_BASELINE),
    Variant("backprop_cnn", "single-tower CNN (Figure-6 image path + linear head), back-propagation", *_BASELINE),
)}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"variant={name!r} is not one of {', '.join(VARIANTS)}") from None


def find_trainer(backend: str, variant: str) -> Trainer:
    """The trainer of ``variant`` on ``backend``, or a ConfigError naming the ones that train it."""
    entry = get_variant(variant)
    if backend in entry.backends and backend in TRAINERS:
        return TRAINERS[backend]
    if entry.backend_note and backend in TRAINERS:
        raise ConfigError(f"variant {variant} cannot train with cluster.backend={backend}: {entry.backend_note}")
    raise ConfigError(f"variant {variant} cannot train with cluster.backend={backend}; "
                      f"use --cluster.backend= one of {', '.join(entry.backends)}")
