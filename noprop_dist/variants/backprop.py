"""The back-propagation baselines as variants whose one unit is the whole network.

* ``backprop``: the paper's structure-matched baseline (Eqs. 17-19, :class:`BackpropChain`):
  the T Figure-6 blocks chained end to end, cross-entropy through all of them.
* ``backprop_cnn``: a plain single-tower CNN (:class:`SingleTowerCNN`).

The unit (``network``) is trained by the same loop as every NoProp unit
(:class:`~noprop_dist.training.runner.UnitRunner`): seeded init, shuffle, dropout stream and
checkpoints as there. Its epoch noise is the ``z_0 ~ N(0, I)`` of every training example (the
structure-matched chain starts from it; the CNN ignores it), drawn for the whole epoch from the
run seed, so the rows are the same whatever the number of workers.

Data parallelism (DDP, global or per-rank BatchNorm) is applied to the unit from outside the
loop by :mod:`noprop_dist.training.data_parallel`; the trainers that do it are
:mod:`noprop_dist.trainers.ddp` (Ray Train) and :mod:`noprop_dist.trainers.torchrun`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noprop_dist.config import MAX_T, Config, EvalConfig
from noprop_dist.core import schedule
from noprop_dist.data import ArraySplit, Dataset, normalize
from noprop_dist.nets.blocks import BLOCK_SIZES, BackpropChain, SingleTowerCNN
from noprop_dist.rundir import RunDir, load_run_config
from noprop_dist.variants.base import (
    COMMON_SCHEMA, NOISE, StepProbe, UnitObjective, UnitSetup, UnitSpec, common_manifest_fields, derive_seed,
    example_images, load_module_state, seeded_module
)

NETWORK = "network"
"""The one unit of a back-propagation run (its checkpoint is units/network.safetensors)."""
NETWORK_SEED_UNIT = 1_000_000
"""Unit id of the network in derive_seed (far from any block index)."""
NETWORK_UNIT = UnitSpec(name=NETWORK, seed_id=NETWORK_SEED_UNIT, role="network")


def build_network(setup: UnitSetup) -> nn.Module:
    """The baseline network, unseeded (:meth:`BackpropObjective.build_module` seeds it)."""
    size = BLOCK_SIZES[setup.model.block]
    if setup.variant == "backprop_cnn":
        return SingleTowerCNN(setup.input_shape, setup.num_classes, size, setup.model.dropout)
    return BackpropChain(setup.input_shape, setup.embedding, setup.num_classes, size, setup.T,
                         setup.model.dropout, learn_embedding=setup.model.embedding != "one_hot")


class BackpropObjective(UnitObjective):
    """Cross-entropy of the whole network on ``(x, z_0)``; one unit, no shared tensors."""

    name = "backprop"
    shares_embedding = False     # the network holds its own W_embed (learned with it, or fixed)

    def units(self, setup: UnitSetup) -> list[UnitSpec]:
        return [NETWORK_UNIT]

    def build_module(self, unit: UnitSpec, setup: UnitSetup) -> nn.Module:
        return seeded_module(unit, setup, lambda: build_network(setup))

    def epoch_noise(self, unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
        """(n, d): row i is training example i's z_0."""
        return schedule.marginal_noise(n, setup.embedding.shape[1], derive_seed(setup.train.seed, unit.seed_id, epoch, NOISE))

    def batch_loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(runner.module(x, rows), y)

    def step_probe(self, setup: UnitSetup, n_train: int) -> StepProbe:
        """The dry run of one training step of the whole network (:mod:`~noprop_dist.training.preflight`)."""
        d = setup.embedding.shape[1]

        def forward(net: nn.Module, batch: int) -> torch.Tensor:
            x = torch.zeros(batch, *setup.input_shape)                                # (B, C, H, W)
            return F.cross_entropy(net(x, torch.zeros(batch, d)), torch.zeros(batch, dtype=torch.long))

        return StepProbe(name=f"the {setup.variant} network ({setup.model.block} blocks)",
                         build=lambda: build_network(setup), forward=forward, fixed_bytes=n_train * d * 4)

    # ---- the run directory's side ---------------------------------------------------
    def manifest_fields(self, cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
        net = build_network(setup)
        return {"T": setup.T if setup.variant == "backprop" else 0, **common_manifest_fields(cfg, data, setup),
                "parameters": sum(p.numel() for p in net.parameters())}

    def chain(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]], embedding: torch.Tensor,
              where: Any = "") -> "TrainedNetwork":
        """The network of ``states[NETWORK]`` (``--eval.every`` scores it as a finished run is scored)."""
        net = load_module_state(build_network(setup), states[NETWORK], NETWORK, where).eval()
        return TrainedNetwork(net, int(setup.embedding.shape[1]), setup.mean, setup.std)

    def progress_scores(self, chain: "TrainedNetwork", test: ArraySplit, eval_cfg: EvalConfig,
                        device: torch.device | str) -> dict[str, Any]:
        return {"test_accuracy": chain.accuracy(test, eval_cfg, device)}


MANIFEST_SCHEMA = {
    # What manifest_fields writes, checked on every read of the manifest (the vocabulary is
    # noprop_dist.rundir's; a check may read the keys above it).
    "T": f"an integer in 0..{MAX_T}",
    **COMMON_SCHEMA,
    "parameters": "a positive integer",
    "units": (lambda units, m: set(units) <= {NETWORK}, f"only the unit {NETWORK!r}"),
}


# ---------------------------------------------------------------------------------------
# Reading a finished run back.
# ---------------------------------------------------------------------------------------
@dataclass
class TrainedNetwork:
    """A baseline network with what it needs to be scored: the dimension of its ``z_0`` and
    the training split's normalisation."""

    net: nn.Module
    embedding_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @torch.no_grad()
    def accuracy(self, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str = "cpu",
                 max_batch: int | None = None) -> float:
        """Test accuracy; z_0 is drawn per ``eval.batch_size`` examples and each batch runs in
        forward passes of at most ``max_batch`` (the draws do not depend on it)."""
        net = self.net.to(device).eval()
        gen = torch.Generator().manual_seed(eval_cfg.seed)
        batch = eval_cfg.batch_size
        step = min(batch, max_batch or batch)
        correct = 0
        for start in range(0, len(split), batch):
            z_0 = torch.randn(min(batch, len(split) - start), self.embedding_dim, generator=gen)   # (B, d)
            for lo in range(0, len(z_0), step):
                sel = slice(start + lo, start + min(len(z_0), lo + step))
                x = normalize(np.asarray(split.x[sel]), self.mean, self.std).to(device)
                y = torch.from_numpy(np.array(split.y[sel])).to(device)
                correct += int((net(x, z_0[lo:lo + step].to(device)).argmax(-1) == y).sum())
        return correct / max(len(split), 1)


class RawImageClassifier(nn.Module):
    """The exported predictor: raw images (uint8 0..255 or float) in, class logits out."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return self.net((x - self.mean) / self.std, z_0)


class NetworkPredictor:
    """A finished back-propagation run as a predictor (see :mod:`noprop_dist.variants.registry`)."""

    def __init__(self, run: RunDir):
        self.manifest = m = run.manifest()
        self.cfg = load_run_config(run)
        alpha_bar = tuple(float(a) for a in schedule.alpha_bar_from_config(self.cfg.schedule))   # its T
        self.setup = setup = UnitSetup(
            model=self.cfg.model, train=self.cfg.train, alpha_bar=alpha_bar, num_classes=m["num_classes"],
            input_shape=tuple(m["input_shape"]), mean=tuple(m["normalization"]["mean"]),
            std=tuple(m["normalization"]["std"]), embedding=torch.zeros(m["num_classes"], m["embedding_dim"]),
            variant=self.cfg.variant)
        net = load_module_state(build_network(setup), run.load_unit(NETWORK), NETWORK, run.path).eval()
        self.network = TrainedNetwork(net, m["embedding_dim"], setup.mean, setup.std)

    def evaluate(self, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str = "cpu",
                 max_batch: int | None = None) -> dict:
        return {"test_accuracy": self.network.accuracy(split, eval_cfg, device, max_batch)}

    def export_program(self):
        """A torch.export program ``(images, z_0) -> logits``; images raw (N, C, H, W) of the
        training data's dtype, normalised inside; ``z_0`` (N, d) standard normal noise
        (the structure-matched chain starts from it; the CNN ignores it)."""
        net = self.network
        model = RawImageClassifier(net.net.cpu().eval(), net.mean, net.std).eval()
        batch = torch.export.Dim("batch", min=1)
        z_0 = torch.randn(4, net.embedding_dim, generator=torch.Generator().manual_seed(0))
        return torch.export.export(model, (example_images(self.manifest), z_0),
                                   dynamic_shapes=({0: batch}, {0: batch}))
