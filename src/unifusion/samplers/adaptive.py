"""Adaptive Dormand-Prince 5(4) in torch, and the dopri5 sampler: the PF-ODE in u = log sigma,
where dx/du = x - D(x, e^u). likelihood.py integrates with the same `integrate_rk45`."""
from __future__ import annotations

import math
import warnings

import torch

from .registry import NonFiniteError, register

# Dormand & Prince (1980) tableau: nodes c, stages a, 5th-order weights b, error weights e = b - b*
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
      [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_E = [71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]


def integrate_rk45(f, y0: torch.Tensor, t0: float, t1: float, *, rtol: float = 1e-3, atol: float = 1e-3,
                   h_init: float = 0.1, max_nfe: int | None = None) -> tuple[torch.Tensor, float, int]:
    """Solve dy/dt = f(y, t) from t0 to t1 (either direction) for a batch y of shape (B, ...).

    Per-example error control: a step is accepted when every example's RMS of err / (atol + rtol |y|)
    is <= 1. The state stays a tensor on y0's device. max_nfe caps the calls of f: the solve stops
    before a step that would pass it. Returns (y, t, calls); t == t1 exactly when it finished."""
    direction = 1.0 if t1 >= t0 else -1.0
    y, t, h, k1, calls = y0, t0, direction * abs(h_init), None, 0
    while direction * (t1 - t) > 0:
        # a step costs 6 calls, 7 for the first (FSAL reuses the last stage of the previous step)
        if max_nfe is not None and calls + 6 + (k1 is None) > max_nfe:
            break
        last = abs(h) >= abs(t1 - t)  # don't step past the end
        if last:
            h = t1 - t
        if k1 is None:
            k1, calls = f(y, t), calls + 1
        ks = [k1]
        for c, a in zip(_C[1:], _A[1:]):
            yi = y
            for aj, kj in zip(a, ks):
                if aj:
                    yi = yi + kj * (h * aj)
            ks.append(f(yi, t + c * h))
            calls += 1
        y_new = yi  # the 7th stage's input is the 5th-order solution (FSAL)
        err = sum(kj * (h * ej) for ej, kj in zip(_E, ks) if ej)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        # RMS error per example; the step is accepted only if every example passes
        ratio = float((err / scale).flatten(1).pow(2).mean(1).sqrt().max())
        if not math.isfinite(ratio):
            raise NonFiniteError(f"RK45: the derivative holds NaN or inf on the step from t={t:.6g} to {t + h:.6g}")
        if ratio <= 1:
            y, t, k1 = y_new, (t1 if last else t + h), ks[-1]
        h = h * min(5.0, max(0.2, 0.9 * (ratio + 1e-16) ** -0.2))
        if abs(h) < 1e-12 * max(1.0, abs(t)):
            raise RuntimeError(f"RK45: step size underflow at t={t:.6g}; loosen rtol/atol (now {rtol}, {atol})")
    return y, t, calls


@register("dopri5", cost=lambda n, o: 6 * n + 2, order=5, adaptive=True)
def dopri5(denoise, x, sigmas, *, generator=None, rtol=1e-3, atol=1e-3, h_init=0.1, max_nfe=None,
           allow_partial=False):
    """Adaptive RK45 (Dormand-Prince) between the first and last nonzero sigma of the grid (only
    its ends are used), with per-example error control; then one denoising step if it ends at 0.

    max_nfe caps the denoiser calls (n accepted steps cost 6n + 1, plus 1 for the denoising step).
    A solve that runs out of calls before the last level is an error, unless allow_partial=True:
    then it warns, and the denoising step uses the level reached."""
    levels = [s for s in sigmas if s > 0]
    final = sigmas[-1] == 0
    budget = None if max_nfe is None else max_nfe - final  # keep one call for the denoising step
    if budget is not None and budget < 7 and not allow_partial:
        raise ValueError(f"dopri5 needs nfe >= {7 + final} for one step (it has {max_nfe}); raise nfe or pass "
                         f"allow_partial=True")
    u_end = math.log(levels[-1])
    x, u, _ = integrate_rk45(lambda x_, u_: x_ - denoise(x_, math.exp(u_)), x, math.log(levels[0]), u_end,
                             rtol=rtol, atol=atol, h_init=h_init, max_nfe=budget)
    if u != u_end:
        msg = (f"dopri5 stopped at sigma={math.exp(u):.4g} above sigma_min={levels[-1]:.4g}: max_nfe={max_nfe} "
               f"reached. Raise nfe, loosen rtol/atol (now {rtol}, {atol}), or pass allow_partial=True")
        if not allow_partial:
            raise RuntimeError(msg)
        warnings.warn(msg)
    if final:
        x = denoise(x, math.exp(u))
    return x
