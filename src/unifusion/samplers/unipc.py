"""UniPC (Zhao et al. 2023, arXiv:2302.04867): multistep predictor UniP-p and corrector UniC-p,
data-prediction form in the sigma-domain, lambda = -log sigma.

The corrector reuses the denoiser output at the predicted point, which the next step needs
anyway, so it raises the order from p to p+1 at no extra denoiser call.
"""
from __future__ import annotations

import math

from .registry import register


def _solve(A: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the tiny systems below (n <= 4)."""
    n = len(b)
    M = [row[:] + [bi] for row, bi in zip(A, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(M[r][c]))
        M[c], M[p] = M[p], M[c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            for k in range(c, n + 1):
                M[r][k] -= f * M[c][k]
    out = [0.0] * n
    for r in reversed(range(n)):
        out[r] = (M[r][n] - sum(M[r][k] * out[k] for k in range(r + 1, n))) / M[r][r]
    return out


def unipc_coefficients(h: float, rks: list[float], variant: str) -> list[float]:
    """Solve sum_m a_m r_m^(k-1) = k! g_k(h) / B(h), k = 1..len(rks)  (UniPC eq. for the data
    prediction model; g_1 = phi_1(-h)/(-h) - 1, g_{k+1} = g_k/(-h) - 1/(k+1)!).

    Solved exactly, B(h) would cancel; for a single node UniPC takes the system's leading-order
    solution a_1 = 1/2, which is where the choice of B(h) (bh1: h, bh2: e^h - 1) matters."""
    if len(rks) == 1:
        return [0.5]
    return _solve(*unipc_system(h, rks, variant, math.expm1))


def unipc_system(h, rks: list, variant: str, expm1) -> tuple[list[list], list]:
    """The rows r_m^(k-1) and right-hand sides k! g_k(h) / B(h) of unipc_coefficients' system; h may
    be a float (expm1=math.expm1) or a tensor (torch.expm1, for differentiable calibration)."""
    hh = -h
    phi1 = expm1(hh)
    B = hh if variant == "bh1" else phi1
    g, fact, b = phi1 / hh - 1, 1, []
    for k in range(1, len(rks) + 1):
        b.append(g * fact / B)
        fact *= k + 1
        g = g / hh - 1 / fact
    return [[r ** (k - 1) for r in rks] for k in range(1, len(rks) + 1)], b


@register("unipc", order=3)
def unipc(denoise, x, sigmas, *, generator=None, order=2, variant="bh2", corrector=True, lower_order_final=True,
          final_corrector=False):
    """UniPC with predictor order `order` (UniC lifts it to order+1); variant 'bh1' or 'bh2'.

    lower_order_final: on grids under 15 steps the last steps drop to the order the remaining
    steps allow, which steadies few-step sampling; on longer grids it would cost the global
    order (the final first-order step's error is O(h^2)), so it stays off there.
    final_corrector: apply the last step's UniC correction to the output as D + (x_c - x),
    using dD/dx ~ I at small sigma: free and a little more accurate when the last level is small
    (0.3-3% at 0.002), but it can hurt when the last level is large, so it is off by default."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; choose 'bh1' or 'bh2'")
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    n = len(sigmas) - 1
    hist = []  # (lambda, D) newest first
    last = None  # what the corrector needs about the previous step
    for i in range(n):
        D = denoise(x, sigmas[i])
        if corrector and last is not None:
            # UniC: redo the previous step with D at the new point as one more interpolation node
            x_prev, h, rks, Ds = last
            a = unipc_coefficients(h, rks + [1.0], variant)
            x_c = _unipc_base(x_prev, Ds[0], h, variant, a[:-1], rks, Ds) - (D - Ds[0]) * (_B(h, variant) * a[-1])
            if sigmas[i + 1] == 0 and final_corrector:
                return D + (x_c - x)
            x = x_c
        hist = [(lam[i], D)] + hist[: max(order, 1) - 1]
        if sigmas[i + 1] == 0:
            return D
        p = min(order, len(hist), n - 1 - i) if lower_order_final and n < 15 else min(order, len(hist))
        p = max(p, 1)
        h = lam[i + 1] - lam[i]
        rks = [(hist[k][0] - lam[i]) / h for k in range(1, p)]
        Ds = [hd[1] for hd in hist[:p]]
        a = unipc_coefficients(h, rks, variant) if p > 1 else []
        x_pred = _unipc_base(x, D, h, variant, a, rks, Ds)
        last = (x, h, rks, Ds)
        x = x_pred
    return x


def _B(h: float, variant: str) -> float:
    return -h if variant == "bh1" else math.expm1(-h)


def _unipc_base(x, D0, h, variant, a, rks, Ds):
    """e^{-h} x + (1 - e^{-h}) D0 - B(h) sum_k a_k (D_k - D0) / r_k."""
    out = x * math.exp(-h) + D0 * (-math.expm1(-h))
    B = _B(h, variant)
    for ak, rk, Dk in zip(a, rks, Ds[1:]):
        out = out - (Dk - D0) * (B * ak / rk)
    return out
