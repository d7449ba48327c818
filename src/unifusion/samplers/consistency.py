"""Multistep consistency sampling (Song et al. 2023, Algorithm 1).

A consistency model f(x, sigma) maps any point of a PF-ODE trajectory to its end, so one call
from the noise is a sample. More calls trade time for quality: add fresh noise back to the next
(lower) level and map to the end again. In the sigma-domain, for levels s_0 > s_1 > ... > s_{k-1}:

    x <- f(x, s_0);   for i = 1..k-1:  x <- f(x + sqrt(s_i^2 - eps^2) z_i, s_i)

with eps the model's sigma_min (the paper's epsilon, `sigma_floor` here; 0 for a plain denoiser).
One call per level, so NFE k = k levels. With any denoiser D in place of f it still runs (each
call jumps to E[x_0 | x]); a consistency model's spec supplies its own grid ("consistency").
"""
from __future__ import annotations

import math

from .registry import noise_like, register


@register("consistency", order=0, stochastic=True)
def consistency(denoise, x, sigmas, *, generator=None, sigma_floor=0.0):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): one jump to the end per level."""
    levels, end = sigmas[:-1], sigmas[-1]
    x = denoise(x, levels[0])  # the one-step sample
    for s in levels[1:]:
        # renoise to level s (the clean estimate sits at eps, not 0), then jump to the end again
        x = denoise(x + noise_like(x, generator) * math.sqrt(max(s * s - sigma_floor**2, 0.0)), s)
    if end > 0:  # a grid that stops above 0 (not a sampling grid): return a point at that level
        x = x + noise_like(x, generator) * end
    return x
