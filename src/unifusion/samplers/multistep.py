"""Linear multistep methods on dx/dsigma = d(x, sigma) = (x - D) / sigma, in sigma itself."""
from __future__ import annotations

from .expint import poly_integral_weights
from .registry import register


@register("lms", order=4)
def lms(denoise, x, sigmas, *, generator=None, order=4):
    """Variable-step Adams-Bashforth: the Lagrange polynomial through the last `order` slopes,
    integrated exactly over [sigma, sigma'] (k-diffusion's LMS; DEIS's rho-AB)."""
    hist = []  # (sigma, d) newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        hist = [(s, (x - denoise(x, s)) / s)] + hist[: order - 1]
        # nodes relative to s keep the polynomial well conditioned at large sigma
        w = poly_integral_weights(0.0, s_next - s, [sj - s for sj, _ in hist])
        for wj, (_, dj) in zip(w, hist):
            x = x + dj * wj
    return x


# Adams-Bashforth coefficients for equal steps, newest slope first
_AB = [[1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


@register("ipndm", order=2)
def ipndm(denoise, x, sigmas, *, generator=None, order=4):
    """Improved PNDM (Zhang & Chen 2023, DEIS Sec. 4): fixed-coefficient Adams-Bashforth on the
    slope with a lower-order warm start. The coefficients assume equal steps, so on the usual
    non-uniform grids it converges with order 2 (on equal steps it is lms exactly)."""
    hist = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        hist = [(x - denoise(x, s)) / s] + hist[: order - 1]
        coef = _AB[len(hist) - 1]
        for c, d in zip(coef, hist):
            x = x + d * (c * (s_next - s))
    return x
