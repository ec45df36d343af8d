"""Typed, validated configuration.

A run is described by one :class:`Config` made of small frozen sections; each component
receives only its own section. Presets live in ``noprop_dist/configs/*.toml``; the command
line overrides any field with a dotted key (``--train.lr=3e-4``). Unknown keys, wrong types
and out-of-range values raise :class:`~noprop_dist.errors.ConfigError` before any work
starts. The resolved config is written into every run directory as ``config.toml``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from noprop_dist.core.schedule import alpha_bar_from_config
from noprop_dist.errors import ConfigError
from noprop_dist.variants.registry import find_trainer

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist_subset"
    """Dataset: mnist_subset (offline, 5,000 real digits), digits (offline, 8x8), mnist, cifar10, cifar100, file."""
    root: str = ""
    """Directory of torchvision datasets (mnist/cifar*); default: <cache_dir>/torchvision."""
    download: bool = False
    """Let torchvision download mnist/cifar* into ``root`` when it is missing."""
    path: str = ""
    """name=file: training data as .npz (arrays x, y) or .parquet/.arrow (columns x, y)."""
    test_path: str = ""
    """name=file: test data in the same format; empty = hold out ``test_fraction`` of ``path``."""
    test_fraction: float = 0.2
    """name=file without test_path: fraction of ``path`` held out (seeded split)."""
    layout: str = "auto"
    """name=file: image axes of x: nchw (N, C, H, W), nhwc (N, H, W, C: PIL/OpenCV), or auto (the reading with square images, else with at most 4 channels; ambiguous shapes are refused)."""
    cache_dir: str = ""
    """Where converted Arrow IPC files are kept; default: $NOPROP_DATA_DIR or ~/.cache/noprop_dist."""
    limit_train: int = 0
    """Train on N examples (0 = all), for quick experiments: a seeded, stratified sample (every class in proportion, at least one each; file order kept)."""
    limit_test: int = 0
    """Use only the first N test examples (0 = all)."""
    max_classes: int = 1000
    """Refuse data whose labels imply more classes (a one-hot embedding is classes x classes floats)."""


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"
    """Noise schedule of alpha_bar_t: cosine (improved-DDPM form, flipped so signal grows with t) or linear."""
    T: int = 10
    """Number of blocks / diffusion steps (the paper fixes 10)."""
    alpha_bar_min: float = 1e-4
    """Clip of alpha_bar_0 from below: z_0 is almost pure noise. Sets the first SNR gap."""
    alpha_bar_max: float = 0.9999
    """Clip of alpha_bar_T from above: sets the last SNR gap, which dominates the loss weights."""
    cosine_offset: float = 0.008
    """The small offset s of the cosine schedule (improved DDPM)."""


@dataclass(frozen=True)
class ModelConfig:
    block: str = "paper"
    """Block size preset: paper (Figure 6: 32/64/128 channels, 256 wide), small, tiny."""
    embedding: str = "one_hot"
    """Label embedding: one_hot (fixed, d = classes), learned (orthogonal init), prototype (medoid images)."""
    embed_dim: int = 20
    """Embedding width d for embedding=learned (one_hot: d = classes; prototype: d = C*H*W)."""
    dropout: float = 0.2
    """Dropout of the image path (Figure 6)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    """Epochs per block (Table 3: 100 for MNIST, 150 for CIFAR)."""
    batch_size: int = 128
    """Mini-batch size per block (Table 3)."""
    lr: float = 1e-3
    """AdamW learning rate (Table 3)."""
    lr_schedule: str = "constant"
    """Learning rate over the run: constant (the paper's) or cosine (from train.lr at the first step to 0 after the last of train.epochs, set before every step; the CT presets' choice, docs/ct.md)."""
    weight_decay: float = 1e-3
    """AdamW weight decay (Table 3)."""
    eta: float = 0.1
    """Weight eta of the denoising loss (0.1 for DT)."""
    seed: int = 0
    """Run seed; every unit derives its own generators from (seed, unit, epoch)."""
    head_passes: int = 10
    """Passes over the training labels per epoch for the output head (it is cheap and independent)."""
    embed_sync_every: int = 1
    """With a learned/prototype embedding: synchronise the units' embedding every N epochs."""
    embed_sync: str = "average"
    """How: average (each unit's AdamW moves its copy; copies averaged) or summed_gradient (the paper's summed gradient, applied by the trainer; see noprop_dist/embedding_sync.py)."""
    checkpoint_every: int = 1
    """Write each unit's checkpoint every N epochs (and always at the end)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, or cuda:N."""
    threads: int = 0
    """torch CPU threads for the in-process trainer (0 = torch default)."""
    bf16: bool = False
    """Use bfloat16 autocast on CUDA."""
    log_every: int = 10
    """Report progress every N steps."""


@dataclass(frozen=True)
class ContinuousConfig:
    intervals: int = 1
    """NoProp-CT/FM, time-partitioned: [0, 1] split into K intervals, each trained by its own network on its own worker (1 = one network)."""
    steps: int = 1000
    """NoProp-CT/FM inference: integration steps from t = 0 to 1 (the paper: 1000)."""
    eta: float = 1.0
    """NoProp-CT: weight eta of the SNR'(t)-weighted denoising loss (the paper: 1)."""
    time_dim: int = 64
    """Width of the sinusoidal time embedding of the CT/FM network (the paper: 64)."""
    time_sampling: str = "uniform"
    """NoProp-CT: how each example's t is drawn: uniform (the paper's t ~ U(0, 1)), antithetic (VDM's low-discrepancy draw: one uniform per batch, spread evenly over the batch) or snr_importance (t with density proportional to SNR'(t), the loss reweighted to keep its expectation). See docs/ct.md."""
    schedule_shape: str = "variance"
    """NoProp-CT: what trains the learned schedule's shape g~ between its endpoints: variance (VDM: the loss estimator's second moment, whose gradient in the shape is the variance's; the loss's expectation does not depend on the shape), loss (the Eq. 9 loss; before issue 17) or fixed (its initial log-SNR-linear form). See docs/ct.md."""
    schedule_endpoints: str = "fixed"
    """NoProp-CT: what trains the learned schedule's endpoints gamma(0), gamma(1): fixed (at continuous.alpha_bar_0/_1) or loss (each unit's loss: the intervals' denoising term, the head's cross-entropy and KL, each unit with its own Adam; before issue 17: the head's steps drive the ends apart, docs/ct.md)."""
    schedule_weight_decay: bool = True
    """NoProp-CT: apply train.weight_decay to the learned schedule's parameters as well as to the networks'."""
    alpha_bar_0: float = 0.05
    """NoProp-CT: alpha_bar(0) of the learned schedule, at initialisation (0 = schedule.alpha_bar_min, DT's clip of 1e-4: before issue 17). SNR(1) / SNR(0) sets how much more Eq. 9 weighs t = 1 than t = 0 (docs/ct.md)."""
    alpha_bar_1: float = 0.95
    """NoProp-CT: alpha_bar(1) of the learned schedule, at initialisation (0 = schedule.alpha_bar_max, DT's clip of 0.9999: before issue 17)."""
    fm_sigma: float = 0.0
    """NoProp-FM: standard deviation sigma of the Gaussian path N(t u_y + (1 - t) z_0, sigma^2 I); the paper leaves its value unstated, so 0 (the straight path)."""


@dataclass(frozen=True)
class EvalConfig:
    noise: bool = True
    """Include the sqrt(c_t) noise term of Eq. 3 in the reported chain accuracy (both are always recorded)."""
    seed: int = 12345
    """Seed of the inference noise z_0 and eps_t."""
    batch_size: int = 500
    """Evaluation batch size."""
    every: int = 0
    """NoProp-DT: also evaluate the chain on the test split every N epochs during training (0 = at the end only)."""


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "ray"
    """ray (NoProp: coordinator + one worker per block or interval), ddp (DDP on Ray Train: backprop variants, and NoProp-CT/FM data-parallel), or local (this process)."""
    address: str = ""
    """Ray address: empty = start a private local Ray; 'auto' or host:port = join that cluster."""
    workers: int = 0
    """ray: unit workers (0 = one per unit, or as many as fit; fewer than units: units share workers and a unit is split into replicas where that evens the load; more: units get replica groups). ddp: DDP workers (0 = as many as fit)."""
    threads_per_worker: int = 1
    """CPU threads (and Ray CPUs) per worker."""
    gpus_per_worker: float = -1.0
    """GPUs per worker: -1 = 1 when the cluster has GPUs else 0; 0.5 packs two blocks on one GPU."""
    placement: str = "pack"
    """ray: where block workers go across nodes: pack (fill a node first) or spread (one per node in turn)."""
    max_restarts: int = 2
    """How many times one block's worker may be restarted after it dies before the run fails."""
    epoch_timeout: float = -1.0
    """ray: seconds a unit-epoch may take before its worker is taken for hung (a stopped process, a stuck
    device, a silent peer of its replica group), killed and restarted like a dead one. -1 = auto: 10x the
    unit's slowest epoch so far and at least 120 s (none before its first epoch ends); 0 = never."""
    queue_timeout: float = -1.0
    """ray: seconds a run waits for room for its workers that other jobs hold (a run that could never fit the
    cluster is refused at once) before it stops with one line. -1 = auto: 3600 s on a cluster (--address),
    10 s on a private Ray (the release of its own last run's workers); 0 = no wait."""
    ship_targets: str = "recipe"
    """How the coordinator hands out the noisy targets: recipe (seeded noise spec) or tensors (object store)."""
    local_cpus: int = 0
    """CPUs of the private local Ray (0 = all of this machine's)."""
    local_gpus: int = -1
    """Logical GPUs of the private local Ray (-1 = detect)."""
    sync_batchnorm: bool = True
    """ddp: BatchNorm statistics over the global batch (all-reduced per layer) rather than each worker's share."""


@dataclass(frozen=True)
class Config:
    variant: str = "dt"
    """What to train (registry in noprop_dist.variants.registry): dt (NoProp-DT), ct (NoProp-CT), fm (NoProp-FM), backprop (structure-matched baseline), backprop_cnn."""
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


MAX_EMBED_DIM = 65536
"""Upper bound of model.embed_dim (a learned embedding is classes x embed_dim, copied per unit)."""
MAX_T = 1000
"""Upper bound of schedule.T (DT: one block and one worker per step)."""
MAX_CLASSES = 65536
"""Upper bound of data.max_classes (a one-hot embedding is classes x classes floats)."""
MAX_INPUT_VALUES = 2**22
"""Upper bound of C*H*W of an image (3x1024x1024 fits) and of an embedding's width (a
prototype embedding is C*H*W wide); a run's manifest is checked against both."""

_CHOICES = {
    ("data", "name"): ("mnist_subset", "digits", "mnist", "cifar10", "cifar100", "file"),
    ("data", "layout"): ("auto", "nchw", "nhwc"),
    ("schedule", "kind"): ("cosine", "linear"),
    ("model", "block"): ("paper", "small", "tiny"),
    ("model", "embedding"): ("one_hot", "learned", "prototype"),
    ("cluster", "backend"): ("ray", "local", "ddp"),
    ("cluster", "ship_targets"): ("recipe", "tensors"),
    ("cluster", "placement"): ("pack", "spread"),
    ("train", "embed_sync"): ("average", "summed_gradient"),
    ("train", "lr_schedule"): ("constant", "cosine"),
    ("continuous", "time_sampling"): ("uniform", "antithetic", "snr_importance"),
    ("continuous", "schedule_shape"): ("loss", "variance", "fixed"),
    ("continuous", "schedule_endpoints"): ("loss", "fixed"),
}


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError with the offending key."""
    for path, choices in _CHOICES.items():
        value = cfg
        for part in path:
            value = getattr(value, part)
        if value not in choices:
            raise ConfigError(f"{'.'.join(path)}={value!r} is not one of {', '.join(choices)}")

    find_trainer(cfg.cluster.backend, cfg.variant)  # the variant exists and this backend trains it
    positive = {
        "schedule.T": cfg.schedule.T, "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size, "train.head_passes": cfg.train.head_passes,
        "train.embed_sync_every": cfg.train.embed_sync_every,
        "train.checkpoint_every": cfg.train.checkpoint_every, "train.log_every": cfg.train.log_every,
        "eval.batch_size": cfg.eval.batch_size, "model.embed_dim": cfg.model.embed_dim,
        "data.max_classes": cfg.data.max_classes,
        "continuous.intervals": cfg.continuous.intervals, "continuous.steps": cfg.continuous.steps,
        "continuous.eta": cfg.continuous.eta, "continuous.time_dim": cfg.continuous.time_dim,
        "cluster.threads_per_worker": cfg.cluster.threads_per_worker,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    nonneg = {"train.lr": cfg.train.lr, "train.weight_decay": cfg.train.weight_decay,
              "train.eta": cfg.train.eta, "train.threads": cfg.train.threads,
              "cluster.workers": cfg.cluster.workers, "cluster.max_restarts": cfg.cluster.max_restarts,
              "data.limit_train": cfg.data.limit_train, "eval.every": cfg.eval.every, "data.limit_test": cfg.data.limit_test,
              "cluster.local_cpus": cfg.cluster.local_cpus, "train.seed": cfg.train.seed,
              "schedule.cosine_offset": cfg.schedule.cosine_offset, "continuous.fm_sigma": cfg.continuous.fm_sigma}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must not be negative")
    if cfg.cluster.queue_timeout < 0 and cfg.cluster.queue_timeout != -1:
        raise ConfigError(f"cluster.queue_timeout={cfg.cluster.queue_timeout} must be seconds >= 0 (0: no wait) or "
                          "-1 (auto); e.g. --cluster.queue_timeout=600")
    if cfg.cluster.epoch_timeout < 0 and cfg.cluster.epoch_timeout != -1:
        raise ConfigError(f"cluster.epoch_timeout={cfg.cluster.epoch_timeout} must be seconds > 0, 0 (never) or "
                          "-1 (auto: 10x the slowest epoch, at least 120 s)")
    caps = {"model.embed_dim": (cfg.model.embed_dim, MAX_EMBED_DIM), "train.head_passes": (cfg.train.head_passes, 1000),
            "schedule.T": (cfg.schedule.T, MAX_T), "data.max_classes": (cfg.data.max_classes, MAX_CLASSES),
            "continuous.intervals": (cfg.continuous.intervals, 64), "continuous.steps": (cfg.continuous.steps, 100_000),
            "continuous.time_dim": (cfg.continuous.time_dim, 4096)}
    for key, (value, cap) in caps.items():
        if value > cap:
            raise ConfigError(f"{key}={value} is above its limit of {cap}; pass a smaller value")
    if cfg.continuous.steps < cfg.continuous.intervals:
        raise ConfigError(f"continuous.steps={cfg.continuous.steps} is fewer than continuous.intervals="
                          f"{cfg.continuous.intervals}: some intervals' networks would never be used; pass "
                          f"--continuous.steps={cfg.continuous.intervals} or more")
    c = cfg.continuous
    for key, value in (("continuous.alpha_bar_0", c.alpha_bar_0), ("continuous.alpha_bar_1", c.alpha_bar_1)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value} must be in (0, 1), or 0 for the schedule's own end")
    ab_0 = c.alpha_bar_0 or cfg.schedule.alpha_bar_min
    ab_1 = c.alpha_bar_1 or cfg.schedule.alpha_bar_max
    if not ab_0 < ab_1:
        raise ConfigError(f"CT's initial alpha_bar(0)={ab_0} must be below alpha_bar(1)={ab_1} "
                          "(continuous.alpha_bar_0/_1, 0 = schedule.alpha_bar_min/_max)")
    if cfg.continuous.time_dim % 2:
        raise ConfigError(f"continuous.time_dim={cfg.continuous.time_dim} must be even (sine and cosine halves)")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: BatchNorm needs at least 2 examples per "
                          "step; pass --train.batch_size=2 or more")
    if cfg.train.lr == 0 or cfg.train.eta == 0:
        raise ConfigError("train.lr and train.eta must be positive")
    s = cfg.schedule
    if not 0.0 < s.alpha_bar_min < s.alpha_bar_max < 1.0:
        raise ConfigError(
            f"schedule.alpha_bar_min={s.alpha_bar_min} and alpha_bar_max={s.alpha_bar_max} "
            "must satisfy 0 < min < max < 1")

    try:
        alpha_bar_from_config(s)  # e.g. clips so tight that alpha_bar stops increasing
    except ValueError as exc:
        raise ConfigError(f"schedule.alpha_bar_min/alpha_bar_max: {exc}") from None
    if not 0.0 < cfg.model.dropout < 1.0 and cfg.model.dropout != 0.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} must be in (0, 1)")
    if cfg.data.name == "file" and not cfg.data.path:
        raise ConfigError("data.name=file needs --data.path=FILE (.npz, .parquet or .arrow)")
    g = cfg.cluster.gpus_per_worker
    if g != -1.0 and g < 0:
        raise ConfigError(f"cluster.gpus_per_worker={g} must be -1 (auto), 0, a fraction, or a count")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device={dev!r} must be auto, cpu, cuda or cuda:N")
    if cfg.cluster.backend in ("ray", "ddp"):   # the workers train on what Ray gives them
        if dev.startswith("cuda") and g == 0:
            raise ConfigError(f"train.device={dev} asks for GPU training but cluster.gpus_per_worker=0 gives the "
                              "Ray workers no GPU; pass --cluster.gpus_per_worker=-1 (a GPU each where the cluster "
                              "has them) or --train.device=cpu")
        if dev == "cpu" and g > 0:
            raise ConfigError(f"train.device=cpu but cluster.gpus_per_worker={g:g} reserves GPUs the Ray workers "
                              "would not use; pass --cluster.gpus_per_worker=0 (or -1) or --train.device=auto")


def _coerce(key: str, raw: Any, typ: type) -> Any:
    """Convert a TOML or command-line value to the field's type, or raise ConfigError."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
    elif typ is float:
        value = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw)
            except ValueError:
                pass
        if value is not None and math.isfinite(value):  # nan/inf would slip past range checks
            return value
        if value is not None:
            raise ConfigError(f"{key}={raw!r} is not a finite number")
    elif typ is str:
        if isinstance(raw, str):
            return raw
    raise ConfigError(f"{key}={raw!r} is not a valid {typ.__name__}")


def apply_overrides(cfg: Config, updates: dict[str, Any], origin: str) -> Config:
    """Return ``cfg`` with dotted-key ``updates`` applied (types checked, unknown keys rejected)."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    hints = get_type_hints(Config)
    for key, raw in updates.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in hints and not dataclasses.is_dataclass(hints[parts[0]]):
            top[parts[0]] = _coerce(key, raw, hints[parts[0]])
            continue
        if len(parts) != 2 or parts[0] not in hints or not dataclasses.is_dataclass(hints[parts[0]]):
            raise ConfigError(f"unknown config key {key!r} in {origin}; see `noprop-dist keys` for the list")
        section_type = hints[parts[0]]
        section_hints = get_type_hints(section_type)
        if parts[1] not in section_hints:
            raise ConfigError(f"unknown config key {key!r} in {origin}; see `noprop-dist keys` for the list")
        sections.setdefault(parts[0], {})[parts[1]] = _coerce(key, raw, section_hints[parts[1]])
    changes = dict(top)
    for name, values in sections.items():
        changes[name] = dataclasses.replace(getattr(cfg, name), **values)
    return dataclasses.replace(cfg, **changes)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def resolve(name_or_path: str, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from a preset name (or a TOML path) plus dotted overrides."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(
                f"unknown preset {name_or_path!r}; choose one of {', '.join(preset_names())} or pass a .toml file")
    cfg = apply_overrides(Config(), _flatten(load_toml(path)), str(path))
    cfg = apply_overrides(cfg, overrides or {}, "the command line")
    validate(cfg)
    check_round_trip(cfg)
    return cfg


# Settings whose default changed after runs were written without them: a saved config that
# lacks one trained with the value here (its behaviour then), not with today's default, so a
# --resume, eval or export of such a run continues it as it was trained.
SAVED_BEFORE = {
    ("continuous", "alpha_bar_0"): 0.0,              # issue 17: CT's schedule started at DT's clips
    ("continuous", "alpha_bar_1"): 0.0,
    ("continuous", "schedule_endpoints"): "loss",
    ("continuous", "schedule_shape"): "loss",
}


def worker_request(cfg: Config) -> ClusterConfig:
    """``cfg.cluster`` with the GPU request ``train.device`` implies for Ray workers:
    ``train.device=cpu`` turns the auto request (``gpus_per_worker = -1``: a GPU per worker
    where the cluster has them) into CPU workers. (The contradictory requests are refused by
    :func:`validate`.)"""
    if cfg.train.device == "cpu" and cfg.cluster.gpus_per_worker < 0:
        return dataclasses.replace(cfg.cluster, gpus_per_worker=0.0)
    return cfg.cluster


def from_dict(table: dict[str, Any]) -> Config:
    """Rebuild a Config from its nested-dict form (as saved in a run directory); a setting the
    saved form lacks takes its value from before it existed (:data:`SAVED_BEFORE`), else the
    default."""
    table = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for (section, key), value in SAVED_BEFORE.items():
        if isinstance(table.get(section), dict) and key not in table[section]:
            table[section][key] = value
    cfg = apply_overrides(Config(), _flatten(table), "the saved config")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Serialise a Config as TOML (flat sections of str/int/float/bool only)."""
    lines: list[str] = []
    table = to_dict(cfg)
    for key, value in table.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A TOML basic string: quote, backslash and every control character escaped, so that any
    # string (a path with a newline, a tab, a NUL) reads back as itself.
    escaped = "".join(_TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                      for ch in str(value))
    return f'"{escaped}"'


def check_round_trip(cfg: Config) -> None:
    """Refuse a config whose ``config.toml`` would not read back as itself (what a run writes
    must be readable by ``eval`` and ``--resume``): strings must be valid Unicode text, integers
    must fit TOML's 64 bits."""
    for key, value in _flatten(to_dict(cfg)).items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{key}={value!r} holds bytes that are not UTF-8 text; rename the file or "
                                  "directory to a UTF-8 name") from None
        elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            raise ConfigError(f"{key}={value} does not fit a 64-bit integer")
    text = to_toml(cfg)
    if _flatten(tomllib.loads(text)) != _flatten(to_dict(cfg)):
        raise ConfigError("the config does not read back from TOML as written; this is a bug, please report it")


def describe_keys() -> list[str]:
    """One line per settable key with its default and its doc (for `noprop-dist keys`)."""
    lines = []
    for section in dataclasses.fields(Config):
        section_type = get_type_hints(Config)[section.name]
        if not dataclasses.is_dataclass(section_type):
            lines.append(f"{section.name} = {section.default!r}")
            continue
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(section_type))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = str(nxt.value.value)
        for f in dataclasses.fields(section_type):
            lines.append(f"{section.name}.{f.name} = {f.default!r}  # {docs.get(f.name, '')}")
    return lines
