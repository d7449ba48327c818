"""Reverse-SDE and Langevin samplers.

For every process the sigma-domain process x = x_t / s(t) obeys dx = sqrt(d sigma^2 / dt) dw, so
its reverse SDE is the same for all of them (Song et al. 2021, eq. 6; EDM eq. 6 with beta = 1):
    dx = 2 (x - D(x, sigma)) / sigma dsigma + sqrt(2 sigma) dw_bar      (sigma decreasing).
The score is (D - x) / sigma^2. A final step to sigma = 0 returns D (Tweedie's denoising step).
"""
from __future__ import annotations

import math

from .registry import noise_like, register


@register("euler_maruyama", order=0, stochastic=True)
def euler_maruyama(denoise, x, sigmas, *, generator=None):
    """Euler-Maruyama on the reverse SDE above."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        if s_next == 0:
            return D
        ds = s - s_next  # > 0
        x = x - (x - D) * (2 * ds / s) + noise_like(x, generator) * math.sqrt(2 * s * ds)
    return x


def _langevin(denoise, x, s, generator, snr):
    """One Langevin step at level s with step size eps = 2 (snr * s)^2.

    Song et al. (2021, Algorithm 5) set eps = 2 (snr ||z|| / ||score||)^2 with norms averaged over
    the batch; in high dimension ||score|| ~ ||z|| / s and the two agree. Per example the ratio of
    norms is unstable in low dimension (tiny scores near a mode give huge steps and a biased
    stationary law), and batch averages would make a sample depend on its batch-mates, so the
    step is set from the level itself."""
    eps = 2 * (snr * s) ** 2
    return x + (denoise(x, s) - x) * (eps / s**2) + noise_like(x, generator) * math.sqrt(2 * eps)


@register("pc", cost=lambda n, o: n * (1 + o["corrector_steps"]), order=0, stochastic=True)
def pc(denoise, x, sigmas, *, generator=None, snr=0.16, corrector_steps=1):
    """Predictor-corrector (Song et al. 2021, Algorithm 2): at each level Langevin corrector
    steps, then the reverse-diffusion predictor (ancestral step of the reverse SDE)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        for _ in range(corrector_steps):
            x = _langevin(denoise, x, s, generator, snr)
        D = denoise(x, s)
        # reverse diffusion predictor: x + (s^2 - s'^2) score + sqrt(s^2 - s'^2) z
        g2 = s**2 - s_next**2
        x = x + (D - x) * (g2 / s**2)
        if s_next > 0:
            x = x + noise_like(x, generator) * math.sqrt(g2)
    return x


@register("annealed_langevin", cost=lambda n, o: n * o["steps_per_level"] + 1, order=0, stochastic=True)
def annealed_langevin(denoise, x, sigmas, *, generator=None, steps_per_level=5, step_scale=0.2):
    """Annealed Langevin dynamics (SMLD, Song & Ermon 2019, Algorithm 1) over the nonzero levels,
    step alpha_i = step_scale * sigma_i^2 (their eps / sigma_L^2 = step_scale), then one denoising
    step (Jolicoeur-Martineau et al. 2021) when the grid ends at 0."""
    levels = [s for s in sigmas if s > 0]
    for s in levels:
        a = step_scale * s**2
        for _ in range(steps_per_level):
            D = denoise(x, s)
            x = x + (D - x) * (a / (2 * s**2)) + noise_like(x, generator) * math.sqrt(a)
    if sigmas[-1] == 0:
        x = denoise(x, levels[-1])
    return x
