"""The classic training losses are instances of lambda(sigma) ||D - x0||^2 (written out and checked)."""
import math

import pytest
import torch

from unifusion import losses as L
from unifusion import parametrizations as PZ
from unifusion import processes as P


class RandomNet(torch.nn.Module):
    """A fixed nonlinear F(x_in, c_noise): enough to tell the losses apart if a mapping were wrong."""

    def __init__(self, dim=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)

    def forward(self, x, c_noise):
        return torch.tanh(x @ self.W + self.b * c_noise[:, None])


def batch(n=64, dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_ddpm_eps_loss():
    """Ho et al. 2020 eq. 14: || eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t) ||^2."""
    proc, net = P.DDPM(), RandomNet()
    x0, eps = batch()
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2))
    abar = proc.s(t.double()) ** 2
    x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps
    classic = (eps - net(x_t, t.double())).pow(2).mean(1)
    D = PZ.Denoiser(net, proc, PZ.Eps())
    ours = L.denoising_loss(D, x0, proc.sigmas[t], L.weighting("native", PZ.Eps()), noise=eps)
    torch.testing.assert_close(ours, classic)


def test_v_loss():
    """Salimans & Ho 2022: || v - v_theta(x_t, t) ||^2 with v = alpha eps - sigma_t x0 (VP)."""
    proc, net = P.VP(), RandomNet()
    x0, eps = batch()
    t = torch.linspace(0.01, 1, 64, dtype=torch.float64)
    alpha, sig_t = proc.s(t), proc.s(t) * proc.sigma(t)
    x_t = alpha[:, None] * x0 + sig_t[:, None] * eps
    v = alpha[:, None] * eps - sig_t[:, None] * x0
    classic = (v - net(x_t, t)).pow(2).mean(1)
    ours = L.denoising_loss(PZ.Denoiser(net, proc, PZ.V()), x0, proc.sigma(t), L.weighting("native", PZ.V()), noise=eps)
    torch.testing.assert_close(ours, classic)


def test_flow_matching_loss():
    """Lipman et al. 2023 / Liu et al. 2023: || u_theta((1-t) x0 + t n, t) - (n - x0) ||^2."""
    proc, net = P.Flow(), RandomNet()
    x0, n = batch()
    t = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    classic = (net((1 - t)[:, None] * x0 + t[:, None] * n, t) - (n - x0)).pow(2).mean(1)
    ours = L.denoising_loss(PZ.Denoiser(net, proc, PZ.Velocity()), x0, proc.sigma(t),
                            L.weighting("native", PZ.Velocity()), noise=n)
    torch.testing.assert_close(ours, classic)


def test_edm_loss():
    """EDM eq. 8 / Table 1: lambda ||D - x0||^2 = ||F - (x0 - c_skip x)/c_out||^2 with
    lambda = (sigma^2 + sd^2) / (sigma sd)^2."""
    proc, net, pre = P.EDM(), RandomNet(), PZ.EDMPrecond(0.5)
    x0, n = batch()
    sigma = L.LogNormal().sample(64, torch.Generator().manual_seed(3))
    s = sigma[:, None]
    x = x0 + s * n
    c_in, c_skip, c_out = (s**2 + 0.25).rsqrt(), 0.25 / (s**2 + 0.25), s * 0.5 * (s**2 + 0.25).rsqrt()
    classic = (net(c_in * x, sigma.log() / 4) - (x0 - c_skip * x) / c_out).pow(2).mean(1)
    ours = L.denoising_loss(PZ.Denoiser(net, proc, pre), x0, sigma, L.weighting("edm", pre), noise=n)
    torch.testing.assert_close(ours, classic)


def test_min_snr_weighting():
    """Hang et al. 2023 on the eps-loss: min(SNR, 5)/SNR * ||eps_hat - eps||^2, SNR = 1/sigma^2."""
    sigma = torch.tensor([0.1, 0.3, 1.0, 5.0], dtype=torch.float64)
    snr = sigma**-2
    eps_weight = torch.clamp(snr, max=5.0) / snr  # on ||eps_hat - eps||^2 = ||D - x0||^2 / sigma^2
    torch.testing.assert_close(L.weighting("min_snr5", PZ.Eps())(sigma), eps_weight / sigma**2)


def test_densities():
    g = torch.Generator().manual_seed(0)
    s = L.LogNormal(-1.2, 1.2).sample(20000, g).log()
    assert abs(float(s.mean()) + 1.2) < 0.04 and abs(float(s.std()) - 1.2) < 0.04
    vp = P.VP()
    t = vp.t(L.UniformT(vp).sample(20000, g))
    assert abs(float(t.mean()) - (1e-3 + 1) / 2) < 0.01 and float(t.min()) >= 1e-3 - 1e-9
    d = P.DDPM()
    sig = L.DiscreteUniform(d).sample(500, g)
    assert torch.isin(sig, d.sigmas).all()
    # SD3: the shift moves flow time up: median of t' = shift*0.5/(1+(shift-1)*0.5) = 0.75 for shift 3
    sig3 = L.LogitNormalT(shift=3.0).sample(20000, g)
    assert abs(float((sig3 / (1 + sig3)).median()) - 0.75) < 0.01
    with pytest.raises(ValueError, match="DDPM"):
        L.DiscreteUniform(vp)


def test_condition_dropout():
    y = torch.arange(10).repeat(1000)
    out = L.null_labels(y, 10, 0.2, torch.Generator().manual_seed(0))
    frac = float((out == 10).double().mean())
    assert abs(frac - 0.2) < 0.015
    kept = out != 10
    assert torch.equal(out[kept], y[kept])
    assert torch.equal(L.null_labels(y, 10, 0.0), y)
    with pytest.raises(ValueError, match="dropout"):
        L.null_labels(y, 10, 1.5)


def test_unknown_weighting():
    with pytest.raises(ValueError, match="native"):
        L.weighting("p2", PZ.Eps())
    assert math.isfinite(float(L.weighting("uniform", PZ.Eps())(torch.tensor([1.0]))[0]))
