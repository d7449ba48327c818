"""DDIM / DDPM steps in the sigma-domain.

The DDPM posterior q(x_{t'} | x_t, x_0) mapped to x = x_t / s(t) does not depend on the process:
mean (s'^2/s^2) x + (1 - s'^2/s^2) x_0 and std s' sqrt(1 - s'^2/s^2), writing s, s' for the
noise levels sigma, sigma'. So DDPM, DDIM and the ancestral sampler work unchanged for every
process; only the grid (e.g. grids.ddpm timesteps) carries the process.
"""
from __future__ import annotations

import math

import torch

from .registry import noise_like, register


def ancestral_split(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(s_down, s_up): a step s -> s_next as a deterministic step down to s_down plus fresh noise of
    std s_up, with s_down^2 + s_up^2 = s_next^2. s_up = eta s' sqrt(1 - s'^2/s^2) is DDIM's
    sigma_t(eta) divided by s(t') (Song et al. 2021a, eq. 16), k-diffusion's get_ancestral_step."""
    s_up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1 - (s_next / s) ** 2)))
    return math.sqrt(s_next**2 - s_up**2), s_up


@register("ddim", order=1)
def ddim(denoise, x, sigmas, *, generator=None, eta=0.0, s_noise=1.0):
    """DDIM (Song et al. 2021a, eq. 12) with stochasticity eta; eta=0 is Euler, eta=1 is DDPM."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        s_down, s_up = ancestral_split(s, s_next, eta)
        # keep the predicted noise (x - D)/s at the level s_down, add fresh noise for the rest
        x = D + (x - D) * (s_down / s)
        if s_up > 0:
            x = x + noise_like(x, generator) * (s_up * s_noise)
    return x


@register("euler_ancestral", order=0, stochastic=True)
def euler_ancestral(denoise, x, sigmas, *, generator=None, eta=1.0, s_noise=1.0):
    """Euler ancestral (k-diffusion): Euler down to sigma_down, then noise up to sigma'.

    With sigma_up = eta * sqrt(s'^2 (s^2 - s'^2) / s^2) this is DDIM(eta) written as a step to a
    lower level plus noise; the function is shared to keep one implementation.
    """
    return ddim(denoise, x, sigmas, generator=generator, eta=eta, s_noise=s_noise)


@register("ddpm", order=0, stochastic=True)
def ddpm(denoise, x, sigmas, *, generator=None):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7): draw from q(x_{t'} | x_t, x_0 = D)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        ratio = (s_next / s) ** 2
        # posterior mean and std, written in the sigma-domain (see module docstring)
        x = torch.lerp(D, x, ratio)
        if s_next > 0:
            x = x + noise_like(x, generator) * (s_next * math.sqrt(1 - ratio))
    return x
