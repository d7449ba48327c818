"""Exponential-integrator arithmetic in lambda = -log(sigma), on plain floats.

In lambda the PF-ODE reads dx/dlambda = D - x, so over a step of size h
    x(lambda + h) = e^{-h} x(lambda) + int_0^h e^{-(h - tau)} D(lambda + tau) dtau     (*)
(DPM-Solver++, Lu et al. 2022, eq. 9 in the sigma-domain). Multistep solvers replace D by the
polynomial through past denoiser outputs; the weights below integrate that polynomial in (*)
exactly, so no tensor arithmetic is spent on coefficients.
"""
from __future__ import annotations

import math


def moments(h: float, p: int) -> list[float]:
    """m_k = int_0^h e^{-(h - tau)} tau^k dtau for k < p."""
    if h < 1.0:
        # m_k = e^{-h} sum_j h^(j+k+1) / (j! (j+k+1)): positive terms, no cancellation for small h
        out = []
        for k in range(p):
            term, total, j = h ** (k + 1), 0.0, 0
            while True:
                add = term / (j + k + 1)
                total += add
                if add < 1e-17 * total:
                    break
                j += 1
                term *= h / j
            out.append(math.exp(-h) * total)
        return out
    out = [-math.expm1(-h)]
    for k in range(1, p):  # integration by parts: m_k = h^k - k m_{k-1}
        out.append(h**k - k * out[-1])
    return out


def _poly_mul_linear(c: list[float], a: float) -> list[float]:
    """Coefficients (lowest first) of c(tau) * (tau - a)."""
    out = [0.0] * (len(c) + 1)
    for i, ci in enumerate(c):
        out[i + 1] += ci
        out[i] -= a * ci
    return out


def lagrange_weights(nodes: list[float], m: list[float]) -> list[float]:
    """w_j = int l_j(tau) dmu for Lagrange basis l_j through `nodes`, given moments m_k of dmu."""
    weights = []
    for j, tj in enumerate(nodes):
        c, denom = [1.0], 1.0
        for k, tk in enumerate(nodes):
            if k != j:
                c = _poly_mul_linear(c, tk)
                denom *= tj - tk
        weights.append(sum(ci * mi for ci, mi in zip(c, m)) / denom)
    return weights


def exp_weights(h: float, nodes: list[float]) -> list[float]:
    """Weights of D at lambda-offsets `nodes` (relative to the step start) in (*)."""
    return lagrange_weights(nodes, moments(h, len(nodes)))


def poly_integral_weights(a: float, b: float, nodes: list[float]) -> list[float]:
    """Weights w_j with int_a^b p(s) ds = sum_j w_j p(nodes_j) for polynomials of degree < len(nodes)."""
    m = [(b ** (k + 1) - a ** (k + 1)) / (k + 1) for k in range(len(nodes))]
    return lagrange_weights(nodes, m)
