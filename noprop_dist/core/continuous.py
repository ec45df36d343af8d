"""NoProp-CT (continuous time) and NoProp-FM (flow matching): the math.

The learned schedule, the losses, the FM interpolation and the time partition; the
network and the integrators are in :mod:`noprop_dist.nets.time_conditioned`. Same convention
as :mod:`noprop_dist.core.schedule` (NOPROP.md sections 1 and 3): time ``t`` runs over ``[0, 1]``,
``t = 0`` is noise and ``t = 1`` the clean label embedding ``u_y = W_embed[y]``.

CT (Eq. 9), one time-conditioned network ``u_hat(z_t, x, t)`` trained with::

    t ~ U(0, 1),  z_t = sqrt(alpha_bar(t)) u_y + sqrt(1 - alpha_bar(t)) eps
    L = CE(head(z_1), y) + KL(q(z_0|y) || N(0, I)) + 0.5 * eta * SNR'(t) * ||u_hat - u_y||^2

with the learned schedule ``SNR(t) = exp(-gamma(t))``, ``gamma`` decreasing by construction
(:class:`LearnedSchedule`). ``t`` may also be drawn antithetically or by importance
(:func:`draw_times`, the expectation kept); the schedule's shape may be trained on the
estimator's second moment (VDM; :class:`GradScale`). Inference (:class:`CTChain`) runs the DT
step of Eq. 3 on a grid.

FM (Eqs. 10-13)::

    z_t = t u_y + (1 - t) z_0,  target velocity u_y - z_0,  v = logits @ W_embed (no softmax)
    L = ||v(z_t, x, t) - (u_y - z_0)||^2  (+ anchor -log p_out(y | z_t + (1 - t) v), learned W_embed)

Inference (:class:`FMChain`) integrates with Euler steps from z_0 ~ N(0, I) and predicts the
nearest class embedding.

Time partition: ``[0, 1]`` is split into ``K`` equal intervals (:func:`interval_bounds`), one
network per interval; an integration step starting at time ``s`` uses the network of the
interval that contains ``s`` (:func:`interval_of`). ``K = 1`` is the paper's single network.

Both chains take their noise as an input tensor, so their forward is a pure function that
``torch.export`` can capture; :func:`evaluate_continuous` draws it from a seeded generator and
never builds any ``z`` from a label.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noprop_dist.core.schedule import denoised_embedding

# --------------------------------------------------------------------------------------------
# Learned noise schedule (CT)
# --------------------------------------------------------------------------------------------

def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0, stable for large and small y."""
    if y <= 0:
        raise ValueError(f"softplus is positive; cannot invert {y}")
    return y + math.log(-math.expm1(-y))                 # log(exp(y) - 1)


class LearnedSchedule(nn.Module):
    """NoProp-CT's learned schedule ``SNR(t) = exp(-gamma(t))``, ``t`` in ``[0, 1]``.

    Signal grows with ``t``, so ``gamma`` is strictly **decreasing**, by construction (no clamp).
    A VDM-style monotone network with positive weights (``softplus`` of raw parameters)::

        l1(t) = w1 t + b1                          w1 > 0
        f(t)  = l1(t) + w3 . sigmoid(w2 l1(t) + b2)   w2, w3 > 0 (H-vectors); no bias on w3 (it cancels)
        g~(t) = (f(t) - f(0)) / (f(1) - f(0))      strictly increasing, g~(0) = 0, g~(1) = 1
        gamma(t) = gamma_0 - (gamma_0 - gamma_1) g~(t),   gamma_1 = gamma_0 - softplus(raw_gap)

    so ``gamma_0 > gamma_1`` too. ``alpha_bar = sigmoid(-gamma)`` (from ``SNR = ab / (1 - ab)``);
    the endpoints start at ``alpha_bar(0) = alpha_bar_min`` and ``alpha_bar(1) = alpha_bar_max``
    and are trainable. ``SNR'(t) = (gamma_0 - gamma_1) g~'(t) SNR(t) > 0`` is analytic
    (:meth:`snr_derivative`), differentiable in every parameter.

    All methods take ``t`` of shape (B,) and return (B,), in the parameters' dtype.
    """

    def __init__(self, alpha_bar_min: float, alpha_bar_max: float, hidden: int = 64):
        super().__init__()
        if not 0.0 < alpha_bar_min < alpha_bar_max < 1.0:
            raise ValueError("need 0 < alpha_bar_min < alpha_bar_max < 1")
        gamma_0 = math.log((1.0 - alpha_bar_min) / alpha_bar_min)      # -logit(alpha_bar_min)
        gamma_1 = math.log((1.0 - alpha_bar_max) / alpha_bar_max)
        self.gamma_0 = nn.Parameter(torch.tensor(gamma_0))
        self.raw_gap = nn.Parameter(torch.tensor(_inverse_softplus(gamma_0 - gamma_1)))
        # w1 = 1 and small sigmoid weights: g~ starts close to linear (log-SNR linear in t).
        self.raw_w1 = nn.Parameter(torch.tensor(_inverse_softplus(1.0)))
        self.b1 = nn.Parameter(torch.zeros(()))
        self.raw_w2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.b2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.raw_w3 = nn.Parameter(torch.randn(hidden) * 0.5 - 4.0)

    def gamma_1(self) -> torch.Tensor:
        return self.gamma_0 - F.softplus(self.raw_gap)                 # () < gamma_0

    def _hidden(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """l1(t) (B,) and h = sigmoid(w2 l1 + b2) (B, H)."""
        l1 = F.softplus(self.raw_w1) * t + self.b1                       # (B,)
        h = torch.sigmoid(l1[:, None] * F.softplus(self.raw_w2)[None, :] + self.b2[None, :])  # (B, H)
        return l1, h

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        l1, h = self._hidden(t)
        return l1 + h @ F.softplus(self.raw_w3)                          # (B,)

    def _f_range(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(0) and f(1) - f(0) (> 0), as 0-d tensors."""
        ends = self._f(torch.tensor([0.0, 1.0], dtype=like.dtype, device=like.device))
        return ends[0], ends[1] - ends[0]

    def normalized(self, t: torch.Tensor) -> torch.Tensor:
        """g~(t) in [0, 1], strictly increasing; 0 at t = 0 and 1 at t = 1 (to float rounding)."""
        f0, span = self._f_range(t)
        return (self._f(t) - f0) / span                                  # (B,)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t) = -log SNR(t), strictly decreasing in t. (B,) -> (B,)."""
        gap = F.softplus(self.raw_gap)
        return self.gamma_0 - gap * self.normalized(t)                   # (B,)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar(t) = sigmoid(-gamma(t)), increasing in t. (B,) -> (B,)."""
        return torch.sigmoid(-self.gamma(t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = exp(-gamma(t)) = alpha_bar / (1 - alpha_bar). (B,) -> (B,)."""
        return torch.exp(-self.gamma(t))

    def snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """dSNR/dt = (gamma_0 - gamma_1) * g~'(t) * SNR(t) > 0, analytic. (B,) -> (B,).

        g~'(t) = f'(t) / (f(1) - f(0)),  f'(t) = w1 (1 + sum_j w3_j w2_j h_j (1 - h_j)).
        """
        _, h = self._hidden(t)                                           # (B, H)
        w1, w2, w3 = F.softplus(self.raw_w1), F.softplus(self.raw_w2), F.softplus(self.raw_w3)
        f_prime = w1 * (1.0 + (h * (1.0 - h)) @ (w2 * w3))               # (B,)
        _, span = self._f_range(t)
        return F.softplus(self.raw_gap) * f_prime / span * self.snr(t)   # (B,)

    @torch.no_grad()
    def time_of_snr(self, snr: torch.Tensor, iterations: int = 60) -> torch.Tensor:
        """The t in [0, 1] with SNR(t) = snr (B,) -> (B,), by bisection on the strictly
        increasing g~ (no gradient: a sampling device). ``snr`` must lie in [SNR(0), SNR(1)]."""
        gap = F.softplus(self.raw_gap)
        target = ((self.gamma_0 + torch.log(snr)) / gap).clamp(0.0, 1.0)   # g~(t) = (gamma_0 - gamma(t)) / gap
        lo, hi = torch.zeros_like(snr), torch.ones_like(snr)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            below = self.normalized(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def alpha_bar_and_snr_derivative(self, t: torch.Tensor, shape_grad: "GradScale | None" = None
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_bar(t) and SNR'(t), (B,) each, as :meth:`alpha_bar` and :meth:`snr_derivative`.

        ``shape_grad``: the per-example factor by which the gradient that reaches the shape
        g~ is multiplied in the backward pass (VDM's variance objective for the shape: with
        factor 2 l_b on a loss mean_b(l_b), the shape's gradient is that of mean_b(l_b^2));
        the endpoints' gradient is left as it is."""
        l1, h = self._hidden(t)                                          # (B,), (B, H)
        w1, w2, w3 = F.softplus(self.raw_w1), F.softplus(self.raw_w2), F.softplus(self.raw_w3)
        f0, span = self._f_range(t)
        g = (l1 + h @ w3 - f0) / span                                    # (B,) g~(t)
        g_prime = w1 * (1.0 + (h * (1.0 - h)) @ (w2 * w3)) / span       # (B,) g~'(t)
        if shape_grad is not None:
            g, g_prime = shape_grad(g), shape_grad(g_prime)
        gap = F.softplus(self.raw_gap)
        gamma = self.gamma_0 - gap * g                                   # (B,)
        return torch.sigmoid(-gamma), gap * g_prime * torch.exp(-gamma)

    def shape_parameters(self) -> list[nn.Parameter]:
        """The parameters of g~ (the shape between the endpoints), not gamma_0 or the gap."""
        return [self.raw_w1, self.b1, self.raw_w2, self.b2, self.raw_w3]

    @torch.no_grad()
    def alpha_bar_grid(self, steps: int) -> np.ndarray:
        """alpha_bar(s / steps) for s = 0..steps, float64 (steps + 1,), strictly increasing:
        the grid :class:`CTChain` integrates on. Evaluated on a float64 copy, so that the
        posterior coefficients of neighbouring fine-grid points stay well defined."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        double = copy.deepcopy(self).double().cpu()
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        ab = double.alpha_bar(t).numpy()
        if not np.all(np.diff(ab) > 0):
            raise ValueError(f"alpha_bar is not strictly increasing in float64 on a {steps}-step grid; "
                             "use fewer steps or a less saturated schedule")
        return ab


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``box.scale`` (set after the forward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, box: "GradScale") -> torch.Tensor:
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.box.scale, None


class GradScale:
    """A per-example gradient factor decided after the forward pass (:meth:`set`), applied
    in the backward pass to every tensor passed through it (``box(x)``)."""

    def __init__(self):
        self.scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(x, self)

    def set(self, scale: torch.Tensor) -> None:
        self.scale = scale.detach()


# --------------------------------------------------------------------------------------------
# How CT draws t (docs/ct.md)
# --------------------------------------------------------------------------------------------

TIME_SAMPLING = ("uniform", "antithetic", "snr_importance")


def draw_times(uniform: torch.Tensor, lo: float, hi: float, method: str,
               sched: LearnedSchedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's t in [lo, hi) and the weight that keeps Eq. 9's expectation:
    ``(t (B,), weight (B,))`` from ``uniform`` (B,), draws in [0, 1).

    * ``uniform``: ``t = lo + (hi - lo) u``, weight 1 (the paper's t ~ U).
    * ``antithetic``: VDM's low-discrepancy draw, ``t_b = lo + (hi - lo) frac(u_0 + b / B)``:
      one uniform per batch, the batch spread evenly over the interval; weight 1 (each t_b is
      still uniform, so the estimate stays unbiased, with less variance).
    * ``snr_importance``: SNR(t) uniform between SNR(lo) and SNR(hi), i.e. t with density
      ``p(t) = SNR'(t) / (SNR(hi) - SNR(lo))``; weight ``1 / ((hi - lo) p(t))`` (no gradient),
      so ``weight * SNR'(t) * error`` keeps the expectation of the uniform draw and its
      gradient in the schedule.
    """
    width = hi - lo
    if method == "uniform":
        return lo + width * uniform, torch.ones_like(uniform)
    if method == "antithetic":
        b = torch.arange(len(uniform), dtype=uniform.dtype, device=uniform.device)
        return lo + width * torch.remainder(uniform[0] + b / len(uniform), 1.0), torch.ones_like(uniform)
    if method == "snr_importance":
        if sched is None:
            raise ValueError("snr_importance needs the learned schedule")
        with torch.no_grad():
            ends = sched.snr(torch.tensor([lo, hi], dtype=uniform.dtype, device=uniform.device))
            t = sched.time_of_snr(ends[0] + uniform * (ends[1] - ends[0])).clamp(lo, hi)
            weight = (ends[1] - ends[0]) / (width * sched.snr_derivative(t))
        return t, weight
    raise ValueError(f"unknown time sampling {method!r}; one of {', '.join(TIME_SAMPLING)}")


# --------------------------------------------------------------------------------------------
# CT losses (Eq. 9)
# --------------------------------------------------------------------------------------------

def ct_denoise_loss(logits: torch.Tensor, embedding: torch.Tensor, u_y: torch.Tensor,
                    snr_prime: torch.Tensor, eta: float, weight: torch.Tensor | None = None,
                    shape_grad: GradScale | None = None) -> torch.Tensor:
    """mean_b( w_b * 0.5 * eta * SNR'(t_b) * ||softmax(logits_b) @ W_embed - u_y_b||^2 ) -> scalar.

    logits (B, m), embedding (m, d), u_y (B, d), snr_prime (B,) (> 0; keep its graph to train
    the schedule), weight (B,) the importance weight of t's draw (:func:`draw_times`; None = 1).
    ``shape_grad``: the :class:`GradScale` the schedule's shape went through
    (:meth:`LearnedSchedule.alpha_bar_and_snr_derivative`); set here to ``2 l_b``, so the
    shape is trained on the estimator's second moment ``mean_b(l_b^2)`` (VDM, Sec. 5.2:
    the loss's expectation does not depend on the shape, only its variance does).
    """
    err = (denoised_embedding(logits, embedding) - u_y).pow(2).sum(-1)  # (B,)
    per_example = 0.5 * eta * snr_prime * err                            # (B,)
    if weight is not None:
        per_example = weight * per_example
    if shape_grad is not None:
        shape_grad.set(2.0 * per_example)
    return per_example.mean()


def sample_ct_marginal(u_y: torch.Tensor, alpha_bar_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(ab_t) u_y + sqrt(1 - ab_t) eps; u_y, eps (B, d), ab_t (B,); differentiable in ab_t."""
    ab = alpha_bar_t[:, None]                                            # (B, 1)
    return torch.sqrt(ab) * u_y + torch.sqrt(1.0 - ab) * eps             # (B, d)


def ct_head_loss(head_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log p_out(y | z_1), mean over the batch; head_logits (B, m) of z_1 ~ q(z_1 | y)."""
    return F.cross_entropy(head_logits, y)


def kl_prior_continuous(u_y: torch.Tensor, ab_0: torch.Tensor) -> torch.Tensor:
    """KL( N(sqrt(ab_0) u_y, (1 - ab_0) I) || N(0, I) ) per example, (B, d) -> (B,).

    0.5 * (ab_0 ||u_y||^2 + d ((1 - ab_0) - 1 - log(1 - ab_0))); ``ab_0`` a 0-d tensor
    (e.g. ``schedule.alpha_bar(t=0)``), differentiable. Same value as :func:`schedule.kl_prior`.
    """
    d = u_y.shape[-1]
    const = d * (-ab_0 - torch.log1p(-ab_0))
    return 0.5 * (ab_0 * u_y.pow(2).sum(-1) + const)                     # (B,)


# --------------------------------------------------------------------------------------------
# FM (Eqs. 10-13)
# --------------------------------------------------------------------------------------------

def fm_interpolate(z0: torch.Tensor, u_y: torch.Tensor, t: torch.Tensor,
                   sigma: float = 0.0, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z_t = t u_y + (1 - t) z_0 (+ sigma eps, the Gaussian path N(., sigma^2 I) of Eq. 10);
    z0, u_y, eps (B, d), t (B,) -> (B, d). The target velocity is u_y - z_0 either way."""
    tt = t[:, None]
    z_t = tt * u_y + (1.0 - tt) * z0
    if sigma:
        z_t = z_t + sigma * eps
    return z_t


def fm_target(z0: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """Target velocity d z_t / dt = u_y - z_0 (B, d)."""
    return u_y - z0


def fm_velocity(logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """v = logits @ W_embed (no softmax): (B, m) x (m, d) -> (B, d)."""
    return logits @ embedding


def fm_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b ||v_b - target_b||^2 -> scalar."""
    return (v - target).pow(2).sum(-1).mean()


def distance_scores(z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """-||z - u_c||^2 for every class: (B, d), (m, d) -> (B, m)."""
    return -(z[:, None, :] - embedding[None, :, :]).pow(2).sum(-1)


def fm_anchor_loss(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    """Anchor term -log p_out(y | z~_1), mean over the batch, with the one-step extrapolation
    ``z~_1 = z_t + (1 - t) v`` and ``p_out(c | z) = softmax_c(-||z - u_c||^2)``.

    The paper does not define p_out for FM; its prediction rule is the nearest class
    embedding, so this project reads p_out as the matching softmax over negative squared
    distances. It pulls z~_1 to u_y and pushes it from the other u_c, which keeps a learned
    embedding from collapsing. z_t, v (B, d), t (B,), embedding (m, d), y (B,).
    """
    z1 = z_t + (1.0 - t)[:, None] * v                                    # (B, d)
    return F.cross_entropy(distance_scores(z1, embedding), y)


def nearest_embedding(z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """argmin_c ||z - u_c||: (B, d), (m, d) -> (B,) class indices."""
    return torch.cdist(z, embedding).argmin(-1)


# --------------------------------------------------------------------------------------------
# Time partition
# --------------------------------------------------------------------------------------------

def interval_bounds(K: int) -> list[tuple[float, float]]:
    """K equal intervals [k/K, (k+1)/K) of [0, 1] (the last one closed at 1)."""
    if K < 1:
        raise ValueError(f"K={K} must be at least 1")
    return [(k / K, (k + 1) / K) for k in range(K)]


def interval_of(t: float, K: int) -> int:
    """The 0-based interval k with k/K <= t < (k+1)/K; t = 1.0 belongs to the last one.

    Decided by the same float bounds as :func:`interval_bounds`, so a time equal to a bound
    belongs to the interval that starts there."""
    if K < 1:
        raise ValueError(f"K={K} must be at least 1")
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t} is outside [0, 1]")
    k = min(int(math.floor(t * K)), K - 1)
    # floor(t * K) can be one off near a bound; correct it against the bounds themselves.
    if k + 1 < K and t >= (k + 1) / K:
        k += 1
    elif k > 0 and t < k / K:
        k -= 1
    return k


