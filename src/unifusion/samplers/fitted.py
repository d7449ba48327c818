"""A multistep solver whose combination coefficients are fitted to the model (`sampler='fitted'`).

Base: the exponential multistep integrator of dpmpp_3m (the polynomial through the last `order`
denoiser outputs in lambda = -log sigma, integrated exactly), with its warm start and its lower
order near the end. Each step then adds a fitted correction that keeps a constant solution
constant (x = D = c stays c):

    x' = base(x, D_i, D_{i-1}, ...) + a_i (x - D_i) + sum_{j >= 1} b_ij (D_{i-j} - D_i)

a_i moves the weight of x (where the denoiser is far from constant in x, e.g. along directions of
small data variance near the end, the exact update of x is not e^{-h}), b_ij the weights of the
past outputs (as DPM-Solver-v3's empirical model statistics or learned multistep weights do,
here fitted directly on the final error). The last step (to sigma = 0) returns
D_i + a (x - D_i) + sum_j b_j (D_{i-j} - D_i): an extrapolation to sigma = 0 from the last level.

With no coefficients (all zero) it is dpmpp_3m exactly. `uf.samplers.calibrate(..., 'fitted', nfe)`
fits the grid and then the coefficients jointly (L-BFGS through `fitted_t`, the same update on
tensors); the Calibration carries them and `uf.sample(..., 'fitted', grid=calibration)` uses them.
"""
from __future__ import annotations

import math

import torch

from .expint import exp_weights, lagrange_weights
from .registry import register


def step_orders(n: int, order: int = 3, lower_order_final: bool = True) -> list[int]:
    """How many denoiser outputs step i of n combines (the base's order, as dpmpp_3m picks it; the
    last step, to sigma = 0, uses every output it has): also the length k_i of step i's correction
    [a_i, b_i1, ..., b_i(k-1)]."""
    out = []
    for i in range(n):
        have = min(order, i + 1)
        if i == n - 1:
            out.append(have)
        else:
            k = min(order, have, n - 1 - i) if lower_order_final and n < 15 else min(order, have)
            out.append(max(k, 1))
    return out


def check_coefficients(coefficients, n: int, order: int = 3, lower_order_final: bool = True) -> list[list[float]]:
    """The coefficients as lists of floats, after checking their shape against n steps (ValueError)."""
    sizes = step_orders(n, order, lower_order_final)
    if not isinstance(coefficients, (list, tuple)) or len(coefficients) != n:
        got = len(coefficients) if isinstance(coefficients, (list, tuple)) else type(coefficients).__name__
        raise ValueError(f"'fitted' coefficients: need one list per step ({n} for this grid), got {got}; they "
                         f"come from uf.samplers.calibrate(..., 'fitted', nfe) and fit only the grid they were "
                         f"fitted with")
    out = []
    for i, (c, k) in enumerate(zip(coefficients, sizes)):
        if not isinstance(c, (list, tuple)) or len(c) != k:
            raise ValueError(f"'fitted' coefficients: step {i} needs {k} numbers (order {order}), got {c!r}")
        vals = [float(v) for v in c]
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"'fitted' coefficients: step {i} holds NaN or inf: {c!r}")
        out.append(vals)
    return out


@register("fitted", order=3)
def fitted(denoise, x, sigmas, *, generator=None, order=3, lower_order_final=True, coefficients=None):
    """Exponential multistep (dpmpp_3m) plus per-step correction coefficients fitted by
    `calibrate(..., 'fitted', nfe)`; without coefficients it is dpmpp_3m. See samplers/fitted.py."""
    n = len(sigmas) - 1
    orders = step_orders(n, order, lower_order_final)
    coef = check_coefficients(coefficients, n, order, lower_order_final) if coefficients is not None else None
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    Ds = []
    for i in range(n):
        D = denoise(x, sigmas[i])
        Ds = ([D] + Ds)[:order]
        k, c = orders[i], (coef[i] if coef is not None else None)
        if sigmas[i + 1] == 0:
            out = D
        else:
            h = lam[i + 1] - lam[i]
            w = exp_weights(h, [lam[i - j] - lam[i] for j in range(k)])
            out = x * math.exp(-h)
            for wj, Dj in zip(w, Ds[:k]):
                out = out + Dj * wj
        if c is not None:
            out = out + (x - D) * c[0]
            for bj, Dj in zip(c[1:], Ds[1:k]):
                out = out + (Dj - D) * bj
        x = out
        if sigmas[i + 1] == 0:
            return x
    return x


def fitted_t(denoise, x, sig, *, order=3, lower_order_final=True, coefficients=None, moments=None):
    """`fitted` on a tensor grid `sig` with coefficients a list of tensors: differentiable in both.
    moments(h, p): the exponential moments on a tensor h (calibrate's _moments_t)."""
    n = len(sig) - 1
    orders = step_orders(n, order, lower_order_final)
    lam = -torch.log(sig[:-1])
    Ds = []
    for i in range(n):
        D = denoise(x, sig[i])
        Ds = ([D] + Ds)[:order]
        k = orders[i]
        if sig[i + 1].item() == 0:
            out = D
        else:
            h = -torch.log(sig[i + 1]) - lam[i]
            w = lagrange_weights([lam[i - j] - lam[i] for j in range(k)], moments(h, k))
            out = x * torch.exp(-h)
            for wj, Dj in zip(w, Ds[:k]):
                out = out + Dj * wj
        if coefficients is not None:
            c = coefficients[i]
            out = out + (x - D) * c[0]
            for j in range(1, k):
                out = out + (Ds[j] - D) * c[j]
        x = out
        if sig[i + 1].item() == 0:
            return x
    return x
