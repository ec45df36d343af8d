"""Tests that pin the NoProp math down through the code that uses it (NOPROP.md sections 1-2).

test_schedule.py checks the stored coefficients; here they are checked in use: the inference
loop with perfect denoisers must reproduce the marginals q(z_t | y) and the joint of consecutive
latents, b_t and c_t must be the conditional of the forward process's Gaussian joint, the head
and each block must train on the right alpha_bar, and the embedding initialisations must keep
their documented properties. Monte Carlo tolerances are 5 standard errors at a fixed seed.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noprop_dist.core import schedule
from noprop_dist.data import load_dataset
from noprop_dist.nets.chain import NoPropChain
from noprop_dist.nets.blocks import class_medoids, denoised_embedding, initial_embedding
from noprop_dist.variants.base import HEAD
from noprop_dist.variants.dt import block
from noprop_dist.variants.base import make_setup
from noprop_dist.training.runner import UnitRunner

# softmax of (ORACLE_LOGIT, 0, ...) in float32 is exactly one-hot: exp(-1e4) underflows to 0.
ORACLE_LOGIT = 1e4
# Three classes in d = 4 with rows of different norms and signs, so that a wrong mean
# coefficient (sqrt(alpha_bar) of another step, alpha_bar without the root) shows per class.
EMBEDDING = torch.tensor([[1.5, -1.0, 0.5, 0.0],
                          [0.0, 2.0, -0.5, 1.0],
                          [-1.0, 0.0, 0.0, -2.0]])
N_SAMPLES = 240_000
SIGMAS = 5.0


def forward_joint(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean coefficients and covariance of (z_0 .. z_T) given y, built from the forward
    (noising) kernel alone, independently of :func:`schedule.posterior_coefficients`.

    The noising runs from z_T towards z_0: ``z_T = sqrt(ab_T) u_y + sqrt(1 - ab_T) xi_T`` and
    ``z_{t-1} = sqrt(alpha_{t-1}) z_t + sqrt(1 - alpha_{t-1}) xi_{t-1}`` with
    ``alpha_{t-1} = ab_{t-1} / ab_t`` and independent xi ~ N(0, 1) (per dimension). Writing each
    z_t as ``mean[t] * u_y + L[t] @ xi`` gives the joint ``N(mean u_y, L L^T)``.
    """
    T = len(ab) - 1
    mean = np.zeros(T + 1)
    L = np.zeros((T + 1, T + 1))
    mean[T], L[T, T] = math.sqrt(ab[T]), math.sqrt(1 - ab[T])
    for t in range(T, 0, -1):
        alpha_prev = ab[t - 1] / ab[t]
        mean[t - 1] = math.sqrt(alpha_prev) * mean[t]
        L[t - 1] = math.sqrt(alpha_prev) * L[t]
        L[t - 1, t - 1] = math.sqrt(1 - alpha_prev)
    return mean, L @ L.T


# ------------------------------------------------------------------ posterior = conditional of the joint

@pytest.mark.parametrize("clip", [(1e-4, 0.9999), (1e-3, 0.999)], ids=lambda c: f"clip{c[0]}-{c[1]}")
@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [2, 4, 10])
def test_posterior_coefficients_are_the_conditional_of_the_forward_joint(T, kind, clip):
    """E[z_t | z_0..z_{t-1}, y] = a_t u_y + b_t z_{t-1} and Var = c_t, by Gaussian conditioning
    of the forward joint: the regression coefficients of z_t on (z_0..z_{t-1}) are
    Sigma_{<t,<t}^{-1} Sigma_{<t,t}; the one on z_{t-1} must be b_t and all earlier ones 0
    (Markov); a_t = mean_t - beta . mean_{<t}; c_t is the Schur complement."""
    ab = schedule.alpha_bar(kind, T, *clip)
    coef = schedule.posterior_coefficients(ab)
    mean, cov = forward_joint(ab)
    np.testing.assert_allclose(mean, np.sqrt(ab), rtol=0, atol=1e-12)       # Eq. 6 marginals
    np.testing.assert_allclose(np.diag(cov), 1 - ab, rtol=0, atol=1e-12)
    for t in range(1, T + 1):
        beta = np.linalg.solve(cov[:t, :t], cov[:t, t])                      # (t,)
        np.testing.assert_allclose(beta[:-1], 0.0, rtol=0, atol=1e-12)
        assert beta[-1] == pytest.approx(coef.b[t], rel=0, abs=1e-12)
        # With only z_{t-1}: b_t = Cov(z_t, z_{t-1}) / Var(z_{t-1}).
        assert cov[t - 1, t] / cov[t - 1, t - 1] == pytest.approx(coef.b[t], rel=0, abs=1e-12)
        assert mean[t] - beta @ mean[:t] == pytest.approx(coef.a[t], rel=0, abs=1e-12)
        assert cov[t, t] - cov[t, :t] @ beta == pytest.approx(coef.c[t], rel=0, abs=1e-12)


# ------------------------------------------------------------------ the chain with oracle denoisers

class OracleBlock(nn.Module):
    """A perfect denoiser: all softmax mass on the true class, read from the chain's image
    argument (here the label vector). Records its input, which for block t is z_{t-1}."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.inputs: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.detach().clone())
        return ORACLE_LOGIT * F.one_hot(y, self.num_classes).to(z.dtype)     # (B, m)


def oracle_chain_latents(ab: np.ndarray, y: torch.Tensor, seed: int) -> torch.Tensor:
    """(T+1, n, d) latents z_0..z_T of NoPropChain with oracle blocks, started from
    z_0 ~ q(z_0 | y) (Eq. 3 starts from N(0, I), which differs from it by the tiny prior KL)."""
    T, (m, d) = len(ab) - 1, EMBEDDING.shape
    blocks = [OracleBlock(m) for _ in range(T)]
    chain = NoPropChain(blocks, nn.Identity(), EMBEDDING, ab, mean=(0.0,), std=(1.0,))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(T + 1, len(y), d, generator=gen)                     # (T+1, n, d)
    noise[0] = schedule.sample_marginal(EMBEDDING[y], float(ab[0]), noise[0])
    with torch.no_grad():
        z_T = chain(y, noise)                                                # (n, d): the head is the identity
    latents = [block.inputs[0] for block in blocks] + [z_T]
    assert torch.equal(latents[0], noise[0])
    return torch.stack(latents)


def assert_within(estimate: torch.Tensor, expected: torch.Tensor, se: float, what: str) -> None:
    err = (estimate - expected).abs()
    assert torch.all(err < SIGMAS * se), f"{what}: |error| {err.max():.3g} >= {SIGMAS} SE ({se:.3g})"


def test_oracle_block_returns_u_y_exactly():
    """The premise of the oracle test: softmax(logits) @ W_embed is exactly u_y in float32."""
    y = torch.arange(12) % 3
    u_hat = denoised_embedding(OracleBlock(3)(torch.zeros(12, 4), y), EMBEDDING)
    assert torch.equal(u_hat, EMBEDDING[y])


@pytest.mark.parametrize("kind,T", [("cosine", 10), ("linear", 4)])
def test_oracle_chain_reproduces_the_marginals_and_their_joint(kind, T):
    """NoPropChain's own loop (Eq. 3) with blocks that return u_y exactly is ancestral sampling
    from q(z_t | z_{t-1}, y), so for every t (z_0 fed from q(z_0 | y)):

    * E[z_t | y] = sqrt(ab_t) u_y (per class and dimension),
    * Cov(z_t | y) = (1 - ab_t) I,
    * Cov(z_{t-1}, z_t | y) = b_t (1 - ab_{t-1}) = sqrt(ab_{t-1} / ab_t) (1 - ab_t) per dimension:
      the first form is the posterior step, the second the forward (noising) step
      z_{t-1} = sqrt(alpha_{t-1}) z_t + sqrt(1 - alpha_{t-1}) xi; the test compares against the
      second, so it does not take a_t, b_t, c_t from the code it checks.

    Standard errors for n samples: mean sqrt(var / n); variance (known mean) var sqrt(2 / n);
    off-diagonal covariance var / sqrt(n); cross-covariance s_{t-1} s_t sqrt((1 + rho^2) / n).
    """
    ab = schedule.alpha_bar(kind, T, 1e-4, 0.9999)
    y = torch.arange(N_SAMPLES) % 3                                           # (n,)
    z = oracle_chain_latents(ab, y, seed=0).double()                          # (T+1, n, d)
    u = EMBEDDING.double()
    d = u.shape[1]
    residual = z - torch.sqrt(torch.from_numpy(ab)).view(-1, 1, 1) * u[y]     # (T+1, n, d)
    for t in range(T + 1):
        var = 1 - ab[t]
        for k in range(3):
            n_k = int((y == k).sum())
            assert_within(z[t, y == k].mean(0), math.sqrt(ab[t]) * u[k], math.sqrt(var / n_k),
                          f"mean of z_{t} for class {k}")
        cov = residual[t].T @ residual[t] / N_SAMPLES                          # (d, d)
        assert_within(torch.diagonal(cov), torch.full((d,), var, dtype=torch.float64),
                      var * math.sqrt(2 / N_SAMPLES), f"variance of z_{t}")
        off = cov[~torch.eye(d, dtype=torch.bool)]
        assert_within(off, torch.zeros_like(off), var / math.sqrt(N_SAMPLES), f"cross-dimension covariance of z_{t}")
        if t == 0:
            continue
        expected = math.sqrt(ab[t - 1] / ab[t]) * var
        rho = expected / math.sqrt((1 - ab[t - 1]) * var)
        cross = (residual[t - 1] * residual[t]).mean(0)                       # (d,)
        assert_within(cross, torch.full((d,), expected, dtype=torch.float64),
                      math.sqrt((1 - ab[t - 1]) * var * (1 + rho**2) / N_SAMPLES),
                      f"Cov(z_{t - 1}, z_{t})")


# ------------------------------------------------------------------ which alpha_bar each unit trains on

@pytest.fixture(scope="module")
def small(tiny_config):
    """(dataset, setup) of the tiny preset (T = 4, one-hot) on the first 256 digits."""
    cfg = tiny_config({"data.limit_train": "256"})
    data = load_dataset(cfg.data)
    return data, make_setup(cfg, data)


def recorded_inputs(runner: UnitRunner, noise: torch.Tensor) -> torch.Tensor:
    """Every z the unit's module is fed during one epoch run with the given noise, (N, d)."""
    seen: list[torch.Tensor] = []
    handle = runner.module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    try:
        runner.run_epoch(1, noise=noise)
    finally:
        handle.remove()
    return torch.cat(seen)


def assert_sampled_with(z: torch.Tensor, ab_t: float, eps_value: float, labels: np.ndarray) -> None:
    """One-hot embedding and constant noise eps: every row of z is sqrt(ab_t) e_y + sqrt(1-ab_t) eps,
    i.e. sqrt(ab_t) + c on the label's entry and c = sqrt(1 - ab_t) eps elsewhere (float32)."""
    off = torch.tensor(math.sqrt(1 - ab_t) * eps_value, dtype=torch.float32)
    on = torch.tensor(math.sqrt(ab_t), dtype=torch.float32) + off
    is_on = z == on
    assert torch.all(is_on.sum(1) == 1), "each input has exactly one entry sqrt(ab_t) + sqrt(1-ab_t) eps"
    assert torch.all(z[~is_on] == off)
    # Each pass feeds every training example once: the labels read off z are the split's labels.
    counts = torch.bincount(is_on.float().argmax(1), minlength=z.shape[1])
    passes = len(z) // len(labels)
    assert torch.equal(counts, passes * torch.bincount(torch.tensor(labels), minlength=z.shape[1]))


@pytest.mark.parametrize("eps_value", [0.0, 1.0])
def test_head_trains_on_z_T_with_alpha_bar_T(small, eps_value):
    """The head's inputs are z_T ~ q(z_T | y) with alpha_bar_T = alpha_bar[T] (the chain's last
    latent), not alpha_bar[T-1]: fed constant noise (the public ``noise`` argument of run_epoch),
    each input is exactly sqrt(ab_T) e_y + sqrt(1 - ab_T) eps."""
    data, setup = small
    ab = np.array(setup.alpha_bar)
    runner = UnitRunner(HEAD, setup, data.train)
    noise = torch.full((setup.train.head_passes, len(data.train), data.num_classes), eps_value)
    z = recorded_inputs(runner, noise)
    assert len(z) == setup.train.head_passes * len(data.train)
    assert_sampled_with(z, ab[setup.T], eps_value, np.asarray(data.train.y))
    assert math.sqrt(ab[setup.T - 1]) < math.sqrt(ab[setup.T]) - 0.05  # the two candidates differ


@pytest.mark.parametrize("unit", [1, 4])
def test_block_t_trains_on_z_t_minus_1(small, unit):
    """Block t's inputs are z_{t-1} ~ q(z_{t-1} | y) with alpha_bar[t-1] (first and last block)."""
    data, setup = small
    assert setup.T == 4
    ab = np.array(setup.alpha_bar)
    runner = UnitRunner(block(unit), setup, data.train)
    z = recorded_inputs(runner, torch.ones(len(data.train), data.num_classes))
    assert_sampled_with(z, ab[unit - 1], 1.0, np.asarray(data.train.y))


# ------------------------------------------------------------------ embedding initialisations

def median_medoid(points: np.ndarray) -> int:
    """Brute force: the index whose median distance to the *other* points is smallest."""
    dist = np.linalg.norm(points[:, None] - points[None, :], axis=-1)        # (n, n)
    scores = [np.median(np.delete(dist[i], i)) for i in range(len(points))]
    return int(np.argmin(scores))


def test_class_medoids_minimise_the_median_distance():
    """Per class, the image whose median distance to the other images of its class is smallest
    (Sec. 2.2.1; NOPROP.md). Every class has an even size, so the median of the other distances
    is a single value. The last class is a hand-made set where this criterion (point 0) and the
    sum of distances (point 1) disagree, so the test tells the two apart."""
    gen = torch.Generator().manual_seed(0)
    sizes = (4, 6, 8, 10)
    x = [torch.randn(n, 1, 3, 3, generator=gen, dtype=torch.float64) for n in sizes]
    hand = torch.tensor([[0, 2], [1, 4], [4, 4], [5, 5], [1, 0], [0, 4]], dtype=torch.float64)
    hand_sums = torch.cdist(hand, hand).sum(1)
    assert median_medoid(hand.numpy()) == 0 and int(hand_sums.argmin()) == 1
    x.append(torch.cat([hand, torch.zeros(6, 7, dtype=torch.float64)], 1).view(6, 1, 3, 3))
    y = torch.cat([torch.full((len(xs),), k) for k, xs in enumerate(x)])
    x = torch.cat(x)
    perm = torch.randperm(len(y), generator=gen)                              # interleave the classes
    x, y = x[perm], y[perm]
    medoids = class_medoids(x, y, num_classes=len(sizes) + 1, max_per_class=100, seed=0)
    assert medoids.shape == (len(sizes) + 1, 1, 3, 3)
    for k in range(len(sizes) + 1):
        members = x[y == k]
        expected = members[median_medoid(members.reshape(len(members), -1).numpy())]
        assert torch.equal(medoids[k], expected), f"class {k}"


def test_class_medoids_subsample_classes_above_the_cap():
    """A class larger than max_per_class is searched on a seeded subsample of exactly
    max_per_class images: the result is the median-medoid of some 6-subset of the class, the
    same for the same seed, and depends on the seed. A class exactly at the cap is searched whole."""
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(8, 3, generator=gen, dtype=torch.float64)              # class 0: above the cap
    at_cap = torch.randn(6, 3, generator=gen, dtype=torch.float64)           # class 1: exactly the cap
    x, y = torch.cat([big, at_cap]), torch.tensor([0] * 8 + [1] * 6)
    subset_medoids = {s[median_medoid(big[list(s)].numpy())] for s in itertools.combinations(range(8), 6)}
    picks = set()
    for seed in range(20):
        out = class_medoids(x, y, 2, max_per_class=6, seed=seed)
        assert torch.equal(out, class_medoids(x, y, 2, max_per_class=6, seed=seed))
        assert torch.equal(out[1], at_cap[median_medoid(at_cap.numpy())])
        pick = int(torch.nonzero((big == out[0]).all(1)))
        assert pick in subset_medoids
        picks.add(pick)
    assert len(picks) > 1, "the subsample never changed with the seed"
    assert subset_medoids != set(range(8))  # membership above is a real constraint


@pytest.mark.parametrize("m,d", [(10, 20), (10, 10), (10, 4)])
def test_learned_embedding_initialisation_is_orthogonal(m, d):
    """initial_embedding("learned"): orthonormal rows (W W^T = I_m) when m <= d, the paper's
    case (m = 10, d = 20); when m > d rows cannot be orthogonal and the columns are orthonormal
    instead (W^T W = I_d). Seeded: the same seed gives the same matrix, another seed another."""
    w = initial_embedding("learned", m, d, seed=3)
    assert w.shape == (m, d) and w.dtype == torch.float32
    if m <= d:
        torch.testing.assert_close(w @ w.T, torch.eye(m), rtol=0, atol=1e-5)
    if m >= d:
        torch.testing.assert_close(w.T @ w, torch.eye(d), rtol=0, atol=1e-5)
    assert torch.equal(w, initial_embedding("learned", m, d, seed=3))
    assert not torch.allclose(w, initial_embedding("learned", m, d, seed=4))


def test_run_setup_learned_embedding_has_orthonormal_rows(tiny_config, digits):
    """The embedding a run starts from (make_setup, learned, default embed_dim) is the orthogonal one."""
    cfg = tiny_config({"model.embedding": "learned"})
    w = make_setup(cfg, digits).embedding
    m, d = w.shape
    assert m == digits.num_classes and d == cfg.model.embed_dim and m <= d
    torch.testing.assert_close(w @ w.T, torch.eye(m), rtol=0, atol=1e-5)
