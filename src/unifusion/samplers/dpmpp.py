"""DPM-Solver++ family (Lu et al. 2022, arXiv:2211.01095) in the sigma-domain, lambda = -log sigma.

A step to sigma = 0 (h = infinity) returns the current denoised value, as in the paper.
"""
from __future__ import annotations

import math

import torch

from .ancestral import ancestral_split
from .expint import exp_weights
from .registry import noise_like, register


@register("dpmpp_2m", order=2)
def dpmpp_2m(denoise, x, sigmas, *, generator=None):
    """DPM-Solver++(2M), Algorithm 2: data-prediction multistep of order 2."""
    D_prev, h_prev = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        if s_next == 0:
            return D
        h = math.log(s / s_next)
        # first step is DPM-Solver++(1) = DDIM; later steps extrapolate D linearly in lambda:
        # Dt = D + (D - D_prev) h / (2 h_prev), then x' = e^{-h} x + (1 - e^{-h}) Dt (two lerps)
        Dt = D if D_prev is None else torch.lerp(D_prev, D, 1 + h / (2 * h_prev))
        x = torch.lerp(Dt, x, s_next / s)
        D_prev, h_prev = D, h
    return x


@register("dpmpp_3m", order=3)
def dpmpp_3m(denoise, x, sigmas, *, generator=None, order=3, lower_order_final=True):
    """Multistep exponential integrator: the polynomial through the last `order` denoiser outputs
    (in lambda) integrated exactly against e^{-(h - tau)}; order 3 is DPM-Solver++(3M).

    The integral is exact: the reference implementations (DPM-Solver's, k-diffusion's,
    diffusers') weight the second difference by half of it (phi_3 = phi_2/h - 1/2 against the
    exact h^3/6 leading term), which makes them second order as h -> 0; this one shows order 3
    (tests/test_samplers.py), at the price of more error than theirs at some budgets under ~20."""
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    Ds, n = [], len(sigmas) - 1
    for i in range(n):
        D = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return D
        Ds = ([D] + Ds)[:order]
        # warm start with fewer past values; with few steps left, lower order is more stable
        k = min(order, len(Ds), n - 1 - i) if lower_order_final and n < 15 else min(order, len(Ds))
        k = max(k, 1)
        h = lam[i + 1] - lam[i]
        w = exp_weights(h, [lam[i - j] - lam[i] for j in range(k)])
        x = x * math.exp(-h)
        for wj, Dj in zip(w, Ds[:k]):
            x = x + Dj * wj
    return x


@register("dpmpp_2s", cost=lambda n, o: 2 * n - 1, order=2)
def dpmpp_2s(denoise, x, sigmas, *, generator=None, eta=0.0, s_noise=1.0):
    """DPM-Solver++(2S) with r = 1/2 (exponential midpoint rule); eta > 0 gives the ancestral form."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        if s_next == 0:
            return D
        # ancestral split: deterministic step down to s_down, fresh noise of std s_up on top
        s_down, s_up = ancestral_split(s, s_next, eta)
        s_mid = math.sqrt(s * s_down)  # lambda midpoint; s_mid / s = e^{-h/2} with h = log(s / s_down)
        u = torch.lerp(D, x, s_mid / s)  # e^{-h/2} x + (1 - e^{-h/2}) D
        x = torch.lerp(denoise(u, s_mid), x, s_down / s)
        if s_up > 0:
            x = x + noise_like(x, generator) * (s_up * s_noise)
    return x


@register("dpmpp_2m_sde", order=0, stochastic=True)
def dpmpp_2m_sde(denoise, x, sigmas, *, generator=None, eta=1.0, s_noise=1.0):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5 / Appendix): eta=1 is the reverse SDE,
    eta=0 the PF-ODE; midpoint form of the second-order term."""
    D_prev, h_prev = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        if s_next == 0:
            return D
        h = math.log(s / s_next)
        a = -math.expm1(-(1 + eta) * h)  # weight of D
        x = x * (s_next / s * math.exp(-eta * h)) + D * a
        if D_prev is not None:
            x = x + (D - D_prev) * (0.5 * a * h / h_prev)
        if eta > 0:
            x = x + noise_like(x, generator) * (s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        D_prev, h_prev = D, h
    return x
