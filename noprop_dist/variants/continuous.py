"""NoProp-CT and NoProp-FM as variants: their units, targets, losses, shared tensors, and
their predictors (the integrators of :mod:`noprop_dist.nets.time_conditioned` rebuilt from a run).

Both train one time-conditioned network u(z_t, x, t). Distributed **by time interval**
(``continuous.intervals = K``): [0, 1] is split into K equal intervals, and interval k's
network is its own unit, trained on its own worker with t drawn only inside its interval;
there is no traffic between workers. At inference z passes from one interval's network to
the next (:class:`~noprop_dist.nets.time_conditioned.CTChain`, :class:`~noprop_dist.nets.time_conditioned.FMChain`).
K = 1 is the paper's single network.

* **CT** (Eq. 9): units ``interval_01..interval_K`` and ``head``. An interval unit samples
  ``z_t ~ q(z_t | y)`` with the learned ``alpha_bar(t)`` and minimises
  ``0.5 eta SNR'(t) ||softmax(u(z_t, x, t)) @ W_embed - u_y||^2``; the head unit trains
  ``p_out(y | z_1)`` on ``z_1 ~ q(z_1 | y)`` plus ``KL(q(z_0 | y) || N(0, I))`` (both depend
  on the schedule's endpoints). Every unit holds a copy of the learned schedule
  (``schedule.*``, shared like W_embed: averaged at each sync point; the average of
  positive-weight monotone schedules is again one, so monotonicity survives the sync).
  What trains it (``continuous.schedule_shape``, ``schedule_endpoints``), where it starts
  (``alpha_bar_0/_1``) and how t is drawn (``time_sampling``) are settings; the defaults and
  why: docs/ct.md (issue 17).
* **FM** (Eqs. 10-13): units ``interval_01..interval_K`` only (prediction is the nearest
  class embedding, no head). ``z_t = t u_y + (1 - t) z_0``, loss
  ``||u(z_t, x, t) @ W_embed - (u_y - z_0)||^2`` plus, with a learned embedding, the anchor
  term of :func:`~noprop_dist.nets.time_conditioned.fm_anchor_loss`; with
  ``continuous.fm_sigma > 0`` the path's Gaussian noise ``sigma eps`` is added to ``z_t``.

Optimiser: Adam (the paper's, for CT and FM), with ``train.weight_decay`` as its L2 term.
Seeds: interval k is ``seed_id`` k, the head 0 (as DT's block k and head); the learned
schedule starts from one seed shared by all units (:data:`SCHEDULE_SEED_UNIT`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from noprop_dist import config as config_mod
from noprop_dist.config import MAX_T, Config, EvalConfig, TrainConfig
from noprop_dist.core import schedule
from noprop_dist.core.continuous import (
    GradScale, LearnedSchedule, ct_denoise_loss, ct_head_loss, draw_times, fm_anchor_loss, fm_interpolate, fm_loss, fm_target,
    fm_velocity, interval_bounds, kl_prior_continuous, sample_ct_marginal
)
from noprop_dist.data import ArraySplit, Dataset
from noprop_dist.nets.blocks import BLOCK_SIZES, OutputHead
from noprop_dist.nets.chain import RawImageChain
from noprop_dist.nets.time_conditioned import CTChain, FMChain, TimeConditionedNet, chain_noise, evaluate_continuous
from noprop_dist.rundir import RunDir, is_schedule
from noprop_dist.variants.base import (
    COMMON_SCHEMA, HEAD, NOISE, StepProbe, UnitObjective, UnitSetup, UnitSpec, common_manifest_fields, derive_seed,
    example_images, head_noise, load_module_state, load_run_units, seeded_module
)

TIME = 4
"""derive_seed stream of the uniform draws that place each example's t inside its interval."""
FM_PATH = 5
"""derive_seed stream of FM's path noise eps (``continuous.fm_sigma > 0`` only)."""
SCHEDULE_SEED_UNIT = 2_000_000
"""Unit id of the learned schedule's initialisation (one seed: every unit starts from the same copy)."""


def interval(k: int, K: int) -> UnitSpec:
    """Interval k of K (1-based): the network trained on t in [(k-1)/K, k/K)."""
    return UnitSpec(name=f"interval_{k:02d}", seed_id=k, role="interval", index=k,
                    t_range=interval_bounds(K)[k - 1])


class IntervalModule(nn.Module):
    """An interval unit's module: the time-conditioned network (and CT's schedule copy)."""

    def __init__(self, net: nn.Module, schedule_copy: LearnedSchedule | None = None):
        super().__init__()
        self.net = net
        if schedule_copy is not None:
            self.schedule = schedule_copy


class HeadModule(nn.Module):
    """CT's head unit: p_out(y | z_1) and its schedule copy."""

    def __init__(self, head: nn.Module, schedule_copy: LearnedSchedule):
        super().__init__()
        self.head = head
        self.schedule = schedule_copy


def time_noise(unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
    """(n, d + 1): columns 0..d-1 the Gaussian noise of example i's target (CT: eps of z_t;
    FM: z_0), column d a uniform draw in [0, 1) that places its t inside the unit's interval."""
    d = setup.embedding.shape[1]
    seed = setup.train.seed
    eps = schedule.marginal_noise(n, d, derive_seed(seed, unit.seed_id, epoch, NOISE))         # (n, d)
    gen = torch.Generator().manual_seed(derive_seed(seed, unit.seed_id, epoch, TIME))
    return torch.cat([eps, torch.rand(n, 1, generator=gen)], dim=1)                           # (n, d + 1)


def split_time_noise(rows: torch.Tensor, unit: UnitSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, d), t (B,)) of a batch of :func:`time_noise` rows, t inside the unit's interval."""
    lo, hi = unit.t_range
    return rows[:, :-1], lo + (hi - lo) * rows[:, -1]


class ContinuousObjective(UnitObjective):
    """What CT and FM share: interval units, the time-conditioned network, Adam."""

    def intervals(self, setup: UnitSetup) -> list[UnitSpec]:
        K = setup.continuous.intervals
        return [interval(k, K) for k in range(1, K + 1)]

    def network(self, setup: UnitSetup) -> TimeConditionedNet:
        return TimeConditionedNet(setup.input_shape, setup.embedding.shape[1], setup.num_classes,
                                  BLOCK_SIZES[setup.model.block], setup.model.dropout, setup.continuous.time_dim)

    def optimizer(self, params: list[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)

    def epoch_noise(self, unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
        return time_noise(unit, setup, epoch, n)

    def step_probe(self, setup: UnitSetup, n_train: int) -> StepProbe:
        first = self.intervals(setup)[0]

        def forward(module: nn.Module, batch: int) -> torch.Tensor:
            runner = _ProbeRunner(module, first, setup)
            x = torch.zeros(batch, *setup.input_shape)                            # (B, C, H, W)
            rows = torch.full((batch, self.noise_width(setup)), 0.5)              # (B, width)
            return self.batch_loss(runner, x, torch.zeros(batch, dtype=torch.long), rows)

        return StepProbe(name=f"the {setup.model.block} {self.name.upper()} network",
                         build=lambda: self.build_module(first, setup), forward=forward,
                         fixed_bytes=n_train * self.noise_width(setup) * 4 * max(1, setup.train.head_passes))

    def noise_width(self, setup: UnitSetup) -> int:
        """Columns of an interval unit's epoch noise: d Gaussian, one uniform for t."""
        return setup.embedding.shape[1] + 1

    def manifest_fields(self, cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
        return {
            "T": cfg.schedule.T, "intervals": setup.continuous.intervals,
            "schedule": {**config_mod.to_dict(cfg)["schedule"], "alpha_bar": list(setup.alpha_bar)},
            **common_manifest_fields(cfg, data, setup),
        }

    def nets(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]], where: Path | str) -> list[nn.Module]:

        return [load_module_state(self.build_module(u, setup), states[u.name], u.name, Path(where)).net.eval()
                for u in self.intervals(setup)]

    def progress_scores(self, chain: nn.Module, test: ArraySplit, eval_cfg: EvalConfig,
                        device: torch.device | str) -> dict[str, Any]:
        return chain_scores(chain, test, eval_cfg, device)


class CTObjective(ContinuousObjective):
    name = "ct"
    shared_prefixes = ("schedule.",)

    def units(self, setup: UnitSetup) -> list[UnitSpec]:
        return self.intervals(setup) + [HEAD]

    def learned_schedule(self, setup: UnitSetup) -> LearnedSchedule:
        """The schedule every unit starts from (one seed; its ends ``continuous.alpha_bar_0/_1``,
        0 meaning the ends of the config's schedule)."""
        spec = UnitSpec(name="schedule", seed_id=SCHEDULE_SEED_UNIT, role="schedule")
        ab_0 = setup.continuous.alpha_bar_0 or setup.alpha_bar[0]
        ab_1 = setup.continuous.alpha_bar_1 or setup.alpha_bar[-1]
        return seeded_module(spec, setup, lambda: LearnedSchedule(ab_0, ab_1))

    def build_module(self, unit: UnitSpec, setup: UnitSetup) -> nn.Module:
        copy = self.learned_schedule(setup)
        trained = set()
        # The head's loss reads alpha_bar(0) and alpha_bar(1) only, where the shape is 0 and 1 by
        # construction: its copy of the shape gets no gradient, and (coupled) weight decay alone
        # would move it by Adam's full step, head_passes times per epoch, before the average.
        if setup.continuous.schedule_shape != "fixed" and unit.role != "head":
            trained |= {id(q) for q in copy.shape_parameters()}
        if setup.continuous.schedule_endpoints != "fixed":
            trained |= {id(copy.gamma_0), id(copy.raw_gap)}
        for q in copy.parameters():
            q.requires_grad_(id(q) in trained)
            if not setup.continuous.schedule_weight_decay:
                q.no_weight_decay = True        # read by optimizer(): the schedule's own group
        if unit.role == "head":
            return HeadModule(seeded_module(unit, setup, lambda: OutputHead(setup.embedding.shape[1], setup.num_classes)),
                              copy)
        return IntervalModule(seeded_module(unit, setup, lambda: self.network(setup)), copy)

    def epoch_noise(self, unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
        if unit.role == "head":   # (head_passes, n, d): the noise of z_1 for each pass
            return head_noise(unit, setup, epoch, n)
        return time_noise(unit, setup, epoch, n)

    def batch_loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        module, embedding = runner.module, runner.embedding
        sched: LearnedSchedule = module.schedule
        u_y = embedding[y]                                                        # (B, d)
        if runner.unit.role == "head":
            ends = sched.alpha_bar(torch.tensor([0.0, 1.0], device=u_y.device))   # alpha_bar(0), alpha_bar(1)
            z_1 = sample_ct_marginal(u_y, ends[1].expand(len(y)), rows)          # (B, d)
            return ct_head_loss(module.head(z_1), y) + kl_prior_continuous(u_y, ends[0]).mean()
        cont = runner.setup.continuous
        eps, t = split_time_noise(rows, runner.unit)                              # (B, d), (B,)
        weight = None
        if cont.time_sampling != "uniform":
            t, weight = draw_times(rows[:, -1], *runner.unit.t_range, cont.time_sampling, sched)
        if cont.schedule_shape == "variance":
            shape_grad = GradScale()
            alpha_bar, snr_prime = sched.alpha_bar_and_snr_derivative(t, shape_grad)  # (B,), (B,)
        else:
            shape_grad, alpha_bar, snr_prime = None, sched.alpha_bar(t), sched.snr_derivative(t)
        z_t = sample_ct_marginal(u_y, alpha_bar, eps)                             # (B, d)
        logits = module.net(z_t, x, t)                                            # (B, m)
        return ct_denoise_loss(logits.float(), embedding, u_y, snr_prime, cont.eta,
                               None if cont.time_sampling == "uniform" else weight, shape_grad)

    def optimizer(self, params: list[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
        """Adam; the schedule's parameters in a group without weight decay when
        ``continuous.schedule_weight_decay`` is off (:meth:`build_module` marks them)."""
        decayed = [q for q in params if not getattr(q, "no_weight_decay", False)]
        if len(decayed) == len(params):
            return super().optimizer(params, train)
        plain = [q for q in params if getattr(q, "no_weight_decay", False)]
        return torch.optim.Adam([{"params": decayed}, {"params": plain, "weight_decay": 0.0}],
                                lr=train.lr, weight_decay=train.weight_decay)

    def averaged_schedule(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]]) -> LearnedSchedule:
        """The learned schedule of a run: the mean of the units' copies (equal after a sync)."""
        names = [u.name for u in self.units(setup)]
        keys = [k for k in states[names[0]] if k.startswith("model/schedule.")]
        sched = self.learned_schedule(setup)
        sched.load_state_dict({k[len("model/schedule."):]: torch.stack([states[n][k].float() for n in names]).mean(0)
                               for k in keys})
        return sched

    def chain(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]], embedding: torch.Tensor,
              where: Path | str = "") -> CTChain:

        head = load_module_state(self.build_module(HEAD, setup), states[HEAD.name], HEAD.name, Path(where)).head
        grid = self.averaged_schedule(setup, states).alpha_bar_grid(setup.continuous.steps)
        return CTChain(self.nets(setup, states, where), head.eval(), embedding, grid, setup.mean, setup.std).eval()


class FMObjective(ContinuousObjective):
    name = "fm"

    def units(self, setup: UnitSetup) -> list[UnitSpec]:
        return self.intervals(setup)

    def build_module(self, unit: UnitSpec, setup: UnitSetup) -> nn.Module:
        return IntervalModule(seeded_module(unit, setup, lambda: self.network(setup)))

    def noise_width(self, setup: UnitSetup) -> int:
        """d for z_0, d more for the path noise when ``continuous.fm_sigma > 0``, one uniform for t."""
        d = setup.embedding.shape[1]
        return (2 * d if setup.continuous.fm_sigma else d) + 1

    def epoch_noise(self, unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
        """(n, d + 1) as :func:`time_noise`; with ``fm_sigma > 0`` (n, 2d + 1): z_0, the path
        noise eps (its own stream, so sigma = 0 draws exactly what it drew before), t's uniform."""
        rows = time_noise(unit, setup, epoch, n)                                  # (n, d + 1)
        if not setup.continuous.fm_sigma:
            return rows
        d = setup.embedding.shape[1]
        eps = schedule.marginal_noise(n, d, derive_seed(setup.train.seed, unit.seed_id, epoch, FM_PATH))  # (n, d)
        return torch.cat([rows[:, :d], eps, rows[:, d:]], dim=1)                 # (n, 2d + 1)

    def batch_loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        embedding = runner.embedding
        u_y = embedding[y]                                                        # (B, d)
        noise, t = split_time_noise(rows, runner.unit)                            # (B, d or 2d), (B,)
        d = u_y.shape[1]
        sigma = runner.setup.continuous.fm_sigma
        z_0 = noise[:, :d]                                                        # (B, d)
        z_t = fm_interpolate(z_0, u_y, t, sigma, noise[:, d:] if sigma else None)  # (B, d)
        v = fm_velocity(runner.module.net(z_t, x, t).float(), embedding)          # (B, d)
        loss = fm_loss(v, fm_target(z_0, u_y))
        if runner.setup.learnable_embedding:
            loss = loss + fm_anchor_loss(z_t, v, t, embedding, y)
        return loss

    def chain(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]], embedding: torch.Tensor,
              where: Path | str = "") -> FMChain:
        return FMChain(self.nets(setup, states, where), embedding, setup.continuous.steps,
                       setup.mean, setup.std).eval()


class _ProbeRunner:
    """What ``batch_loss`` reads from a runner, for the preflight's dry run."""

    def __init__(self, module: nn.Module, unit: UnitSpec, setup: UnitSetup):
        self.module, self.unit, self.setup = module, unit, setup
        self.embedding = torch.zeros(setup.num_classes, setup.embedding.shape[1])


def chain_scores(chain: CTChain | FMChain, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str,
                 max_batch: int | None = None) -> dict[str, Any]:
    """Accuracy of a CT/FM chain: CT with and without the step noise (the headline follows
    ``eval.noise``), FM (deterministic) once; plus the cost per 1,000 images."""
    first = evaluate_continuous(chain, split, eval_cfg.batch_size, eval_cfg.seed, device, True, max_batch)
    out = {"steps": chain.steps, "seconds_per_1000_images": 1000 * first["seconds"] / max(len(split), 1)}
    if isinstance(chain, CTChain):
        second = evaluate_continuous(chain, split, eval_cfg.batch_size, eval_cfg.seed, device, False, max_batch)
        out.update(chain_accuracy_noise=first["accuracy"], chain_accuracy_no_noise=second["accuracy"],
                   nearest_accuracy_noise=first["nearest_accuracy"], nearest_accuracy_no_noise=second["nearest_accuracy"],
                   test_accuracy=first["accuracy"] if eval_cfg.noise else second["accuracy"])
    else:
        out.update(test_accuracy=first["accuracy"], nearest_accuracy=first["nearest_accuracy"])
    return out


CT_MANIFEST_SCHEMA = {
    "T": f"an integer in 1..{MAX_T}", "intervals": "a positive integer",
    "schedule": {"alpha_bar": (lambda v, m: is_schedule(v, m["T"]), "T + 1 increasing numbers in (0, 1)"),
                 "...": "the run's schedule config (also in config.toml)"},
    **COMMON_SCHEMA,
    "units": (lambda units, m: set(units) <= {f"interval_{k:02d}" for k in range(1, m["intervals"] + 1)} | {"head"},
              "units named interval_01..interval_K and head"),
}

FM_MANIFEST_SCHEMA = {
    **CT_MANIFEST_SCHEMA,
    "units": (lambda units, m: set(units) <= {f"interval_{k:02d}" for k in range(1, m["intervals"] + 1)},
              "units named interval_01..interval_K"),
}


class ContinuousPredictor:
    """A finished CT or FM run as a predictor: integrate, evaluate, export."""

    def __init__(self, run: RunDir):
        self.setup, self.cfg, self.manifest, states, embedding = load_run_units(run)
        self.chain = self.setup.objective.chain(self.setup, states, embedding, run.path)

    def evaluate(self, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str = "cpu",
                 max_batch: int | None = None) -> dict:
        scores = chain_scores(self.chain, split, eval_cfg, device, max_batch)
        return {**scores, "intervals": len(self.chain.nets),
                "eval_noise": eval_cfg.noise if isinstance(self.chain, CTChain) else False}

    def export_program(self):
        """A torch.export program ``(images, noise) -> scores``: ``images`` raw (N, C, H, W) of
        the training data's dtype, normalised inside; ``noise`` CT (S+1, N, d) (rows 1..S zero
        to drop the step noise), FM (1, N, d). CT returns head logits, FM ``-||z_1 - u_c||^2``."""
        model = RawImageChain(self.chain).eval()
        images = example_images(self.manifest)
        noise = chain_noise(self.chain, 4, torch.Generator().manual_seed(0))
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(model, (images, noise), dynamic_shapes=({0: batch}, {1: batch}))
