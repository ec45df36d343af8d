"""NoProp-CT and NoProp-FM (NOPROP.md section 3): the learned schedule, the losses, the time
partition and the two integrators (noprop_dist/continuous.py).

Oracle networks read the label from the chain's image argument (as in test_math.py), so
the integrators can be checked against closed forms: CT with perfect denoisers must reproduce
the marginals q(z_t | y) step by step, FM with the true conditional velocity must land on u_y.
Monte Carlo tolerances are 5 standard errors at a fixed seed.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noprop_dist.core import continuous as C
from noprop_dist.nets import time_conditioned as N
from noprop_dist.core import schedule
from noprop_dist.data import ArraySplit
from noprop_dist.nets.chain import RawImageChain
from noprop_dist.nets.blocks import BLOCK_SIZES

ORACLE_LOGIT = 1e4          # softmax of (1e4, 0, ...) is exactly one-hot in float32
EMBEDDING = torch.tensor([[1.5, -1.0, 0.5, 0.0],
                          [0.0, 2.0, -0.5, 1.0],
                          [-1.0, 0.0, 0.0, -2.0]])
SIGMAS = 5.0


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)      # conftest puts the default back afterwards


def randomize(sched: C.LearnedSchedule, seed: int, scale: float) -> C.LearnedSchedule:
    """Overwrite every raw parameter with N(0, scale^2) draws."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sched.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return sched


# ------------------------------------------------------------------ learned schedule

@pytest.mark.parametrize("seed", range(5))
def test_gamma_strictly_decreasing_for_any_parameters(seed):
    sched = randomize(C.LearnedSchedule(1e-4, 0.9999, hidden=16).double(), seed, scale=3.0)
    t = torch.linspace(0.0, 1.0, 4001, dtype=torch.float64)
    with torch.no_grad():
        gamma, ab, snr_prime = sched.gamma(t), sched.alpha_bar(t), sched.snr_derivative(t)
        g = sched.normalized(t)
    assert torch.all(torch.diff(gamma) < 0), "gamma must decrease strictly in t"
    assert torch.all(torch.diff(ab) > 0)
    assert torch.all(snr_prime > 0)
    assert sched.gamma_1() < sched.gamma_0
    # f(0) inside a batch and f(0) alone may round apart by an ulp (BLAS kernels by batch size)
    assert float(g[0]) == pytest.approx(0.0, abs=1e-12) and float(g[-1]) == pytest.approx(1.0, abs=1e-12)


def test_gamma_strictly_decreasing_float32_default_init():
    torch.manual_seed(0)
    sched = C.LearnedSchedule(1e-4, 0.9999)
    t = torch.linspace(0.0, 1.0, 1001)
    with torch.no_grad():
        assert torch.all(torch.diff(sched.gamma(t)) < 0)
        assert torch.all(sched.snr_derivative(t) > 0)


@pytest.mark.parametrize("lo,hi", [(1e-4, 0.9999), (1e-3, 0.999), (0.05, 0.5)])
def test_schedule_endpoints_at_init(lo, hi):
    torch.manual_seed(1)
    sched = C.LearnedSchedule(lo, hi)
    with torch.no_grad():
        ab = sched.alpha_bar(torch.tensor([0.0, 1.0]))
        snr = sched.snr(torch.tensor([0.0, 1.0]))
    assert abs(float(ab[0]) - lo) < 1e-6 and abs(float(ab[1]) - hi) < 1e-6
    assert float(snr[1]) == pytest.approx(hi / (1 - hi), rel=1e-4)
    grid = sched.alpha_bar_grid(50)
    assert grid.dtype == np.float64 and grid.shape == (51,)
    assert grid[0] == pytest.approx(lo, abs=1e-6) and grid[-1] == pytest.approx(hi, abs=1e-6)  # float32 parameters
    assert np.all(np.diff(grid) > 0)


def test_schedule_rejects_bad_endpoints():
    for lo, hi in [(0.0, 0.9), (0.5, 0.5), (0.2, 1.0)]:
        with pytest.raises(ValueError):
            C.LearnedSchedule(lo, hi)


@pytest.mark.parametrize("seed,scale", [(0, 0.0), (1, 1.0), (2, 2.0)])
def test_snr_derivative_matches_central_difference(seed, scale):
    torch.manual_seed(seed)
    sched = C.LearnedSchedule(1e-4, 0.9999, hidden=16).double()
    if scale:
        randomize(sched, seed, scale)
    t = torch.tensor([0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 1.0], dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        fd = (sched.snr(t + h) - sched.snr(t - h)) / (2 * h)
        analytic = sched.snr_derivative(t)
    torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=0.0)


def test_ct_denoise_loss_gradient_reaches_every_schedule_parameter():
    torch.manual_seed(0)
    sched = C.LearnedSchedule(1e-3, 0.999, hidden=8)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (16,), generator=gen)
    u_y = EMBEDDING[y]
    t = torch.rand(16, generator=gen)
    z_t = C.sample_ct_marginal(u_y, sched.alpha_bar(t), torch.randn(16, 4, generator=gen))
    logits = z_t @ torch.randn(4, 3, generator=gen)                        # a fixed linear "net"
    loss = C.ct_denoise_loss(logits, EMBEDDING, u_y, sched.snr_derivative(t), eta=1.0)
    loss.backward()
    for name, p in sched.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"no gradient reaches {name}"


def test_ct_denoise_loss_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    u_y = EMBEDDING[[1, 2]]
    snr_prime = torch.tensor([3.0, 0.5])
    err = ((torch.softmax(logits, -1) @ EMBEDDING - u_y) ** 2).sum(-1)
    expected = (0.5 * 0.7 * snr_prime * err).mean()
    torch.testing.assert_close(C.ct_denoise_loss(logits, EMBEDDING, u_y, snr_prime, eta=0.7), expected)


def test_sample_ct_marginal_per_example_alpha_bar():
    gen = torch.Generator().manual_seed(3)
    u_y, eps = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    ab = torch.tensor([0.1, 0.5, 0.99], requires_grad=True)
    z = C.sample_ct_marginal(u_y, ab, eps)
    for i in range(3):
        one = schedule.sample_marginal(u_y[i:i + 1], float(ab[i].detach()), eps[i:i + 1])
        torch.testing.assert_close(z[i:i + 1], one)
    z.sum().backward()
    expected = (u_y / (2 * ab.detach().sqrt()[:, None]) - eps / (2 * (1 - ab.detach()).sqrt()[:, None])).sum(-1)
    torch.testing.assert_close(ab.grad, expected)


@pytest.mark.parametrize("ab_0", [1e-4, 0.01, 0.3, 0.9])
def test_kl_prior_continuous_matches_schedule_kl_prior(ab_0):
    u_y = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab = torch.tensor(ab_0, dtype=torch.float64, requires_grad=True)
    kl = C.kl_prior_continuous(u_y, ab)
    torch.testing.assert_close(kl, schedule.kl_prior(u_y, ab_0), rtol=1e-12, atol=1e-12)
    kl.sum().backward()
    h = 1e-7 * ab_0
    fd = (schedule.kl_prior(u_y, ab_0 + h) - schedule.kl_prior(u_y, ab_0 - h)).sum() / (2 * h)
    assert float(ab.grad) == pytest.approx(float(fd), rel=1e-6)


def test_ct_head_loss_is_cross_entropy():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = torch.tensor([0, 2])
    expected = -(torch.log_softmax(logits, -1)[[0, 1], [0, 2]]).mean()
    torch.testing.assert_close(C.ct_head_loss(logits, y), expected)


# ------------------------------------------------------------------ flow matching

def test_fm_interpolate_endpoints_exact():
    gen = torch.Generator().manual_seed(0)
    z0, u = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    assert torch.equal(C.fm_interpolate(z0, u, torch.zeros(6)), z0)
    assert torch.equal(C.fm_interpolate(z0, u, torch.ones(6)), u)
    mid = C.fm_interpolate(z0, u, torch.full((6,), 0.25))
    torch.testing.assert_close(mid, 0.25 * u + 0.75 * z0)


def test_fm_target_is_time_derivative_of_interpolation():
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    u = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(5, generator=gen, dtype=torch.float64)
    h = 1e-6
    fd = (C.fm_interpolate(z0, u, t + h) - C.fm_interpolate(z0, u, t - h)) / (2 * h)
    torch.testing.assert_close(C.fm_target(z0, u), fd, rtol=1e-8, atol=1e-8)


def test_fm_velocity_and_loss():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    v = C.fm_velocity(logits, EMBEDDING)
    torch.testing.assert_close(v[0], 1.0 * EMBEDDING[0] - 2.0 * EMBEDDING[1] + 0.5 * EMBEDDING[2])  # no softmax
    target = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    v2 = torch.zeros(2, 4)
    assert float(C.fm_loss(v2, target)) == pytest.approx((14.0 + 4.0) / 2)


def test_fm_anchor_loss_uses_extrapolated_endpoint():
    gen = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 1, 2, 1])
    z0 = torch.randn(4, 4, generator=gen)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    z_t = C.fm_interpolate(z0, EMBEDDING[y], t)
    # The true velocity extrapolates exactly onto u_y: the loss is the CE of the distance
    # softmax evaluated at u_y itself.
    perfect = C.fm_anchor_loss(z_t, C.fm_target(z0, EMBEDDING[y]), t, EMBEDDING, y)
    scores = -torch.cdist(EMBEDDING[y], EMBEDDING) ** 2
    torch.testing.assert_close(perfect, F.cross_entropy(scores, y), rtol=1e-5, atol=1e-5)
    # A zero velocity leaves z~_1 = z_t, which is farther from u_y: a larger loss.
    lazy = C.fm_anchor_loss(z_t, torch.zeros_like(z_t), t, EMBEDDING, y)
    torch.testing.assert_close(lazy, F.cross_entropy(-torch.cdist(z_t, EMBEDDING) ** 2, y), rtol=1e-5, atol=1e-5)
    assert lazy > perfect
    # It trains the embedding (the anchor's purpose).
    emb = EMBEDDING.clone().requires_grad_(True)
    C.fm_anchor_loss(z_t, torch.zeros_like(z_t), t, emb, y).backward()
    assert emb.grad.abs().sum() > 0


def test_nearest_embedding():
    z = torch.tensor([[1.4, -0.9, 0.4, 0.1], [-0.8, 0.1, 0.0, -1.7], [0.1, 1.5, 0.0, 0.5]])
    assert C.nearest_embedding(z, EMBEDDING).tolist() == [0, 2, 1]


# ------------------------------------------------------------------ time partition

def test_interval_bounds():
    assert C.interval_bounds(1) == [(0.0, 1.0)]
    assert C.interval_bounds(4) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    with pytest.raises(ValueError):
        C.interval_bounds(0)


# K = 22, 43: floor(t * K) is one too low at some bounds t = k / K (e.g. (15/22) * 22 < 15 in floats).
@pytest.mark.parametrize("K", [1, 2, 3, 7, 10, 22, 43])
def test_interval_of_edges(K):
    assert C.interval_of(0.0, K) == 0
    assert C.interval_of(1.0, K) == K - 1
    bounds = C.interval_bounds(K)
    for k, (lo, hi) in enumerate(bounds):
        assert C.interval_of(lo, K) == k                                     # a bound starts its interval
        if k > 0:
            assert C.interval_of(math.nextafter(lo, 0.0), K) == k - 1
        assert C.interval_of(math.nextafter(hi, 0.0), K) == k
    # Grid times s / S decide by the same bounds.
    for S in (1, 3, 10, 30, 44, 86, 1000):
        for s in range(S + 1):
            t = s / S
            k = C.interval_of(t, K)
            lo, hi = bounds[k]
            assert lo <= t < hi or (t == 1.0 and k == K - 1), (t, K, k)


def test_interval_of_rejects_out_of_range():
    for t in (-1e-9, 1.0 + 1e-9, float("nan")):
        with pytest.raises(ValueError):
            C.interval_of(t, 3)
    with pytest.raises(ValueError):
        C.interval_of(0.5, 0)


# ------------------------------------------------------------------ network

def test_sinusoidal_time_embedding():
    t = torch.tensor([0.0, 0.001, 0.5, 1.0])
    e = N.sinusoidal_time_embedding(t, 64)
    assert e.shape == (4, 64)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    # Nearby times are told apart (t is scaled before the sinusoids).
    assert (e[1] - e[0]).abs().max() > 0.5
    assert torch.cdist(e, e).fill_diagonal_(1.0).min() > 0.1
    with pytest.raises(ValueError):
        N.sinusoidal_time_embedding(t, 63)


def test_time_conditioned_net_no_batchnorm_and_uses_all_inputs():
    torch.manual_seed(0)
    net = N.TimeConditionedNet((1, 8, 8), 4, 3, BLOCK_SIZES["tiny"], dropout=0.0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    gen = torch.Generator().manual_seed(0)
    z, x, t = torch.randn(2, 4, generator=gen), torch.randn(2, 1, 8, 8, generator=gen), torch.rand(2, generator=gen)
    net.train()
    out = net(z[:1], x[:1], t[:1])                                           # batch of one in train mode
    assert out.shape == (1, 3)
    base = net(z, x, t)
    assert base.shape == (2, 3)
    assert not torch.allclose(net(z + 1, x, t), base)
    assert not torch.allclose(net(z, x + 1, t), base)
    assert not torch.allclose(net(z, x, (t + 0.01).clamp(max=1)), base)
    # Per-example independence (no batch statistics anywhere).
    torch.testing.assert_close(net(z[1:], x[1:], t[1:]), base[1:])
    torch.testing.assert_close(net.from_image_features(z, net.encode_image(x), t), base)


# ------------------------------------------------------------------ integrators

class OracleCT(nn.Module):
    """Perfect denoiser: all mass on the true class, read from the image argument (the labels).
    Records its input z and time t."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.z: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []

    def forward(self, z, y, t):
        self.z.append(z.clone())
        self.t.append(t.clone())
        return ORACLE_LOGIT * F.one_hot(y, self.num_classes).to(z.dtype)


class OracleFM(nn.Module):
    """The true conditional velocity (u_y - z) / (1 - t) of the straight path, as logits for a
    one-hot embedding (v = logits @ I). Records the times it is called at."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.t: list[torch.Tensor] = []

    def forward(self, z, y, t):
        self.t.append(t.clone())
        return (F.one_hot(y, self.num_classes).to(z.dtype) - z) / (1.0 - t)[:, None]


def test_ct_chain_with_oracle_denoisers_reproduces_marginals():
    torch.manual_seed(0)
    S, K, n = 20, 3, 60_000
    sched = randomize(C.LearnedSchedule(1e-3, 0.999, hidden=8), seed=5, scale=1.0)
    with torch.no_grad():        # keep the constructor's endpoints, randomise only the shape
        sched.gamma_0.fill_(math.log((1 - 1e-3) / 1e-3))
        sched.raw_gap.fill_(math.log(math.expm1(math.log((1 - 1e-3) / 1e-3) - math.log(1e-3 / 0.999))))
    ab = sched.alpha_bar_grid(S)
    assert ab[0] == pytest.approx(1e-3) and ab[-1] == pytest.approx(0.999)
    nets = [OracleCT(3) for _ in range(K)]
    chain = N.CTChain(nets, nn.Identity(), EMBEDDING, ab, mean=(0.0,), std=(1.0,))
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (n,), generator=gen)
    noise = torch.randn(S + 1, n, 4, generator=gen)
    noise[0] = schedule.sample_marginal(EMBEDDING[y], float(ab[0]), noise[0])   # z_0 ~ q(z_0 | y)
    with torch.no_grad():
        z_S = chain(y, noise)
    # Step s (1-based) was run by the net of the interval containing t_{s-1} = (s-1)/S, at that t.
    order = [C.interval_of((s - 1) / S, K) for s in range(1, S + 1)]
    calls = {k: iter(zip(nets[k].z, nets[k].t)) for k in range(K)}
    latents = []
    for s, k in enumerate(order, start=1):
        z_in, t_in = next(calls[k])
        assert torch.all(t_in == (s - 1) / S)
        lo, hi = C.interval_bounds(K)[k]
        assert lo <= (s - 1) / S < hi
        latents.append(z_in)
    assert all(next(it, None) is None for it in calls.values())
    assert torch.equal(latents[0], noise[0])
    latents.append(z_S)
    for s in range(S + 1):
        for c in range(3):
            zc = latents[s][y == c].double()
            m = len(zc)
            mean_err = (zc.mean(0) - math.sqrt(ab[s]) * EMBEDDING[c].double()).abs().max()
            var = 1.0 - ab[s]
            assert mean_err < SIGMAS * math.sqrt(var / m), (s, c, float(mean_err))
            var_err = (zc.var(0) - var).abs().max()
            assert var_err < SIGMAS * var * math.sqrt(2.0 / m), (s, c, float(var_err))


def test_ct_chain_rejects_non_increasing_grid():
    with pytest.raises(ValueError):
        N.CTChain([OracleCT(3)], nn.Identity(), EMBEDDING, np.array([0.5, 0.4, 0.9]), (0.0,), (1.0,))


@pytest.mark.parametrize("S", [1, 2, 7, 50])
def test_fm_chain_with_true_velocity_lands_on_embedding(S):
    K, m, n = 2, 4, 64
    nets = [OracleFM(m) for _ in range(K)]
    chain = N.FMChain(nets, torch.eye(m), S, mean=(0.0,), std=(1.0,))
    gen = torch.Generator().manual_seed(S)
    y = torch.randint(0, m, (n,), generator=gen)
    noise = torch.randn(1, n, m, generator=gen) * 3
    with torch.no_grad():
        scores = chain(y, noise)
        z1 = chain.final_latent(y, noise)
    torch.testing.assert_close(z1, torch.eye(m)[y], rtol=0, atol=1e-5)
    assert torch.equal(scores.argmax(-1), y)
    torch.testing.assert_close(scores, -torch.cdist(z1, torch.eye(m)) ** 2, rtol=1e-5, atol=1e-5)
    # Each step s ran once per call, at t_s = s / S (float32), on all examples.
    seen = sorted(float(t[0]) for net in nets for t in net.t)
    assert seen == sorted(2 * [float(np.float32(s / S)) for s in range(S)])
    assert all(torch.all(t == t[0]) for net in nets for t in net.t)
    for k, net in enumerate(nets):
        lo, hi = C.interval_bounds(K)[k]
        assert all(lo <= float(t[0]) < hi for t in net.t)


def test_chains_with_networks_match_their_definition():
    """CTChain/FMChain with real nets (features cached per batch) against the loop written out."""
    torch.manual_seed(0)
    size, m, d = BLOCK_SIZES["tiny"], 3, 4
    nets = [N.TimeConditionedNet((1, 8, 8), d, m, size, 0.2).eval() for _ in range(2)]
    head = nn.Linear(d, m)
    ab = np.linspace(0.01, 0.99, 5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    noise = torch.randn(5, 6, d, generator=gen)
    coef = schedule.posterior_coefficients(ab)
    with torch.no_grad():
        z = noise[0]
        for s in range(1, 5):
            t = torch.full((6,), (s - 1) / 4)
            u = torch.softmax(nets[C.interval_of((s - 1) / 4, 2)](z, x, t), -1) @ EMBEDDING
            z = float(coef.a[s]) * u + float(coef.b[s]) * z + math.sqrt(coef.c[s]) * noise[s]
        ct = N.CTChain(nets, head, EMBEDDING, ab, (0.0,), (1.0,))
        torch.testing.assert_close(ct(x, noise), head(z), rtol=1e-5, atol=1e-5)
        z = noise[0]
        for s in range(3):
            t = torch.full((6,), s / 3)
            z = z + (1 / 3) * (nets[C.interval_of(s / 3, 2)](z, x, t) @ EMBEDDING)
        fm = N.FMChain(nets, EMBEDDING, 3, (0.0,), (1.0,))
        torch.testing.assert_close(fm.final_latent(x, noise[:1]), z, rtol=1e-5, atol=1e-5)


def test_export_ct_and_fm_chains_with_dynamic_batch():
    torch.manual_seed(0)
    size, m, d = BLOCK_SIZES["tiny"], 3, 4
    nets = [N.TimeConditionedNet((1, 8, 8), d, m, size, 0.2).eval() for _ in range(2)]
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (5, 1, 8, 8), generator=gen, dtype=torch.uint8)
    chains = {
        "ct": (N.CTChain(nets, nn.Linear(d, m), EMBEDDING, np.linspace(0.01, 0.99, 4), (0.3,), (0.2,)), 4),
        "fm": (N.FMChain(nets, EMBEDDING, 3, (0.3,), (0.2,)), 1),
    }
    for name, (chain, rows) in chains.items():
        model = RawImageChain(chain).eval()
        program = torch.export.export(model, (images, torch.zeros(rows, 4, d)),
                                      dynamic_shapes=({0: batch}, {1: batch}))
        noise = torch.randn(rows, 5, d, generator=gen)
        with torch.no_grad():
            expected = model(raw, noise)
        torch.testing.assert_close(program.module()(raw, noise), expected, rtol=1e-5, atol=1e-5, msg=name)


class ImageReader(nn.Module):
    """Reads the class from the (normalised) image: class c images are constant 60 * c / 255.
    Returns huge logits on that class (CT) or the velocity towards u_c for one-hot (FM)."""

    def __init__(self, mean: float, std: float, m: int, fm: bool):
        super().__init__()
        self.levels = (torch.arange(m) * 60.0 / 255.0 - mean) / std
        self.fm = fm

    def forward(self, z, x, t):
        c = (x.mean((1, 2, 3))[:, None] - self.levels[None]).abs().argmin(-1)
        onehot = F.one_hot(c, len(self.levels)).float()
        return (onehot - z) / (1 - t)[:, None] if self.fm else ORACLE_LOGIT * onehot


def test_evaluate_continuous_reads_images_only():
    m, n = 4, 37
    y = np.arange(n) % m
    x = np.broadcast_to((60 * y).astype(np.uint8)[:, None, None, None], (n, 1, 8, 8)).copy()
    split = ArraySplit(x=x, y=y.astype(np.int64))
    mean, std = 0.35, 0.27
    ct = N.CTChain([ImageReader(mean, std, m, fm=False)], nn.Identity(), torch.eye(m),
                   np.linspace(0.01, 0.999, 11), (mean,), (std,))
    fm = N.FMChain([ImageReader(mean, std, m, fm=True)], torch.eye(m), 5, (mean,), (std,))
    for chain in (ct, fm):
        for with_noise in (True, False):
            out = N.evaluate_continuous(chain, split, batch_size=16, seed=0, with_noise=with_noise, max_batch=5)
            assert out["accuracy"] == 1.0 and out["nearest_accuracy"] == 1.0
            assert out["seconds"] > 0 and out["images_per_s"] == pytest.approx(n / out["seconds"])
    # A net that ignores the image predicts one class: accuracy is that class's share.
    const = N.FMChain([lambda_velocity(2, m)], torch.eye(m), 3, (mean,), (std,))
    out = N.evaluate_continuous(const, split, batch_size=16, seed=0, with_noise=False)
    assert out["accuracy"] == pytest.approx(float(np.mean(y == 2)))


def lambda_velocity(c: int, m: int) -> nn.Module:
    class Towards(nn.Module):
        def forward(self, z, x, t):
            return (F.one_hot(torch.full((len(z),), c), m).float() - z) / (1 - t)[:, None]
    return Towards()


def test_evaluate_continuous_noise_depends_on_seed_only():
    """max_batch must not change any draw: the CT final latents with a noise-sensitive net are
    the same with and without splitting (compared through the nearest-embedding accuracy of a
    random embedding on random data, with several seeds so that a change would show)."""
    torch.manual_seed(0)
    m, d, n = 5, 3, 40
    gen = torch.Generator().manual_seed(0)
    split = ArraySplit(x=torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8).numpy(),
                       y=torch.randint(0, m, (n,), generator=gen).numpy())
    net = N.TimeConditionedNet((1, 8, 8), d, m, BLOCK_SIZES["tiny"], 0.0)
    chain = N.CTChain([net], nn.Linear(d, m), torch.randn(m, d, generator=gen), np.linspace(0.05, 0.9, 4),
                      (0.5,), (0.3,))
    a = [N.evaluate_continuous(chain, split, 16, seed, with_noise=True) for seed in range(4)]
    b = [N.evaluate_continuous(chain, split, 16, seed, with_noise=True, max_batch=3) for seed in range(4)]
    assert [r["nearest_accuracy"] for r in a] == [r["nearest_accuracy"] for r in b]
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert len({r["nearest_accuracy"] for r in a} | {r["accuracy"] for r in a}) > 1, "seed has no effect"


# ------------------------------------------------------------------ tiny overfit

def _overfit(kind: str) -> tuple[float, float]:
    """Train a tiny TimeConditionedNet on 32 random 1x8x8 images (4 classes) for 200 Adam steps;
    the loss on fixed evaluation draws before and after (CT: under the initial schedule, so a
    fall cannot come from the schedule alone)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (32,), generator=gen)
    emb = torch.eye(4)
    u = emb[y]
    net = N.TimeConditionedNet((1, 8, 8), 4, 4, BLOCK_SIZES["tiny"], dropout=0.0)
    sched = C.LearnedSchedule(1e-4, 0.9999)
    frozen = copy.deepcopy(sched)
    params = list(net.parameters()) + (list(sched.parameters()) if kind == "ct" else [])
    opt = torch.optim.Adam(params, lr=3e-3)

    def loss(t, eps, sch):
        if kind == "ct":
            z_t = C.sample_ct_marginal(u, sch.alpha_bar(t), eps)
            return C.ct_denoise_loss(net(z_t, x, t), emb, u, sch.snr_derivative(t), eta=1.0)
        z_t = C.fm_interpolate(eps, u, t)
        return C.fm_loss(C.fm_velocity(net(z_t, x, t), emb), C.fm_target(eps, u))

    egen = torch.Generator().manual_seed(123)
    draws = [(torch.rand(32, generator=egen), torch.randn(32, 4, generator=egen)) for _ in range(8)]

    def evaluate() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss(t, eps, frozen)) for t, eps in draws]))

    before = evaluate()
    for _ in range(200):
        opt.zero_grad()
        loss(torch.rand(32, generator=gen), torch.randn(32, 4, generator=gen), sched).backward()
        opt.step()
    if kind == "ct":
        with torch.no_grad():
            t = torch.linspace(0, 1, 101)
            assert torch.all(torch.diff(sched.gamma(t)) < 0)
    return before, evaluate()


def test_tiny_overfit_ct():
    before, after = _overfit("ct")
    assert after < 0.1 * before, (before, after)


def test_tiny_overfit_fm():
    before, after = _overfit("fm")
    assert after < 0.5 * before, (before, after)


# ------------------------------------------------------------------ issue 17: how t is drawn, how the schedule trains

def test_uniform_draw_is_the_old_one_and_antithetic_spreads_the_batch():
    u = torch.rand(16, generator=torch.Generator().manual_seed(0))
    t, w = C.draw_times(u, 0.25, 0.75, "uniform")
    assert torch.equal(t, 0.25 + 0.5 * u) and torch.equal(w, torch.ones(16))
    t, w = C.draw_times(u, 0.25, 0.75, "antithetic")
    assert torch.all((t >= 0.25) & (t < 0.75)) and torch.equal(w, torch.ones(16))
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 0.5 / 16), atol=1e-6)   # one point per stratum


def test_time_of_snr_inverts_the_schedule():
    sched = randomize(C.LearnedSchedule(1e-3, 0.999).double(), 3, 1.0)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    back = sched.time_of_snr(sched.snr(t))
    assert torch.allclose(back, t, atol=1e-9)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.5, 1.0)])
def test_snr_importance_draw_keeps_the_expectation(lo, hi):
    """E_{t~p}[w(t) SNR'(t) f(t)] = E_{t~U(lo,hi)}[SNR'(t) f(t)] for a smooth f (float64,
    20k draws; the importance weight times SNR' is constant, so the estimate's error is f's)."""
    sched = C.LearnedSchedule(1e-2, 0.99).double()
    f = lambda t: 1.0 + torch.cos(3.0 * t)                                   # noqa: E731
    with torch.no_grad():
        grid = lo + (hi - lo) * (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
        exact = float((sched.snr_derivative(grid) * f(grid)).mean())
        u = torch.rand(20_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        t, w = C.draw_times(u, lo, hi, "snr_importance", sched)
        assert torch.all((t >= lo) & (t <= hi))
        estimate = float((w * sched.snr_derivative(t) * f(t)).mean())
    assert abs(estimate - exact) < 0.02 * exact


def test_variance_training_gives_the_shape_the_second_moment_and_the_rest_the_loss():
    """schedule_shape=variance (VDM): gamma_0 / gap and the network get d mean(l)/d theta,
    the shape g~ gets d mean(l^2)/d theta (l the per-example Eq. 9 term)."""
    torch.manual_seed(0)
    sched = randomize(C.LearnedSchedule(1e-2, 0.99).double(), 5, 0.5)
    net = nn.Linear(4, 3).double()
    emb = EMBEDDING.double()
    y = torch.tensor([0, 1, 2, 1, 0])
    u, t, eps = emb[y], torch.rand(5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)

    def grads(mode: str) -> tuple[dict, torch.Tensor]:
        sched.zero_grad()
        net.zero_grad()
        if mode == "variance":
            box = C.GradScale()
            ab, sp = sched.alpha_bar_and_snr_derivative(t, box)
            C.ct_denoise_loss(net(C.sample_ct_marginal(u, ab, eps)), emb, u, sp, 1.0, None, box).backward()
        else:
            ab, sp = sched.alpha_bar(t), sched.snr_derivative(t)
            err = (schedule.denoised_embedding(net(C.sample_ct_marginal(u, ab, eps)), emb) - u).pow(2).sum(-1)
            per_example = 0.5 * sp * err
            (per_example.mean() if mode == "mean" else per_example.pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in sched.named_parameters()}, net.weight.grad.clone()

    var, var_net = grads("variance")
    mean, mean_net = grads("mean")
    square, _ = grads("square")
    assert torch.allclose(var_net, mean_net, rtol=1e-12, atol=1e-14)
    for name, grad in var.items():
        ref = mean[name] if name in ("gamma_0", "raw_gap") else square[name]
        assert torch.allclose(grad, ref, rtol=1e-8, atol=1e-12), name
    shape = {n for n, _ in sched.named_parameters()} - {"gamma_0", "raw_gap"}
    assert shape == {n for n, p in sched.named_parameters() if any(p is q for q in sched.shape_parameters())}


def test_alpha_bar_and_snr_derivative_match_the_separate_methods():
    sched = randomize(C.LearnedSchedule(1e-3, 0.999).double(), 7, 1.0)
    t = torch.linspace(0, 1, 33, dtype=torch.float64)
    ab, sp = sched.alpha_bar_and_snr_derivative(t)
    assert torch.allclose(ab, sched.alpha_bar(t), rtol=1e-12) and torch.allclose(sp, sched.snr_derivative(t), rtol=1e-12)


def test_fm_interpolate_with_sigma_adds_the_path_noise():
    z0, u, eps = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    t = torch.rand(5)
    assert torch.equal(C.fm_interpolate(z0, u, t, 0.0, eps), C.fm_interpolate(z0, u, t))
    assert torch.allclose(C.fm_interpolate(z0, u, t, 0.1, eps), C.fm_interpolate(z0, u, t) + 0.1 * eps)
