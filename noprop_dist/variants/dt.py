"""NoProp-DT: its units (T blocks and the output head), each unit's module, targets and loss
(the paper's Eq. 8), and its predictor (the Eq. 3 chain rebuilt from a run directory).

The unit loop (:mod:`noprop_dist.training.runner`) calls :class:`DTObjective`; the trainers
(:mod:`~noprop_dist.trainers.local`, :mod:`~noprop_dist.trainers.ray.coordinator`) and ``eval``/``export`` reach
this module through the variant registry (:mod:`noprop_dist.variants.registry`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noprop_dist import config as config_mod
from noprop_dist.config import MAX_T, Config, EvalConfig
from noprop_dist.core import schedule
from noprop_dist.data import ArraySplit, Dataset
from noprop_dist.nets.blocks import BLOCK_SIZES, DTBlock, OutputHead, denoised_embedding
from noprop_dist.nets.chain import NoPropChain, RawImageChain, draw_noise, evaluate
from noprop_dist.rundir import RunDir, is_schedule
from noprop_dist.variants.base import (
    COMMON_SCHEMA, HEAD, NOISE, StepProbe, UnitObjective, UnitSetup, UnitSpec, common_manifest_fields, derive_seed,
    example_images, head_noise, load_module_state, load_run_units, seeded_module
)


def block(t: int) -> UnitSpec:
    """Block t (t = 1..T): u_hat_t(z_{t-1}, x), trained on z_{t-1} ~ q(z_{t-1} | y)."""
    return UnitSpec(name=f"block_{t:02d}", seed_id=t, role="block", index=t)


def unit_names(T: int) -> list[str]:
    return [block(t).name for t in range(1, T + 1)] + [HEAD.name]


@functools.lru_cache(maxsize=64)
def block_loss_weight(alpha_bar: tuple[float, ...], eta: float, t: int) -> float:
    """Block t's weight (T/2) eta (SNR(t) - SNR(t-1)) of Eq. 8 (positive, asserted)."""
    weight = float(schedule.dt_loss_weights(np.array(alpha_bar), eta)[t])
    assert weight > 0, f"block {t}: non-positive loss weight {weight} (schedule reversed?)"
    return weight


def dt_block_loss(logits: torch.Tensor, embedding: torch.Tensor, u_y: torch.Tensor, weight: float) -> torch.Tensor:
    """Block t's term of Eq. 8: ``weight * ||u_hat_t - u_y||^2`` averaged over the batch, with
    ``u_hat_t = softmax(logits) @ W_embed`` and ``weight = (T/2) eta (SNR(t) - SNR(t-1))``."""
    u_hat = denoised_embedding(logits.float(), embedding)                        # (B, d)
    return weight * ((u_hat - u_y) ** 2).sum(-1).mean()


def dt_head_loss(logits: torch.Tensor, y: torch.Tensor, u_y: torch.Tensor, ab_0: float,
                 learnable_embedding: bool) -> torch.Tensor:
    """The head's terms of Eq. 8: cross-entropy of p_out(y | z_T), plus KL(q(z_0|y) || N(0, I))
    when the embedding is learned (with a fixed one it is a constant)."""
    loss = F.cross_entropy(logits, y)
    if learnable_embedding:
        loss = loss + schedule.kl_prior(u_y, ab_0).mean()
    return loss


class DTObjective(UnitObjective):
    name = "dt"

    def units(self, setup: UnitSetup) -> list[UnitSpec]:
        return [block(t) for t in range(1, setup.T + 1)] + [HEAD]

    def build_module(self, unit: UnitSpec, setup: UnitSetup) -> nn.Module:
        d = setup.embedding.shape[1]
        if unit.role == "head":
            return seeded_module(unit, setup, lambda: OutputHead(d, setup.num_classes))
        return seeded_module(unit, setup, lambda: DTBlock(setup.input_shape, d, setup.num_classes,
                                                          BLOCK_SIZES[setup.model.block], setup.model.dropout))

    def epoch_noise(self, unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
        """Blocks: (n, d), row i is the noise of training example i's z_{t-1}.
        Head: (head_passes, n, d), the noise of z_T for each pass over the labels."""
        if unit.role == "head":
            return head_noise(unit, setup, epoch, n)
        seed = derive_seed(setup.train.seed, unit.seed_id, epoch, NOISE)
        return schedule.marginal_noise(n, setup.embedding.shape[1], seed)

    def batch_loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        setup, unit = runner.setup, runner.unit
        u_y = runner.embedding[y]                                                # (B, d)
        if unit.role == "head":
            z_T = schedule.sample_marginal(u_y, setup.alpha_bar[-1], rows)       # (B, d)
            return dt_head_loss(runner.module(z_T), y, u_y, setup.alpha_bar[0], setup.learnable_embedding)
        z_prev = schedule.sample_marginal(u_y, setup.alpha_bar[unit.index - 1], rows)   # (B, d)
        logits = runner.module(z_prev, x)                                        # (B, m)
        weight = block_loss_weight(setup.alpha_bar, setup.train.eta, unit.index)
        return dt_block_loss(logits, runner.embedding, u_y, weight)

    def step_probe(self, setup: UnitSetup, n_train: int) -> StepProbe:
        """Every block has the same shapes. Per-epoch tensors: the target noise, ``n_train x d``
        for a block and ``head_passes`` times that for the head; the larger is counted."""
        d = setup.embedding.shape[1]

        def forward(module: nn.Module, batch: int) -> torch.Tensor:
            z = torch.zeros(batch, d)                                             # (B, d)
            x = torch.zeros(batch, *setup.input_shape)                            # (B, C, H, W)
            return dt_block_loss(module(z, x), torch.zeros(setup.num_classes, d), z, 1.0)

        return StepProbe(name=f"the {setup.model.block} DT block", build=lambda: self.build_module(block(1), setup),
                         forward=forward, fixed_bytes=n_train * d * 4 * max(1, setup.train.head_passes))

    # ---- the run directory's side ---------------------------------------------------
    def manifest_fields(self, cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
        return {
            "T": setup.T,
            "schedule": {**config_mod.to_dict(cfg)["schedule"], "alpha_bar": list(setup.alpha_bar)},
            **common_manifest_fields(cfg, data, setup),
        }

    def chain(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]], embedding: torch.Tensor,
              where: Path | str = "") -> NoPropChain:
        """The Eq. 3 chain of units whose ``model/...`` tensors are ``states`` (by unit name)."""
        modules = {u.name: load_module_state(self.build_module(u, setup), states[u.name], u.name, Path(where))
                   for u in self.units(setup)}
        chain = NoPropChain([modules[block(t).name] for t in range(1, setup.T + 1)], modules[HEAD.name], embedding,
                            np.array(setup.alpha_bar), setup.mean, setup.std)
        return chain.eval()

    def progress_scores(self, chain: NoPropChain, test: ArraySplit, eval_cfg: EvalConfig,
                        device: torch.device | str) -> dict[str, Any]:
        """What an ``--eval.every`` point records (the keys the training plot reads)."""
        scores = evaluate(chain, test, eval_cfg.batch_size, eval_cfg.seed, device)
        key = "chain_accuracy_noise" if eval_cfg.noise else "chain_accuracy_no_noise"
        return {"test_accuracy": scores[key], "chain_accuracy_noise": scores["chain_accuracy_noise"],
                "chain_accuracy_no_noise": scores["chain_accuracy_no_noise"],
                "best_block_alone": max(scores["block_alone_accuracy"].values()),
                "block_alone_accuracy": scores["block_alone_accuracy"],
                "block_in_chain_accuracy": scores["block_in_chain_accuracy"]}


MANIFEST_SCHEMA = {
    # What manifest_fields writes, checked on every read of the manifest (the vocabulary is
    # noprop_dist.rundir's; a check may read the keys above it).
    "T": f"an integer in 1..{MAX_T}",
    "schedule": {"alpha_bar": (lambda v, m: is_schedule(v, m["T"]), "T + 1 increasing numbers in (0, 1)"),
                 "...": "the run's schedule config (also in config.toml)"},
    **COMMON_SCHEMA,
    "units": (lambda units, m: set(units) <= set(unit_names(m["T"])), "units named block_01..block_T and head"),
}


def load_chain(run_dir: str | Path) -> tuple[NoPropChain, Config, dict[str, Any]]:
    """Rebuild the trained chain from a run directory (checksums verified, no code executed)."""
    run = RunDir(run_dir)
    setup, cfg, manifest, states, embedding = load_run_units(run)
    return DTObjective().chain(setup, states, embedding, run.path), cfg, manifest


class ChainPredictor:
    """A finished DT run as a predictor: evaluate the Eq. 3 chain, export it."""

    def __init__(self, run: RunDir):
        self.setup, self.cfg, self.manifest, states, embedding = load_run_units(run)
        self.chain = DTObjective().chain(self.setup, states, embedding, run.path)

    def evaluate(self, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str = "cpu",
                 max_batch: int | None = None) -> dict:
        scores = evaluate(self.chain, split, eval_cfg.batch_size, eval_cfg.seed, device, max_batch)
        key = "chain_accuracy_noise" if eval_cfg.noise else "chain_accuracy_no_noise"
        return {"test_accuracy": scores[key], **scores, "eval_noise": eval_cfg.noise}

    def export_program(self):
        """A torch.export program ``(images, noise) -> logits``.

        ``images`` raw (N, C, H, W) of the training data's dtype (uint8 0..255 for the builtin
        datasets, float32 for float user files; torch.export fixes the dtype), normalised
        inside; ``noise`` (T+1, N, d) as made by :func:`~noprop_dist.nets.chain.draw_noise`.
        """
        model = RawImageChain(self.chain).eval()
        images = example_images(self.manifest)
        noise = draw_noise(self.chain.T, 4, self.chain.embedding.shape[1], torch.Generator().manual_seed(0), True)
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(model, (images, noise), dynamic_shapes=({0: batch}, {1: batch}))
