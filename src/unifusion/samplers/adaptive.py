"""Adaptive Dormand-Prince 5(4) on the PF-ODE in u = log sigma, where dx/du = x - D(x, e^u)."""
from __future__ import annotations

import math
import warnings

import torch

from .registry import register

# Dormand & Prince (1980) tableau: nodes c, stages a, 5th-order weights b, error weights e = b - b*
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
      [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_E = [71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]


@register("dopri5", cost=lambda n, o: 10**9, order=5, adaptive=True)
def dopri5(denoise, x, sigmas, *, generator=None, rtol=1e-3, atol=1e-3, h_init=0.1, max_nfe=None):
    """Adaptive RK45 (Dormand-Prince) between the first and last nonzero sigma of the grid (only
    its ends are used), with per-example error control; then one denoising step if it ends at 0.

    max_nfe caps the denoiser calls: when the next step would pass it, the solve stops where it
    is and warns, and the final denoising step uses the level reached."""
    levels = [s for s in sigmas if s > 0]
    u, u_end = math.log(levels[0]), math.log(levels[-1])
    nfe = 0

    def f(x_, u_):
        nonlocal nfe
        nfe += 1
        return x_ - denoise(x_, math.exp(u_))

    h, k1 = -abs(h_init), None
    while u > u_end + 1e-12:
        # a step costs 6 calls, 7 for the first (FSAL reuses the last stage); keep one for the end
        if max_nfe is not None and nfe + 6 + (k1 is None) + (sigmas[-1] == 0) > max_nfe:
            warnings.warn(f"dopri5 stopped at sigma={math.exp(u):.4g}: max_nfe={max_nfe} reached")
            break
        h = max(h, u_end - u)  # don't step past the end (h < 0)
        if k1 is None:
            k1 = f(x, u)
        ks = [k1]
        for c, a in zip(_C[1:], _A[1:]):
            xi = x
            for aj, kj in zip(a, ks):
                if aj:
                    xi = xi + kj * (h * aj)
            ks.append(f(xi, u + c * h))
        x_new = xi  # the 7th stage's input is the 5th-order solution (FSAL)
        err = sum(kj * (h * ej) for ej, kj in zip(_E, ks) if ej)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        # RMS error per example; the step is accepted only if every example passes
        ratio = float((err / scale).flatten(1).pow(2).mean(1).sqrt().max())
        if ratio <= 1:
            x, u, k1 = x_new, u + h, ks[-1]
        h = h * min(5.0, max(0.2, 0.9 * (ratio + 1e-16) ** -0.2))
    if sigmas[-1] == 0:
        x = denoise(x, math.exp(u))
    return x
