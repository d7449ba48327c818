"""PF-ODE likelihood against the analytic log-density of the mixture."""
import math

import pytest
import torch

from unifusion.likelihood import bits_per_dim, check_levels, dequantize, log_likelihood
from tests.oracles import mixture_2d

SMIN = 0.01


def points(n=6):
    gm = mixture_2d()
    g = torch.Generator().manual_seed(4)
    x = gm.sample(n, g)[0] + SMIN * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return gm, x


def test_exact_divergence_matches_analytic_log_density():
    gm, x = points()
    logp, nfe = log_likelihood(gm.denoise, x, sigma_min=SMIN, sigma_max=80.0, rtol=1e-7, atol=1e-7)
    want = gm.log_prob(x, SMIN)
    assert (logp - want).abs().max() < 0.01, (logp, want)
    assert nfe > 10


def test_hutchinson_is_unbiased():
    """The same point repeated 256 times gets 256 independent probes: their mean agrees with the
    exact value within 4 standard errors."""
    gm, x = points(1)
    x = x.repeat(256, 1)
    exact, _ = log_likelihood(gm.denoise, x[:1], sigma_min=SMIN, rtol=1e-6, atol=1e-6)
    est, _ = log_likelihood(gm.denoise, x, sigma_min=SMIN, divergence="hutchinson",
                            generator=torch.Generator().manual_seed(0), rtol=1e-6, atol=1e-6)
    se = est.std() / math.sqrt(len(est))
    assert est.std() > 1e-3  # the probes really differ
    assert abs(float(est.mean() - exact[0])) < 4 * float(se) + 0.01


def test_bits_per_dim_convention():
    """Levels at the bin centres, delta = 2 / (L - 1): a density uniform over the dequantized
    range [-1 - delta/2, 1 + delta/2]^d (width L delta) is worth log2 L bits/dim exactly, and
    dequantize keeps every point inside the bin centred on its level."""
    d = 5
    for levels in (17, 256):
        delta = 2 / (levels - 1)
        log_p = torch.tensor(-d * math.log(levels * delta), dtype=torch.float64)
        assert math.isclose(float(bits_per_dim(log_p, d, levels)), math.log2(levels), rel_tol=1e-12)
        x = torch.linspace(-1, 1, levels).repeat(40)[:, None].double()
        u = (dequantize(x, levels, generator=torch.Generator().manual_seed(0)) - x) / delta
        assert -0.5 - 1e-9 <= float(u.min()) and float(u.max()) < 0.5 + 1e-9 and float(u.std()) > 0.25


def test_check_levels_names_the_problem():
    check_levels(torch.linspace(-1, 1, 17), 17)
    with pytest.raises(ValueError, match="outside the dequantization range"):
        check_levels(torch.tensor([0.0, 1.5]), 17)
    with pytest.raises(ValueError, match="not on 17 levels"):
        check_levels(torch.tensor([0.0, 0.03]), 17)


def test_errors():
    gm, x = points(2)
    with pytest.raises(ValueError, match="exact"):
        log_likelihood(gm.denoise, x, divergence="skilling")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(gm.denoise, x, sigma_min=1.0, sigma_max=0.5)


def test_integrates_in_torch_without_scipy(monkeypatch):
    """The solve is the samplers' torch Dormand-Prince: scipy's solve_ivp is never called, the result
    stays a tensor of x's dtype and device, and a float32 input works too."""
    import scipy.integrate

    def refuse(*args, **kwargs):
        raise AssertionError("scipy.integrate.solve_ivp was called")
    monkeypatch.setattr(scipy.integrate, "solve_ivp", refuse)
    gm, x = points(3)
    logp, nfe = log_likelihood(gm.denoise, x, sigma_min=SMIN, rtol=1e-6, atol=1e-6)
    assert logp.dtype == x.dtype and logp.device == x.device and logp.shape == (3,)
    # exact up to the prior: log_likelihood puts N(0, 80^2 I) where p_80 is, at the ODE's end x_T
    x_T = gm.pf_ode(x, SMIN, 80.0)
    gauss = -0.5 * x_T.pow(2).sum(1) / 80.0**2 - 2 * (math.log(80.0) + 0.5 * math.log(2 * math.pi))
    want = gm.log_prob(x, SMIN) - gm.log_prob(x_T, 80.0) + gauss
    assert (logp - want).abs().max() < 1e-4, (logp, want)

    def denoise32(x, sigma):
        return gm.denoise(x, sigma).float()
    logp32, _ = log_likelihood(denoise32, x.float(), sigma_min=SMIN, rtol=1e-5, atol=1e-5)
    assert logp32.dtype == torch.float32 and (logp32.double() - want).abs().max() < 1e-3


def test_nfe_counts_denoiser_calls():
    from tests.oracles import Counting
    gm, x = points(2)
    D = Counting(gm.denoise)
    _, nfe = log_likelihood(D, x, sigma_min=SMIN)
    assert nfe == D.calls
