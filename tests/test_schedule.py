"""Tests of noprop_dist.core.schedule, the one home of the NoProp math (NOPROP.md section 1).

Everything is float64; identities hold to 1e-12. A hard-coded table for cosine T=4 catches
any future change of the schedule or of a_t, b_t, c_t.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noprop_dist.core import schedule

TS = (2, 5, 10, 20, 50)
KINDS = ("cosine", "linear")
# Default clips, wider and narrower ones; all keep every T in TS strictly increasing.
CLIPS = ((1e-4, 0.9999), (1e-5, 0.99999), (5e-4, 0.9995))


def coefficients_for(kind, T, lo, hi):
    ab = schedule.alpha_bar(kind, T, lo, hi)
    return ab, schedule.posterior_coefficients(ab)


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: f"clip{c[0]}-{c[1]}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TS)
def test_posterior_identities(T, kind, clip):
    """a_t + b_t sqrt(ab_{t-1}) = sqrt(ab_t) and b_t^2 (1 - ab_{t-1}) + c_t = 1 - ab_t (Eq. 6)."""
    ab, coef = coefficients_for(kind, T, *clip)
    assert ab.dtype == np.float64 and coef.a.dtype == np.float64
    a, b, c = coef.a[1:], coef.b[1:], coef.c[1:]
    ab_t, ab_prev = ab[1:], ab[:-1]
    np.testing.assert_allclose(a + b * np.sqrt(ab_prev), np.sqrt(ab_t), rtol=0, atol=1e-12)
    np.testing.assert_allclose(b**2 * (1 - ab_prev) + c, 1 - ab_t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: f"clip{c[0]}-{c[1]}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TS)
def test_schedule_shape_monotone_and_signs(T, kind, clip):
    """alpha_bar increases within the clips; SNR increases; gaps, weights and coefficients are
    positive and finite, with entry 0 NaN (mistakes 1 and 8 of NOPROP.md)."""
    lo, hi = clip
    ab, coef = coefficients_for(kind, T, lo, hi)
    assert ab.shape == (T + 1,)
    assert np.all(np.diff(ab) > 0)
    assert ab.min() >= lo and ab.max() <= hi
    assert ab[0] == pytest.approx(lo) and ab[-1] == pytest.approx(hi)  # both ends reach the clips
    snr = schedule.snr(ab)
    assert np.all(np.isfinite(snr)) and np.all(np.diff(snr) > 0)
    gaps = schedule.snr_gaps(ab)
    weights = schedule.dt_loss_weights(ab, eta=0.1)
    for arr in (gaps, weights, coef.a, coef.b, coef.c):
        assert arr.shape == (T + 1,)
        assert np.isnan(arr[0])
        assert np.all(np.isfinite(arr[1:])) and np.all(arr[1:] > 0)
    np.testing.assert_allclose(gaps[1:], snr[1:] - snr[:-1], rtol=1e-15)
    np.testing.assert_allclose(weights[1:], 0.5 * T * 0.1 * gaps[1:], rtol=1e-15)


@pytest.mark.parametrize("kind,T,lo,hi", [
    ("cosine", 10, 1e-4, 0.5),     # many late steps clip to 0.5
    ("cosine", 10, 0.4, 0.9999),   # many early steps clip to 0.4
    ("cosine", 50, 1e-4, 0.99),    # the last two steps clip to 0.99
    ("cosine", 50, 1e-3, 0.9999),  # the first two steps clip to 1e-3
])
def test_clips_that_flatten_the_schedule_are_rejected(kind, T, lo, hi):
    """A clip range that makes alpha_bar non-increasing raises instead of silently flattening."""
    with pytest.raises(ValueError):
        schedule.alpha_bar(kind, T, lo, hi)


@pytest.mark.parametrize("args", [
    ("cosine", 0, 1e-4, 0.9999), ("cosine", 4, 0.5, 0.4), ("cosine", 4, 0.0, 0.9),
    ("cosine", 4, 1e-4, 1.0), ("quadratic", 4, 1e-4, 0.9999),
])
def test_invalid_arguments_rejected(args):
    with pytest.raises(ValueError):
        schedule.alpha_bar(*args)


def test_sample_marginal_moments_monte_carlo():
    """z_t = sqrt(ab) u_y + sqrt(1-ab) eps has mean sqrt(ab) u_y and variance 1-ab (mistake 2)."""
    n, ab = 200_000, 0.3
    u_y = torch.tensor([1.0, -2.0, 0.5, 0.0])                          # (d,)
    eps = schedule.marginal_noise(n, 4, seed=7)                         # (n, d)
    z = schedule.sample_marginal(u_y.expand(n, 4), ab, eps).double()   # (n, d)
    mean_se = math.sqrt((1 - ab) / n)
    var_se = (1 - ab) * math.sqrt(2 / (n - 1))
    expected_mean = math.sqrt(ab) * u_y.double()
    assert torch.all((z.mean(0) - expected_mean).abs() < 5 * mean_se), z.mean(0)
    assert torch.all((z.var(0) - (1 - ab)).abs() < 5 * var_se), z.var(0)
    # alpha_bar * u_y (without the square root) would be off by far more than the standard error.
    assert torch.all((z.mean(0) - ab * u_y.double())[:3].abs() > 50 * mean_se)


def test_marginal_noise_is_seeded():
    """The noise recipe: the same seed gives the same tensor, another seed another tensor."""
    a = schedule.marginal_noise(64, 5, seed=123)
    b = schedule.marginal_noise(64, 5, seed=123)
    c = schedule.marginal_noise(64, 5, seed=124)
    assert a.shape == (64, 5) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(0)
    d = schedule.marginal_noise(64, 5, seed=123)
    assert torch.equal(a, d)  # independent of the global RNG


@pytest.mark.parametrize("ab_0", [1e-4, 0.05, 0.5])
def test_kl_prior_matches_torch_distributions(ab_0):
    """KL(N(sqrt(ab_0) u_y, (1-ab_0) I) || N(0, I)) per example, against torch.distributions."""
    gen = torch.Generator().manual_seed(0)
    u_y = torch.randn(6, 10, generator=gen, dtype=torch.float64)     # (B, d)
    q = torch.distributions.Independent(
        torch.distributions.Normal(math.sqrt(ab_0) * u_y, math.sqrt(1 - ab_0) * torch.ones_like(u_y)), 1)
    p = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros_like(u_y), torch.ones_like(u_y)), 1)
    expected = torch.distributions.kl_divergence(q, p)               # (B,)
    got = schedule.kl_prior(u_y, ab_0)
    assert got.shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(got > 0)


# ------------------------------------------------------------------ reference table
# Computed once (by the by-hand formula in test_reference_table_cosine_T4) and hard-coded, so a
# change of the schedule or of the coefficients anywhere is caught. Index t = 0..4.
REF_ALPHA_BAR = [0.0001, 0.1442721023857358, 0.49384359044063775, 0.8470121613269047, 0.9999]
REF_A = [0.3796063625076467, 0.5813070657844015, 0.7581453650171408, 0.9993963243386522]
REF_B = [0.02253138777435252, 0.31970212256219915, 0.23079269376841863, 0.0006016024961886436]
REF_C = [0.8552202849455693, 0.41869293421559844, 0.12602728212265393, 9.994462979028075e-05]


def by_hand_cosine(T, lo=1e-4, hi=0.9999, off=0.008):
    """The flipped improved-DDPM cosine schedule, written out independently of the package."""
    def f(s):
        return math.cos(((s / T + off) / (1 + off)) * math.pi / 2) ** 2
    return [min(max(f(T - t) / f(0), lo), hi) for t in range(T + 1)]


def test_reference_table_cosine_T4():
    """cosine, T=4, default clips and offset: alpha_bar and a_t, b_t, c_t to 1e-12."""
    hand = by_hand_cosine(4)
    print("alpha_bar cosine T=4:", [repr(v) for v in hand])
    np.testing.assert_allclose(hand, REF_ALPHA_BAR, rtol=0, atol=1e-12)
    ab = schedule.alpha_bar("cosine", 4, 1e-4, 0.9999)
    np.testing.assert_allclose(ab, REF_ALPHA_BAR, rtol=0, atol=1e-12)
    coef = schedule.posterior_coefficients(ab)
    np.testing.assert_allclose(coef.a[1:], REF_A, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coef.b[1:], REF_B, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coef.c[1:], REF_C, rtol=0, atol=1e-12)


def test_config_defaults_match_reference():
    """The config's schedule defaults are the ones the reference table was computed with."""
    from noprop_dist.config import ScheduleConfig

    cfg = ScheduleConfig(T=4)
    assert (cfg.kind, cfg.alpha_bar_min, cfg.alpha_bar_max, cfg.cosine_offset) == ("cosine", 1e-4, 0.9999, 0.008)
    np.testing.assert_allclose(schedule.alpha_bar_from_config(cfg), REF_ALPHA_BAR, rtol=0, atol=1e-12)


def test_chain_coefficients_satisfy_identities(trained_run):
    """The inference chain's a, b, sqrt_c buffers are block t's own a_t, b_t, sqrt(c_t) for the
    run's schedule, not shifted by one step (mistake 9 of NOPROP.md)."""
    from noprop_dist.variants.dt import load_chain

    chain, cfg, manifest = load_chain(trained_run[0])
    ab = np.array(manifest["schedule"]["alpha_bar"], dtype=np.float64)
    np.testing.assert_array_equal(ab, schedule.alpha_bar_from_config(cfg.schedule))
    T = cfg.schedule.T
    a, b, sqrt_c = (chain.a.double().numpy(), chain.b.double().numpy(), chain.sqrt_c.double().numpy())
    assert a.shape == b.shape == sqrt_c.shape == (T,)
    ab_t, ab_prev = ab[1:], ab[:-1]   # chain index t-1 holds block t's coefficients
    np.testing.assert_allclose(a + b * np.sqrt(ab_prev), np.sqrt(ab_t), rtol=0, atol=1e-6)
    np.testing.assert_allclose(b**2 * (1 - ab_prev) + sqrt_c**2, 1 - ab_t, rtol=0, atol=1e-6)
    coef = schedule.posterior_coefficients(ab)
    np.testing.assert_array_equal(chain.a.numpy(), coef.a[1:].astype(np.float32))
    np.testing.assert_array_equal(chain.b.numpy(), coef.b[1:].astype(np.float32))
