"""The classic training losses are instances of lambda(sigma) ||D - x0||^2 (written out and checked)."""
import math

import pytest
import torch

from unifusion import densities
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


def test_densities_moved_but_still_importable_from_losses():
    for name in ("NoiseDensity", "LogNormal", "UniformT", "LogitNormalT", "DiscreteUniform"):
        assert getattr(L, name) is getattr(densities, name)


@pytest.mark.parametrize("name, process, kwargs, cls", [
    ("lognormal", P.EDM(), dict(p_mean=-0.4, p_std=1.0), densities.LogNormal),
    ("uniform_t", P.VP(), dict(t_min=0.01, t_max=0.5), densities.UniformT),
    ("logit_normal", P.Flow(), dict(m=0.5, s=0.8, shift=3.0), densities.LogitNormalT),
    ("discrete", P.DDPM(), {}, densities.DiscreteUniform),
])
def test_make_density_by_name(name, process, kwargs, cls):
    p = densities.make(name, process, **kwargs)
    assert type(p) is cls
    for k, v in kwargs.items():
        assert getattr(p, k) == v
    sig = p.sample(4000, torch.Generator().manual_seed(0))
    assert sig.shape == (4000,) and (sig > 0).all() and torch.isfinite(sig).all()
    if name == "uniform_t":  # t ~ U(0.01, 0.5) of the process
        t = process.t(sig)
        assert float(t.min()) >= 0.01 - 1e-9 and float(t.max()) <= 0.5 + 1e-9 and abs(float(t.mean()) - 0.255) < 0.01


def test_make_density_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"choose one of \['discrete', 'logit_normal', 'lognormal', 'uniform_t'\]"):
        densities.make("cosine", P.EDM())
    with pytest.raises(ValueError, match=r"no argument\(s\) \['mean'\]; its arguments are \['p_mean', 'p_std'\]"):
        densities.make("lognormal", P.EDM(), mean=0.0)
    with pytest.raises(ValueError, match="its arguments are \\['m', 's', 'shift'\\]"):
        densities.make("logit_normal", P.Flow(), p_std=1.0)
    with pytest.raises(ValueError, match="arguments are none"):
        densities.make("discrete", P.DDPM(), T=10)
    with pytest.raises(ValueError, match="DDPM"):
        densities.make("discrete", P.VP())


def test_uniform_t_on_flow_stays_inside_t_below_one():
    p = densities.UniformT(P.Flow())
    assert p.t_max == 1 - densities.FLOW_T_MARGIN
    sig = p.sample(100000, torch.Generator().manual_seed(0))
    assert torch.isfinite(sig).all() and float(P.Flow().t(sig).max()) < 1
    with pytest.raises(ValueError, match="sigma = inf"):
        densities.UniformT(P.Flow(), t_max=1.0)


def test_logit_normal_uses_the_shift():
    """The same z through shift_time: sigma' = shift * sigma (see test_processes.test_shift_time)."""
    a = densities.LogitNormalT(shift=1.0).sample(1000, torch.Generator().manual_seed(3))
    b = densities.LogitNormalT(shift=3.0).sample(1000, torch.Generator().manual_seed(3))
    inside = (a > 1e-4) & (a < 1e4)  # away from the clamp at t = 1e-5 and 1 - 1e-5
    torch.testing.assert_close(b[inside], 3.0 * a[inside])


def test_condition_dropout():
    """Class conditioning's dropout (models/conditioning.py, the one place it is written): a mask
    drawn with probability p sends exactly those labels to the null class."""
    from unifusion.models.conditioning import ClassConditioning
    y = torch.arange(10).repeat(1000)
    cond = ClassConditioning(10, 4, drop=0.2)
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) < cond.p_drop
    out = cond.drop({"y": y}, mask)["y"]
    frac = float((out == 10).double().mean())
    assert abs(frac - 0.2) < 0.015
    kept = out != 10
    assert torch.equal(out[kept], y[kept])
    assert torch.equal(cond.drop({"y": y}, torch.zeros_like(y, dtype=torch.bool))["y"], y)
    with pytest.raises(ValueError, match="dropout"):
        ClassConditioning(10, 4, drop=1.5)


def test_unknown_weighting():
    with pytest.raises(ValueError, match="native"):
        L.weighting("p2", PZ.Eps())
    assert math.isfinite(float(L.weighting("uniform", PZ.Eps())(torch.tensor([1.0]))[0]))
