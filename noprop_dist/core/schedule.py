"""The NoProp math, in one place: noise schedule, SNR weights, posterior coefficients,
closed-form sampling and the KL term. Pure functions; schedule arithmetic in float64.

Indexing convention (stated once, used everywhere; NoProp v1 paper, Eq. 6):

* There are ``T`` blocks, ``t = 1..T``, and latents ``z_0 .. z_T``. Arrays returned by
  :func:`alpha_bar` have length ``T + 1`` and are indexed by ``t = 0..T``.
* ``alpha_bar[t]`` **increases** with ``t``: ``z_0`` is almost pure noise, ``z_T`` almost the
  clean label embedding ``u_y``. The marginal is ``q(z_t | y) = N(sqrt(alpha_bar_t) u_y,
  (1 - alpha_bar_t) I)``.
* ``alpha_bar_t = prod_{s=t..T} alpha_s``, hence ``alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t``.
* Block ``t`` maps ``z_{t-1}`` to a prediction of ``u_y``. Arrays indexed by block
  (:func:`snr_gaps`, :func:`posterior_coefficients`, :func:`dt_loss_weights`) have length
  ``T + 1`` too, with entry 0 unused (NaN), so that ``coef.a[t]`` is block ``t``'s ``a_t``.
* Inference step (Eq. 3): ``z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "alpha_bar", "alpha_bar_from_config", "snr", "snr_gaps", "posterior_coefficients",
    "Coefficients", "dt_loss_weights", "sample_marginal", "marginal_noise", "kl_prior",
]


def alpha_bar(kind: str, T: int, alpha_bar_min: float, alpha_bar_max: float,
              cosine_offset: float = 0.008) -> np.ndarray:
    """alpha_bar_t for t = 0..T (float64, length T+1), strictly increasing in t.

    cosine: the improved-DDPM form ``f(s) = cos^2(((s/T + off) / (1 + off)) * pi/2)``, whose
    ``f(s)/f(0)`` decreases in the diffusion step ``s``; we flip it, ``alpha_bar_t = f(T-t)/f(0)``,
    so signal grows with ``t`` as NoProp needs. linear: alpha_bar linear in t between the clips.
    Both are clipped to ``[alpha_bar_min, alpha_bar_max]``; these clips are hyperparameters
    (the upper one sets the last SNR gap, which can be thousands of times the others).
    """
    if T < 1:
        raise ValueError(f"T={T} must be at least 1")
    if not 0.0 < alpha_bar_min < alpha_bar_max < 1.0:
        raise ValueError("need 0 < alpha_bar_min < alpha_bar_max < 1")
    t = np.arange(T + 1, dtype=np.float64)
    if kind == "cosine":
        def f(s: np.ndarray) -> np.ndarray:
            return np.cos(((s / T + cosine_offset) / (1.0 + cosine_offset)) * math.pi / 2) ** 2
        ab = f(T - t) / f(np.zeros(1))
    elif kind == "linear":
        ab = alpha_bar_min + (alpha_bar_max - alpha_bar_min) * t / T
    else:
        raise ValueError(f"unknown schedule kind {kind!r}")
    ab = np.clip(ab, alpha_bar_min, alpha_bar_max)
    if not np.all(np.diff(ab) > 0):
        raise ValueError(
            f"{kind} schedule with T={T} is not strictly increasing after clipping to "
            f"[{alpha_bar_min}, {alpha_bar_max}]; widen the clip range")
    return ab


def alpha_bar_from_config(cfg) -> np.ndarray:
    """alpha_bar for a :class:`~noprop_dist.config.ScheduleConfig`."""
    return alpha_bar(cfg.kind, cfg.T, cfg.alpha_bar_min, cfg.alpha_bar_max, cfg.cosine_offset)


def snr(ab: np.ndarray) -> np.ndarray:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), t = 0..T (increasing)."""
    return ab / (1.0 - ab)


def snr_gaps(ab: np.ndarray) -> np.ndarray:
    """SNR(t) - SNR(t-1) for blocks t = 1..T (entry 0 is NaN); all positive by construction."""
    s = snr(ab)
    gaps = np.full_like(s, np.nan)
    gaps[1:] = s[1:] - s[:-1]
    # A non-positive gap would turn a block's denoising loss into one that is maximised.
    assert np.all(gaps[1:] > 0), "SNR gaps must be positive: is the schedule reversed?"
    return gaps


def dt_loss_weights(ab: np.ndarray, eta: float) -> np.ndarray:
    """Weight of block t's L2 term in Eq. 8 as used per block step (Algorithm 1):
    ``(T/2) * eta * (SNR(t) - SNR(t-1))``; entry 0 is NaN."""
    T = len(ab) - 1
    return 0.5 * T * eta * snr_gaps(ab)


class Coefficients(NamedTuple):
    """Posterior q(z_t | z_{t-1}, y) = N(a_t u_y + b_t z_{t-1}, c_t I), indexed by block t (entry 0 NaN)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray


def posterior_coefficients(ab: np.ndarray) -> Coefficients:
    """a_t, b_t, c_t of Eq. 6 for t = 1..T, with alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t."""
    a = np.full_like(ab, np.nan)
    b = np.full_like(ab, np.nan)
    c = np.full_like(ab, np.nan)
    ab_t, ab_prev = ab[1:], ab[:-1]
    alpha_prev = ab_prev / ab_t                                   # alpha_{t-1}
    a[1:] = np.sqrt(ab_t) * (1.0 - alpha_prev) / (1.0 - ab_prev)
    b[1:] = np.sqrt(alpha_prev) * (1.0 - ab_t) / (1.0 - ab_prev)
    c[1:] = (1.0 - ab_t) * (1.0 - alpha_prev) / (1.0 - ab_prev)
    return Coefficients(a, b, c)


def marginal_noise(n: int, d: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The standard-normal noise eps (n, d) of one closed-form sample, from its own generator.

    This is the whole "noise recipe": given ``seed`` (derived from run seed, unit, epoch) it
    is the same tensor wherever it is computed, so a coordinator may ship either the seed or
    the tensor. Drawn on the CPU (float32) so that CPU and GPU runs see the same numbers.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float32).to(device)   # (n, d)


def sample_marginal(u_y: torch.Tensor, ab_t: float, eps: torch.Tensor) -> torch.Tensor:
    """z_t ~ q(z_t | y) = sqrt(alpha_bar_t) u_y + sqrt(1 - alpha_bar_t) eps  (Eq. 6)."""
    return math.sqrt(ab_t) * u_y + math.sqrt(1.0 - ab_t) * eps              # (B, d)


def kl_prior(u_y: torch.Tensor, ab_0: float) -> torch.Tensor:
    """Per-example KL( q(z_0|y) || N(0, I) ) of Eq. 8; depends on the embedding only.

    KL(N(m, s^2 I) || N(0, I)) = 0.5 * sum(m^2 + s^2 - 1 - log s^2), m = sqrt(ab_0) u_y, s^2 = 1 - ab_0.
    """
    d = u_y.shape[-1]
    const = d * ((1.0 - ab_0) - 1.0 - math.log(1.0 - ab_0))
    return 0.5 * (ab_0 * (u_y ** 2).sum(-1) + const)                       # (B,)


def denoised_embedding(logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """u_hat = softmax(logits) @ W_embed: a convex mix of class embeddings."""
    return torch.softmax(logits, dim=-1) @ embedding        # (B, d)
