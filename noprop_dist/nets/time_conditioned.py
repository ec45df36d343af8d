"""The time-conditioned network of NoProp-CT/FM and its integrators (inference).

The math (learned schedule, losses, FM interpolation, time partition) is in
:mod:`noprop_dist.core.continuous`. :class:`CTChain` runs the DT step of Eq. 3 on a grid;
:class:`FMChain` integrates with Euler steps from z_0 ~ N(0, I) and predicts the nearest
class embedding. An integration step starting at time ``s`` uses the network of the
interval that contains ``s`` (:func:`~noprop_dist.core.continuous.interval_of`).

Both chains take their noise as an input tensor, so their forward is a pure function that
``torch.export`` can capture; :func:`evaluate_continuous` draws it from a seeded generator and
never builds any ``z`` from a label.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from noprop_dist.core import schedule
from noprop_dist.core.continuous import distance_scores, fm_velocity, interval_of, nearest_embedding
from noprop_dist.core.schedule import denoised_embedding
from noprop_dist.data import ArraySplit, normalize
from noprop_dist.nets.blocks import BlockSize, image_path
from noprop_dist.nets.chain import draw_noise

# --------------------------------------------------------------------------------------------
# Time-conditioned network (CT and FM)
# --------------------------------------------------------------------------------------------

TIME_SCALE = 1000.0
"""t in [0, 1] is multiplied by this before the sinusoidal embedding (the usual diffusion
scale: the fastest frequency then turns ~160 times over [0, 1], the slowest 1e-4 times)."""


def sinusoidal_time_embedding(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Transformer-style embedding of t (B,) -> (B, dim)::

        e = [sin(TIME_SCALE t w_k), cos(TIME_SCALE t w_k)],  w_k = 10000^(-k / (dim/2)),  k = 0..dim/2-1
    """
    if dim % 2:
        raise ValueError(f"time embedding dim={dim} must be even")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)  # (dim/2,)
    args = (TIME_SCALE * t)[:, None] * freqs[None, :]                    # (B, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)          # (B, dim)


def _image_path_without_bn(input_shape: tuple[int, int, int], size: BlockSize, dropout: float) -> nn.Sequential:
    """:func:`models.image_path` (Figure 6) without its final BatchNorm1d: (B, C, H, W) -> (B, width)."""
    layers = list(image_path(input_shape, size, dropout))
    if not isinstance(layers[-1], nn.BatchNorm1d):
        raise AssertionError("models.image_path no longer ends with BatchNorm1d: revisit this wrapper")
    layers = layers[:-1]
    assert not any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in layers)
    return nn.Sequential(*layers)


class TimeConditionedNet(nn.Module):
    """The CT / FM network ``(z, x, t) -> class logits`` (NOPROP.md section 3), no BatchNorm.

    image path: Figure 6's conv path (``models.image_path``) without BN -> (B, width)
    label path: FC-ReLU, plus a residual FC-ReLU-FC                       -> (B, width)
    time path:  sinusoidal embedding (time_dim) -> FC width               -> (B, width)
    fused: concat (3 width) -> FC width -> ReLU -> FC width/2 -> ReLU -> FC m.

    CT reads the logits as ``u_hat = softmax(logits) @ W_embed``; FM as ``v = logits @ W_embed``.
    :meth:`encode_image` / :meth:`from_image_features` split the forward so that an integrator
    can run the (t-independent) image path once per batch instead of once per step.
    """

    def __init__(self, input_shape: tuple[int, int, int], embed_dim: int, num_classes: int,
                 size: BlockSize, dropout: float, time_dim: int = 64):
        super().__init__()
        width = size.width
        self.time_dim = time_dim
        self.image_path = _image_path_without_bn(input_shape, size, dropout)
        self.label_in = nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU())
        self.label_residual = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.time_path = nn.Linear(time_dim, width)
        self.fused = nn.Sequential(
            nn.Linear(3 * width, width), nn.ReLU(),
            nn.Linear(width, width // 2), nn.ReLU(),
            nn.Linear(width // 2, num_classes),
        )

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_path(x)                                        # (B, width)

    def from_image_features(self, z: torch.Tensor, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        label = self.label_in(z)                                         # (B, width)
        label = label + self.label_residual(label)                       # (B, width)
        tim = self.time_path(sinusoidal_time_embedding(t, self.time_dim))  # (B, width)
        return self.fused(torch.cat([image, label, tim], dim=1))         # (B, m) logits

    def forward(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z (B, d), x (B, C, H, W) normalised, t (B,) -> logits (B, m)."""
        return self.from_image_features(z, self.encode_image(x), t)


# --------------------------------------------------------------------------------------------
# Integrators (inference)
# --------------------------------------------------------------------------------------------

def _uses_image_features(net: nn.Module) -> bool:
    return isinstance(net, TimeConditionedNet)


class _IntervalChain(nn.Module):
    """Shared parts of the integrators: the K interval nets, the embedding, the step -> net map,
    and the normalisation buffers ``mean``/``std`` (so :class:`inference.RawImageChain` wraps it)."""

    def __init__(self, nets: list[nn.Module], embedding: torch.Tensor, steps: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        self.nets = nn.ModuleList(nets)
        K = len(self.nets)
        if K < 1:
            raise ValueError("need at least one network")
        self.steps = steps
        # Step s (0-based) starts at t_s = s / S and uses the net of the interval containing t_s.
        self.times: list[float] = [s / steps for s in range(steps)]
        self.net_index: list[int] = [interval_of(t, K) for t in self.times]
        self.register_buffer("embedding", embedding.detach().float().clone())              # (m, d)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def _step_logits(self, s: int, z: torch.Tensor, x: torch.Tensor,
                     features: list[torch.Tensor | None]) -> torch.Tensor:
        """Logits of step s's net at (z, x, t_s) (B, m); image features computed once per net."""
        k = self.net_index[s]
        net = self.nets[k]
        t = torch.full_like(z[:, 0], self.times[s])                      # (B,)
        if _uses_image_features(net):
            if features[k] is None:
                features[k] = net.encode_image(x)
            return net.from_image_features(z, features[k], t)
        return net(z, x, t)


class CTChain(_IntervalChain):
    """NoProp-CT inference: the DT step of Eq. 3 on the grid t_s = s / S, s = 0..S::

        z_0 = noise[0] ~ N(0, I)
        z_s = a_s u_hat(z_{s-1}, x, t_{s-1}) + b_s z_{s-1} + sqrt(c_s) noise[s]     s = 1..S
        logits = head(z_S)

    with ``u_hat = softmax(net_k(z, x, t)) @ W_embed``, ``k = interval_of(t_{s-1}, K)``, and
    a, b, c from :func:`schedule.posterior_coefficients` of ``alpha_bar_grid`` (S+1,), the
    learned schedule on the grid (:meth:`LearnedSchedule.alpha_bar_grid`).
    """

    def __init__(self, nets: list[nn.Module], head: nn.Module, embedding: torch.Tensor,
                 alpha_bar_grid: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]):
        grid = np.asarray(alpha_bar_grid, dtype=np.float64)
        if grid.ndim != 1 or len(grid) < 2 or not np.all(np.diff(grid) > 0):
            raise ValueError("alpha_bar_grid must be a strictly increasing 1-d array of length >= 2")
        super().__init__(nets, embedding, len(grid) - 1, mean, std)
        self.head = head
        coef = schedule.posterior_coefficients(grid)
        self.register_buffer("a", torch.tensor(coef.a[1:], dtype=torch.float32))           # (S,)
        self.register_buffer("b", torch.tensor(coef.b[1:], dtype=torch.float32))           # (S,)
        self.register_buffer("sqrt_c", torch.tensor(np.sqrt(coef.c[1:]), dtype=torch.float32))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) normalised, noise (S+1, B, d) (rows 1..S zero to drop the sqrt(c) term)
        -> head logits (B, m)."""
        return self.head(self.final_latent(x, noise))

    def final_latent(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_S (B, d) of the chain; same arguments as :meth:`forward`."""
        z = noise[0]                                                     # (B, d)
        features: list[torch.Tensor | None] = [None] * len(self.nets)
        for s in range(self.steps):
            u_hat = denoised_embedding(self._step_logits(s, z, x, features), self.embedding)  # (B, d)
            z = self.a[s] * u_hat + self.b[s] * z + self.sqrt_c[s] * noise[s + 1]
        return z


class FMChain(_IntervalChain):
    """NoProp-FM inference: Euler steps of dz/dt = v(z, x, t) from t = 0 to 1::

        z_0 = noise[0] ~ N(0, I)
        z <- z + (1/S) * net_k(z, x, t_s) @ W_embed,   t_s = s / S,  s = 0..S-1
        scores = -||z_1 - u_c||^2   (argmax = nearest class embedding)
    """

    def __init__(self, nets: list[nn.Module], embedding: torch.Tensor, steps: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(nets, embedding, steps, mean, std)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) normalised, noise (1, B, d) -> scores (B, m)."""
        return distance_scores(self.final_latent(x, noise), self.embedding)

    def final_latent(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_1 (B, d) of the Euler integration."""
        z = noise[0]                                                     # (B, d)
        dt = 1.0 / self.steps
        features: list[torch.Tensor | None] = [None] * len(self.nets)
        for s in range(self.steps):
            z = z + dt * fm_velocity(self._step_logits(s, z, x, features), self.embedding)
        return z


def chain_noise(chain: CTChain | FMChain, batch: int, generator: torch.Generator,
                with_noise: bool = True) -> torch.Tensor:
    """The noise input of a chain from ``generator``: CT (S+1, B, d) (rows 1..S zero unless
    ``with_noise``), FM (1, B, d)."""
    d = chain.embedding.shape[1]
    if isinstance(chain, CTChain):
        return draw_noise(chain.steps, batch, d, generator, with_noise)
    if isinstance(chain, FMChain):
        return torch.randn(1, batch, d, generator=generator)
    raise TypeError(f"not a continuous-time chain: {type(chain).__name__}")


@torch.no_grad()
def evaluate_continuous(chain: CTChain | FMChain, split: ArraySplit, batch_size: int, seed: int,
                        device: torch.device | str = "cpu", with_noise: bool = True,
                        max_batch: int | None = None) -> dict:
    """Accuracy of a CT or FM chain on ``split``; labels only score finished predictions.

    Images are normalised with the chain's mean/std as :func:`inference.evaluate` does. The
    noise is drawn per ``batch_size`` examples from one CPU generator seeded with ``seed``
    (:func:`chain_noise`; for CT it is (S+1) * batch_size * d floats, so lower ``batch_size``
    for large d); ``max_batch`` splits each batch into forward passes without changing any
    draw. ``with_noise`` is the Eq. 3 noise of CT (FM has none).

    Returns ``accuracy`` (CT: the head's argmax; FM: the nearest embedding), ``nearest_accuracy``
    (nearest class embedding to the final latent, both), ``seconds``, ``images_per_s``.
    """
    chain = chain.to(device).eval()
    n = len(split)
    mean = tuple(chain.mean.flatten().tolist())
    std = tuple(chain.std.flatten().tolist())
    gen = torch.Generator().manual_seed(seed)
    step = min(batch_size, max_batch or batch_size)
    head_pred, nearest_pred = [], []
    start_time = time.perf_counter()
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = chain_noise(chain, b, gen, with_noise)                   # (S+1 or 1, b, d)
        for lo in range(0, b, step):
            hi = min(b, lo + step)
            x = normalize(np.asarray(split.x[start + lo:start + hi]), mean, std).to(device)
            z = chain.final_latent(x, noise[:, lo:hi].to(device))        # (b', d)
            nearest = nearest_embedding(z, chain.embedding)
            nearest_pred.append(nearest.cpu())
            head_pred.append((chain.head(z).argmax(-1) if isinstance(chain, CTChain) else nearest).cpu())
    seconds = time.perf_counter() - start_time
    y = torch.from_numpy(np.array(split.y))
    return {
        "accuracy": float((torch.cat(head_pred) == y).float().mean()) if n else float("nan"),
        "nearest_accuracy": float((torch.cat(nearest_pred) == y).float().mean()) if n else float("nan"),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "with_noise": bool(with_noise),
        "steps": chain.steps,
    }
