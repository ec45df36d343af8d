"""The registry of variants: what a run trains, and how its finished run is read back.

``Config.variant`` names an entry. Each entry says which family it belongs to (the
trainers of :mod:`noprop_dist.trainers.registry` are registered per family; ``backends`` narrows them
for one variant, with the reason the config error gives) and how to rebuild a
predictor from a finished run directory; a predictor has ``evaluate(split, eval_cfg,
device)`` returning at least ``test_accuracy`` and ``export_program()``. It also names the
schema of its manifest fields (see :mod:`noprop_dist.run.rundir`), checked on every read.

Variants:

* ``dt``: NoProp-DT, T blocks each trained alone on closed-form noisy targets (the paper's
  Eq. 8), chained only at inference (Eq. 3).
* ``ct``: NoProp-CT, one time-conditioned network with a learned noise schedule (Eq. 9),
  integrated from t = 0 to 1 at inference; distributed by time interval
  (``continuous.intervals``: K networks, one per interval and worker, ``cluster.backend=ray``)
  or data-parallel (``cluster.backend=ddp``: each interval network trained with DDP across
  the workers in turn), or both (K > 1 with ddp).
* ``fm``: NoProp-FM, a time-conditioned velocity field trained by flow matching
  (Eqs. 10-13), Euler-integrated at inference; distributed as CT.

A NoProp variant also names its *objective*, the :class:`~noprop_dist.variants.base.UnitObjective`
that the unit loop calls (its units, modules, targets, losses, shared tensors and chain).
* ``backprop``: the paper's structure-matched baseline (Eqs. 17-19): the same T blocks
  chained end to end, ``z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t(z_{t-1}, x)`` with
  ``alpha_t = tanh(w_t)`` learnable, cross-entropy through all blocks.
* ``backprop_cnn``: a plain single-tower CNN (the Figure-6 image path + a linear head),
  what a user with one machine would otherwise train.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from noprop_dist.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    name: str
    family: str        # "noprop" or "backprop": selects the trainers that can run it
    doc: str
    predictor: str     # "module:Class", built from a RunDir
    manifest_schema: str   # "module:NAME" of the schema of the fields its trainers add to the manifest
    objective_class: str = ""   # NoProp variants: "module:Class" of its UnitObjective
    backends: tuple[str, ...] = ()
    """The cluster.backend values it may use among its family's trainers (empty: all of them)."""
    backend_note: str = ""
    """Why the others are refused and what to use instead (the config error's text)."""

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


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dt", "noprop", "NoProp-DT: T blocks, each trained alone (Eq. 8), chained at inference (Eq. 3)",
            "noprop_dist.variants.dt:ChainPredictor", "noprop_dist.variants.dt:MANIFEST_SCHEMA", "noprop_dist.variants.dt:DTObjective",
            backends=("ray", "local"),
            backend_note="NoProp-DT is distributed by block, not data-parallel (its BatchNorm blocks are not "
                         "DDP-ready); use --cluster.backend=ray (or local)"),
    Variant("ct", "noprop", "NoProp-CT: time-conditioned network, learned schedule (Eq. 9), integrated at inference",
            "noprop_dist.variants.continuous:ContinuousPredictor", "noprop_dist.variants.continuous:CT_MANIFEST_SCHEMA",
            "noprop_dist.variants.continuous:CTObjective"),
    Variant("fm", "noprop", "NoProp-FM: flow-matching velocity field (Eqs. 10-13), Euler-integrated at inference",
            "noprop_dist.variants.continuous:ContinuousPredictor", "noprop_dist.variants.continuous:FM_MANIFEST_SCHEMA",
            "noprop_dist.variants.continuous:FMObjective"),
    Variant("backprop", "backprop", "structure-matched back-propagation baseline (Eqs. 17-19)",
            "noprop_dist.variants.backprop:NetworkPredictor", "noprop_dist.variants.backprop:MANIFEST_SCHEMA"),
    Variant("backprop_cnn", "backprop", "single-tower CNN (Figure-6 image path + linear head), back-propagation",
            "noprop_dist.variants.backprop:NetworkPredictor", "noprop_dist.variants.backprop:MANIFEST_SCHEMA"),
)}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"variant={name!r} is not one of {', '.join(VARIANTS)}") from None
