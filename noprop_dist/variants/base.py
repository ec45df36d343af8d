"""What a NoProp run's units are, and what a variant tells the unit loop.

* :class:`UnitSpec` names one independently trained unit (DT's block t or head, CT/FM's
  time-interval network or CT's head); :class:`UnitSetup` is what all units of a run share.
* :class:`UnitObjective` is the interface each variant implements (:mod:`noprop_dist.variants.dt`,
  :mod:`noprop_dist.variants.continuous`): its units, each unit's module, optimiser, target
  noise and loss, and the shared tensors to synchronise. The loop that calls it is
  :class:`noprop_dist.training.runner.UnitRunner`.
* Seeds: every random draw of a unit comes from ``derive_seed(run seed, unit.seed_id,
  epoch, stream)``, never from the worker's identity.
* Shared tensors: W_embed (when learned) and the module state under a variant's
  ``shared_prefixes`` (CT's schedule), as a unit holds them and as the trainers average them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from noprop_dist.config import MAX_CLASSES, MAX_INPUT_VALUES, Config, ContinuousConfig, ModelConfig, TrainConfig
from noprop_dist.core import schedule
from noprop_dist.data import Dataset, normalize
from noprop_dist.errors import CheckpointError, DeviceUnavailable
from noprop_dist.nets.blocks import class_medoids, embedding_dim, initial_embedding
from noprop_dist.rundir import RunDir, load_run_config
from noprop_dist.variants.registry import get_variant

# Streams of derive_seed; pass p of a multi-pass unit uses PASS_STRIDE * (p + 1) + stream.
SHUFFLE, NOISE, DROPOUT, INIT = 0, 1, 2, 3
PASS_STRIDE = 10
RANK_STREAM_STRIDE = 10
"""Dropout of data-parallel rank r uses stream DROPOUT + RANK_STREAM_STRIDE * r: ranks draw
different masks, and rank 0 draws the stream of a run without data parallelism."""
EMBED_SEED_UNIT = -1
PROTOTYPE_MAX_PER_CLASS = 1000  # medoid search is quadratic in the class size
SHARED_EMBEDDING = "embedding"
"""The key of W_embed among a unit's shared tensors and in its checkpoint."""


@dataclass(frozen=True)
class UnitSpec:
    """One independently trained unit of a run.

    ``name`` names its checkpoint and progress bar; ``seed_id`` is the unit's id in
    :func:`derive_seed` (DT: block t is t and the head 0, as before units had names);
    ``role`` is ``block``, ``head`` or ``interval``; ``index`` is DT's block t or CT/FM's
    interval k (1-based); ``t_range`` is the interval of times an ``interval`` unit trains on.
    """

    name: str
    seed_id: int
    role: str
    index: int = 0
    t_range: tuple[float, float] | None = None


HEAD = UnitSpec(name="head", seed_id=0, role="head")
"""The output head of DT and CT (labels only; its seed id 0 is DT's from before units had names)."""


def derive_seed(run_seed: int, unit: int, epoch: int, stream: int) -> int:
    """A 63-bit seed that depends only on (run seed, unit id, epoch, stream)."""
    seq = np.random.SeedSequence([run_seed, unit + 1, epoch, stream])
    return int(seq.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def local_gpus(cluster: Any = None) -> tuple[int, str]:
    """(CUDA devices this process can use, where): the in-process trainers' GPUs."""
    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), "this machine"


def check_gpu(name: str, gpus: int, where: str) -> None:
    """Refuse ``train.device=cuda`` or ``cuda:N`` when ``where`` has ``gpus`` GPUs, too few
    for it (one line naming what was asked and what exists)."""
    if not name.startswith("cuda"):
        return
    index = int(name[5:]) if name.startswith("cuda:") else 0
    if index < gpus:
        return
    asked = "a GPU" if name == "cuda" else f"GPU {index}"
    if gpus == 0:
        raise DeviceUnavailable(f"train.device={name} asks for {asked} but {where} has no GPU; "
                                "pass --train.device=cpu (or auto: a GPU where there is one)")
    raise DeviceUnavailable(f"train.device={name} asks for {asked} but {where} has {gpus} GPU(s), cuda:0.."
                            f"cuda:{gpus - 1}; pass --train.device=cuda:{gpus - 1} or lower (or auto)")


def resolve_device(name: str) -> torch.device:
    """The device of ``train.device`` in this process; a GPU this machine lacks is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_gpu(name, *local_gpus())
    return torch.device(name)


def evaluation_device(name: str) -> torch.device:
    """Where this process evaluates a run trained with ``train.device=name``: that device
    where this machine has it, else the CPU. (A Ray driver: its workers held the GPUs that
    ``name`` asked for, checked against the cluster before the run started.)"""
    try:
        return resolve_device(name)
    except DeviceUnavailable:
        return torch.device("cpu")


@dataclass(frozen=True)
class UnitSetup:
    """What all units of a run share; identical on every worker (the coordinator ships it)."""

    model: ModelConfig
    train: TrainConfig
    alpha_bar: tuple[float, ...]          # DT: t = 0..T; CT: its ends initialise the learned schedule
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedding: torch.Tensor               # initial W_embed (m, d)
    variant: str = "dt"
    continuous: ContinuousConfig = ContinuousConfig()

    @property
    def T(self) -> int:
        """DT's number of blocks (the length of its fixed schedule)."""
        return len(self.alpha_bar) - 1

    @property
    def learnable_embedding(self) -> bool:
        """Do the units train copies of W_embed (learned or prototype embedding, and a variant
        whose units share it; a baseline network holds its own)?"""
        return self.model.embedding != "one_hot" and self.objective.shares_embedding

    @property
    def objective(self) -> "UnitObjective":
        """The variant's side of the unit loop (looked up in :mod:`noprop_dist.variants.registry`)."""
        return get_variant(self.variant).objective()

    @property
    def units(self) -> list[UnitSpec]:
        return self.objective.units(self)

    def unit(self, name: str) -> UnitSpec:
        for spec in self.units:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def syncs_shared(self) -> bool:
        """Do the units hold copies of shared tensors that the trainer synchronises?"""
        return self.learnable_embedding or bool(self.objective.shared_prefixes)


def make_setup(cfg: Config, data: Dataset) -> UnitSetup:
    """Schedule and initial embedding for a run."""
    ab = schedule.alpha_bar_from_config(cfg.schedule)
    embedding = make_embedding(cfg, data)
    return UnitSetup(model=cfg.model, train=cfg.train, alpha_bar=tuple(float(v) for v in ab),
                     num_classes=data.num_classes, input_shape=data.input_shape,
                     mean=data.mean, std=data.std, embedding=embedding, variant=cfg.variant,
                     continuous=cfg.continuous)


def make_embedding(cfg: Config, data: Dataset) -> torch.Tensor:
    """The run's initial W_embed (m, d), seeded (prototype: per-class medoids of the train set)."""
    d = embedding_dim(cfg.model.embedding, data.num_classes, data.input_shape, cfg.model.embed_dim)
    prototypes = None
    if cfg.model.embedding == "prototype":
        x = normalize(np.asarray(data.train.x), data.mean, data.std)
        y = torch.from_numpy(np.array(data.train.y))
        prototypes = class_medoids(x, y, data.num_classes, PROTOTYPE_MAX_PER_CLASS,
                                   derive_seed(cfg.train.seed, EMBED_SEED_UNIT, 0, INIT))
    return initial_embedding(cfg.model.embedding, data.num_classes, d,
                             derive_seed(cfg.train.seed, EMBED_SEED_UNIT, 0, INIT), prototypes)


def seeded_module(unit: UnitSpec, setup: UnitSetup, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under the global RNG seeded from the unit's own init seed (restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(setup.train.seed, unit.seed_id, 0, INIT))
        return build()


def epoch_order(setup: UnitSetup, unit: UnitSpec, epoch: int, n: int, stream: int = -1) -> torch.Tensor:
    """The unit's shuffle of the n training examples for one epoch (pass ``stream`` of a
    multi-pass unit, -1 for a single pass)."""
    s = SHUFFLE if stream < 0 else PASS_STRIDE * (stream + 1) + SHUFFLE
    gen = torch.Generator().manual_seed(derive_seed(setup.train.seed, unit.seed_id, epoch, s))
    return torch.randperm(n, generator=gen)


@dataclass(frozen=True)
class StepProbe:
    """What a variant hands the dry run: how to build its largest unit and one step's forward.
    ``build()`` makes the module (called under the meta device); ``forward(module, batch)``
    makes inputs for ``batch`` examples (under the meta device) and returns the loss; ``fixed_bytes`` counts the
    unit's per-epoch tensors that do not scale with the batch (e.g. its target noise)."""
    name: str
    build: Callable[[], nn.Module]
    forward: Callable[[nn.Module, int], torch.Tensor]
    fixed_bytes: int = 0


class UnitObjective:
    """What a NoProp variant tells the unit loop; one instance per variant, stateless.

    The loop (:class:`UnitRunner`) owns the module, the optimiser, the embedding copy, the
    batches, the seeds and the bookkeeping; the variant says everything that is its math.
    """

    name = ""
    shared_prefixes: tuple[str, ...] = ()
    """Module-state prefixes (e.g. ``"schedule."``) every unit holds a copy of, synchronised like W_embed."""
    shares_embedding = True
    """Do the units read (and, when it is learned, train a copy of) the run's W_embed?"""
    def units(self, setup: UnitSetup) -> list[UnitSpec]:
        """Every unit of a run, in the trainers' fixed order."""
        raise NotImplementedError

    def build_module(self, unit: UnitSpec, setup: UnitSetup) -> nn.Module:
        """The unit's network, initialised from its own seed (use :func:`seeded_module`)."""
        raise NotImplementedError

    def optimizer(self, params: list[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)

    def passes(self, unit: UnitSpec, setup: UnitSetup) -> list[int]:
        """The passes over the data of one epoch: ``[-1]`` for one pass, ``[0..P-1]`` for P
        passes, each with its own shuffle and a slice of the epoch noise (``noise[p]``). A
        head is cheap and independent: ``train.head_passes`` passes over the labels."""
        return list(range(setup.train.head_passes)) if unit.role == "head" else [-1]

    def needs_images(self, unit: UnitSpec) -> bool:
        """A head reads labels only (its input is sampled from them); other units read images."""
        return unit.role != "head"

    def epoch_noise(self, unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
        """All randomness of the unit's closed-form targets for one epoch, row i for training
        example i (with a leading pass axis for a multi-pass unit). The coordinator either
        ships this tensor or lets the worker call this same function (the noise recipe)."""
        raise NotImplementedError

    def batch_loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        """The unit's loss on one batch: images ``x`` (normalised, or None), labels ``y`` and
        the batch's rows of the epoch noise. Reads ``runner.module``, ``runner.embedding``,
        ``runner.unit`` and ``runner.setup`` (a :class:`noprop_dist.training.runner.UnitRunner`)."""
        raise NotImplementedError

    def step_probe(self, setup: UnitSetup, n_train: int) -> StepProbe:
        """The dry run of the largest unit's training step (:mod:`~noprop_dist.training.preflight`)."""
        raise NotImplementedError

    # ---- the run directory's side ---------------------------------------------------
    def manifest_fields(self, cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
        """The variant's fields of manifest.json (checked against its ``MANIFEST_SCHEMA``)."""
        raise NotImplementedError

    def chain(self, setup: UnitSetup, states: dict[str, dict[str, torch.Tensor]], embedding: torch.Tensor,
              where: Path | str = "") -> Any:
        """The predictor built from the units' ``model/...`` tensors (``states`` by unit name)."""
        raise NotImplementedError

    def progress_scores(self, chain: Any, test: Any, eval_cfg: Any, device: torch.device | str) -> dict[str, Any]:
        """What an ``--eval.every`` point records: at least ``test_accuracy``."""
        raise NotImplementedError


def shared_of(state: dict[str, torch.Tensor], setup: UnitSetup) -> dict[str, torch.Tensor]:
    """The shared tensors inside a unit's state (or checkpoint): ``embedding`` when the
    embedding is learned, and ``model/<prefix>...`` for the variant's shared prefixes."""
    prefixes = tuple(f"model/{p}" for p in setup.objective.shared_prefixes)
    out = {k: v for k, v in state.items() if prefixes and k.startswith(prefixes)}
    if setup.learnable_embedding:
        out[SHARED_EMBEDDING] = state[SHARED_EMBEDDING]
    return out


def average_shared(copies: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The synchronised shared tensors: per key, the mean of the units' copies (units in the
    trainers' fixed order, so every trainer computes the same float sums)."""
    keys = set(copies[0])
    if any(set(c) != keys for c in copies):
        raise ValueError("units hold different shared tensors")
    return {k: average_embeddings([c[k] for c in copies]) for k in sorted(keys)}


def average_embeddings(copies: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the units' copies of one shared tensor (same order everywhere)."""
    return torch.stack([c.detach().cpu().float() for c in copies]).mean(0)


def head_noise(unit: UnitSpec, setup: UnitSetup, epoch: int, n: int) -> torch.Tensor:
    """A head unit's epoch noise (head_passes, n, d): the noise of its closed-form input
    (DT's z_T, CT's z_1) for each pass over the labels."""
    d = setup.embedding.shape[1]
    return torch.stack([
        schedule.marginal_noise(n, d, derive_seed(setup.train.seed, unit.seed_id, epoch, PASS_STRIDE * (p + 1) + NOISE))
        for p in range(setup.train.head_passes)])


# ---- what every variant writes into the run directory ------------------------------------
def common_manifest_fields(cfg: Config, data: Dataset, setup: UnitSetup) -> dict[str, Any]:
    """The manifest fields every NoProp variant writes (data, embedding, block size)."""
    return {
        "dataset": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "input_dtype": str(data.train.x.dtype),
        "embedding": cfg.model.embedding, "embedding_dim": int(setup.embedding.shape[1]),
        "block": cfg.model.block, "normalization": {"mean": list(data.mean), "std": list(data.std)},
    }


COMMON_SCHEMA = {
    "dataset": "a string", "num_classes": f"a positive integer <= {MAX_CLASSES}",
    "input_shape": f"3 positive integers (C, H, W), C*H*W <= {MAX_INPUT_VALUES}",
    "input_dtype": '"uint8" or "float32"', "embedding": "a string",
    "embedding_dim": f"a positive integer <= {MAX_INPUT_VALUES}",
    "block": "a string",
    "normalization": {"mean": "C numbers (C = input_shape[0])", "std": "C positive numbers (C = input_shape[0])"},
}

def example_images(manifest: dict[str, Any]) -> torch.Tensor:
    """Four zero images of the run's raw dtype: the uint8 -> /255 branch is decided at export time."""
    dtype = torch.float32 if manifest.get("input_dtype") == "float32" else torch.uint8
    return torch.zeros(4, *manifest["input_shape"], dtype=dtype)


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


# ---- a finished run's units, rebuilt from its directory -----------------------------------
EMBEDDING_FILE = "embedding"
"""The run's final W_embed (``embedding.safetensors``)."""


def setup_of_run(run: RunDir):
    """The :class:`UnitSetup` and config of a finished NoProp run, rebuilt from its directory."""
    manifest = run.manifest()
    cfg = load_run_config(run)
    embedding = run.load_tensors(EMBEDDING_FILE)["embedding"]
    setup = UnitSetup(model=cfg.model, train=cfg.train, alpha_bar=tuple(manifest["schedule"]["alpha_bar"]),
                      num_classes=manifest["num_classes"], input_shape=tuple(manifest["input_shape"]),
                      mean=tuple(manifest["normalization"]["mean"]), std=tuple(manifest["normalization"]["std"]),
                      embedding=embedding, variant=cfg.variant, continuous=cfg.continuous)
    return setup, cfg, manifest


def load_run_units(run: RunDir):
    """``(setup, cfg, manifest, states by unit name, final embedding)`` of a finished run."""
    setup, cfg, manifest = setup_of_run(run)
    states = {u.name: run.load_unit(u.name) for u in setup.units}
    return setup, cfg, manifest, states, setup.embedding
