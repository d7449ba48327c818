"""Runge-Kutta solvers of the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 4 with s = 1)."""
from __future__ import annotations

import math

import torch

from .registry import noise_like, register


@register("euler", order=1)
def euler(denoise, x, sigmas, *, generator=None):
    """Euler on the PF-ODE; equals DDIM with eta = 0 (EDM, Karras et al. 2022, Sec. 3)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        # x + (s_next - s) (x - D) / s = D + (s_next/s)(x - D): one lerp, and s_next = 0 returns D exactly
        x = torch.lerp(D, x, s_next / s)
    return x


@register("heun", cost=lambda n, o: 2 * n - 1, order=2)
def heun(denoise, x, sigmas, *, generator=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """EDM Algorithm 2: Heun's 2nd-order method with optional churn (stochastic when s_churn > 0)."""
    n = len(sigmas) - 1
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        # churn: raise the noise level to s_hat by adding fresh noise
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + noise_like(x, generator) * (s_noise * math.sqrt(s_hat**2 - s**2))
        d = (x - denoise(x, s_hat)) / s_hat
        x_next = x + d * (s_next - s_hat)
        # trapezoidal correction, skipped on the last step to sigma = 0 (d is undefined there)
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (d + d_next) * (0.5 * (s_next - s_hat))
        x = x_next
    return x
