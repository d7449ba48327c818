"""Processes against their papers' own definitions and against calculus."""
import json
import math

import pytest
import torch

from unifusion import processes as P

ALL = [P.VE(), P.VP(), P.SubVP(), P.DDPM("linear"), P.DDPM("cosine"), P.EDM(), P.Flow()]


def interior_t(proc, n=7):
    lo, hi = proc.t_min, min(proc.t_max, 0.97) if isinstance(proc, P.Flow) else proc.t_max
    return torch.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n, dtype=torch.float64)


@pytest.mark.parametrize("proc", ALL, ids=repr)
def test_t_of_sigma_inverts_sigma(proc):
    t = interior_t(proc)
    torch.testing.assert_close(proc.t(proc.sigma(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("proc", ALL, ids=repr)
def test_derivatives_match_finite_differences(proc):
    t = interior_t(proc)
    if isinstance(proc, P.DDPM):  # piecewise log-linear: differentiate inside one interval
        t = t.floor() + 0.5
    h = 1e-6 * max(1.0, proc.t_max - proc.t_min)
    fd_sigma = (proc.sigma(t + h) - proc.sigma(t - h)) / (2 * h)
    fd_s = (proc.s(t + h) - proc.s(t - h)) / (2 * h)
    torch.testing.assert_close(proc.dsigma(t), fd_sigma, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(proc.ds(t), fd_s, rtol=1e-6, atol=1e-9)


def test_vp_matches_score_sde_marginals():
    # Song et al. 2021 eq. 33: mean coefficient exp(-1/4 t^2 (b1-b0) - 1/2 t b0), var 1 - mean^2
    vp, t = P.VP(), torch.linspace(0.01, 1, 9, dtype=torch.float64)
    mean = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    torch.testing.assert_close(vp.s(t), mean)
    torch.testing.assert_close(vp.s(t) * vp.sigma(t), torch.sqrt(1 - mean**2))
    sub = P.SubVP()  # eq. 34: sub-VP std is 1 - mean^2
    torch.testing.assert_close(sub.s(t) * sub.sigma(t), 1 - mean**2)


def test_ddpm_matches_ho_et_al():
    d = P.DDPM("linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    i = torch.tensor([0.0, 10, 500, 999], dtype=torch.float64)
    torch.testing.assert_close(d.s(i) ** 2, abar[i.long()])
    torch.testing.assert_close((d.s(i) * d.sigma(i)) ** 2, 1 - abar[i.long()])
    # cosine: abar(t) = f(t)/f(0), f = cos^2((t/T + s)/(1 + s) pi/2) (Nichol & Dhariwal eq. 17)
    c = P.DDPM("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(c.s(torch.tensor(300.0, dtype=torch.float64)) ** 2) - f(301) / f(0)) < 1e-9


def test_flow_is_linear_interpolation():
    fl, t = P.Flow(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x0, n = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    xt = fl.s(t) * (x0 + fl.sigma(t) * n)
    torch.testing.assert_close(xt, (1 - t) * x0 + t * n)


def test_edm_and_ve():
    t = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(P.EDM().sigma(t), t)
    ve = P.VE(0.01, 50)
    torch.testing.assert_close(ve.sigma(torch.tensor([0.0, 1.0], dtype=torch.float64)),
                               torch.tensor([0.01, 50.0], dtype=torch.float64))


def test_get_by_name_and_errors():
    assert isinstance(P.get("vp"), P.VP)
    with pytest.raises(ValueError, match="choose one of"):
        P.get("vpp")
    with pytest.raises(ValueError, match="cosine"):
        P.DDPM("quadratic")
    valid = r"\['beta_min', 'beta_d', 't_min'\]"
    with pytest.raises(ValueError, match=r"no argument\(s\) \['sigma_max'\]; its arguments are " + valid):
        P.get("vp", sigma_max=80.0)


@pytest.mark.parametrize("cls, kwargs, match", [
    (P.VE, dict(sigma_min=0.0), "0 < sigma_min < sigma_max"),
    (P.VE, dict(sigma_min=2.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
    (P.VE, dict(sigma_max=math.inf), "sigma_max must be a finite number"),
    (P.VP, dict(beta_min=-0.1), "beta_min >= 0"),
    (P.VP, dict(beta_min=0.0, beta_d=0.0), "not both 0"),
    (P.VP, dict(t_min=1.0), "t_min < t_max"),
    (P.VP, dict(t_min=math.nan), "t_min must be a finite number"),
    (P.SubVP, dict(beta_d=-1.0), "SubVP needs beta_min >= 0"),
    (P.DDPM, dict(T=1), "T >= 2"),
    (P.DDPM, dict(T=10.5), "integer"),
    (P.DDPM, dict(schedule="sqrt"), "linear' or 'cosine"),
    (P.EDM, dict(sigma_min=0.0), "0 < sigma_min < sigma_max"),
    (P.EDM, dict(sigma_min=100.0), "0 < sigma_min < sigma_max"),
    (P.Flow, dict(t_max=1.5), "0 < t_max <= 1"),
    (P.Flow, dict(t_max=0.0), "0 < t_max <= 1"),
])
def test_constructors_validate_their_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("proc", ALL + [P.VE(0.002, 80.0), P.VP(0.05, 10.0, 1e-4), P.DDPM("cosine", 500),
                                        P.EDM(0.01, 10.0), P.Flow(0.9)], ids=repr)
def test_kwargs_rebuild_the_process(proc):
    kw = json.loads(json.dumps(proc.kwargs()))  # what a saved spec holds
    again = P.get(proc.name, **kw)
    assert type(again) is type(proc) and repr(again) == repr(proc)
    t = interior_t(proc)
    torch.testing.assert_close(again.sigma(t), proc.sigma(t), rtol=0, atol=0)
    torch.testing.assert_close(again.s(t), proc.s(t), rtol=0, atol=0)


def test_flow_time_of_inf_is_one():
    fl = P.Flow()
    t = fl.t(torch.tensor([math.inf, 0.0, 1.0], dtype=torch.float64))
    assert t.tolist() == [1.0, 0.0, 0.5]
    assert math.isinf(float(fl.sigma(torch.tensor(1.0, dtype=torch.float64))))


def test_shift_time():
    """SD3's shift multiplies sigma = t / (1 - t) by the shift; unshift_time inverts it."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        ts = P.shift_time(t, shift)
        inner = slice(1, -1)  # sigma is 0 and inf at the ends
        torch.testing.assert_close(ts[inner] / (1 - ts[inner]), shift * t[inner] / (1 - t[inner]))
        torch.testing.assert_close(P.unshift_time(ts, shift), t)
        assert float(ts[0]) == 0 and float(ts[-1]) == 1
