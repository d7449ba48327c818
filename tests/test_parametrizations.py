"""Every parametrization of the exact denoiser gives the same D; targets are the papers' quantities."""
import math

import pytest
import torch

from unifusion import parametrizations as PZ
from unifusion import processes as P
from tests.oracles import mixture_2d

PARAMS = [PZ.Eps(), PZ.X0(), PZ.V(), PZ.Velocity(), PZ.EDMPrecond(0.5)]
PROCS = [P.VE(), P.VP(), P.SubVP(), P.DDPM("linear"), P.EDM(), P.Flow()]


def exact_F(param, gm, x, sigma):
    """The oracle's F for each parametrization, from E[x0|x] and E[n|x] computed separately."""
    x0, n = gm.denoise(x, sigma), gm.eps(x, sigma)
    s = sigma[:, None]
    return {
        "eps": n,
        "x0": x0,
        "v": (n - s * x0) / torch.sqrt(1 + s**2),
        "velocity": n - x0,
        # EDM's F is defined only through D (Karras et al. eq. 7)
        "edm": (x0 - param.c_skip(sigma)[:, None] * x) / param.c_out(sigma)[:, None],
    }[param.name]


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_exact_F_gives_exact_D(param):
    gm = mixture_2d()
    g = torch.Generator().manual_seed(0)
    x0, _ = gm.sample(64, g)
    sigma = torch.exp(torch.linspace(-5, 4, 64, dtype=torch.float64))
    x = x0 + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(param.to_denoised(exact_F(param, gm, x, sigma), x, sigma),
                               gm.denoise(x, sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_targets_and_loss_weight(param):
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.linspace(-4, 4, 32, dtype=torch.float64))
    s = sigma[:, None]
    want = {"eps": n, "x0": x0, "v": (n - s * x0) / torch.sqrt(1 + s**2), "velocity": n - x0}
    tgt = param.target(x0, n, sigma)
    if param.name in want:
        torch.testing.assert_close(tgt, want[param.name])
    # the F-loss is the D-loss weighted by 1/c_out^2, for any F
    x = x0 + s * n
    F = torch.randn(32, 3, generator=g, dtype=torch.float64)
    D = param.to_denoised(F, x, sigma)
    torch.testing.assert_close(((F - tgt) ** 2).sum(1), param.loss_weight(sigma) * ((D - x0) ** 2).sum(1))


def test_v_is_salimans_ho_v_of_the_vp_process():
    # v = alpha n - sigma_t x0 with alpha = s(t), sigma_t = s(t) sigma for VP (Salimans & Ho 2022)
    vp, t = P.VP(), torch.linspace(0.05, 1, 8, dtype=torch.float64)
    sig, alpha = vp.sigma(t), vp.s(t)
    x0, n = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    v_paper = alpha[:, None] * n - (alpha * sig)[:, None] * x0
    torch.testing.assert_close(PZ.V().target(x0, n, sig), v_paper)
    # ... and it is EDM's preconditioning with sigma_data = 1, up to the sign of c_out
    e1 = PZ.EDMPrecond(1.0)
    torch.testing.assert_close(PZ.V().c_skip(sig), e1.c_skip(sig))
    torch.testing.assert_close(PZ.V().c_out(sig), -e1.c_out(sig))


class OracleNet(torch.nn.Module):
    """A 'network' that undoes c_in / c_noise and returns the exact F: lets the Denoiser wrapper be
    checked for every process x parametrization."""

    def __init__(self, gm, process, param):
        super().__init__()
        self.gm, self.process, self.param = gm, process, param

    def forward(self, x_in, c_noise):
        if isinstance(self.param, PZ.EDMPrecond):
            sigma = torch.exp(4 * c_noise)
        else:
            sigma = self.process.sigma(c_noise)
        x = x_in / PZ._bc(self.param.c_in(sigma, self.process), x_in)
        return exact_F(self.param, self.gm, x, sigma)


def oracle_denoiser(gm, process, param):
    return PZ.Denoiser(OracleNet(gm, process, param), process, param)


@pytest.mark.parametrize("proc", PROCS, ids=repr)
@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_denoiser_wrapper_every_process_and_parametrization(proc, param):
    gm = mixture_2d()
    lo, hi = proc.sigma_range()
    sigma = torch.exp(torch.linspace(math.log(max(lo, 0.003)), math.log(min(hi, 60.0)), 16, dtype=torch.float64))
    x = gm.sample(16, torch.Generator().manual_seed(2))[0] + sigma[:, None] * torch.randn(16, 2, dtype=torch.float64)
    torch.testing.assert_close(oracle_denoiser(gm, proc, param)(x, sigma), gm.denoise(x, sigma), rtol=1e-7, atol=1e-7)


def test_get_by_name():
    assert PZ.get("edm", sigma_data=1.0).sigma_data == 1.0
    with pytest.raises(ValueError, match="choose one of"):
        PZ.get("score")
