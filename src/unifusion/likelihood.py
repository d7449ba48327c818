"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 / App. D.2).

In u = log sigma the PF-ODE reads dx/du = f(x, u) = x - D(x, e^u), and the log-density along
its solution changes as d log p / du = -div f = tr(dD/dx) - dim. Integrating from sigma_min
(the data) to sigma_max, where p is close to N(0, sigma_max^2 I):

    log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int (dim - tr dD/dx) du

The density is the sigma-domain one at sigma_min; for processes with s(t_min) != 1 the data
space density differs by -dim * log s(t_min). The ODE is solved on x's device with the samplers'
Dormand-Prince integrator (samplers/adaptive.py), the state (x, log-density change) kept as one tensor.
"""
from __future__ import annotations

import math

import torch

from .samplers.adaptive import integrate_rk45


def _trace_exact(D, x):
    """tr(dD/dx) per example: one backward pass per dimension (fine for small dims)."""
    flat = D.flatten(1)
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        tr = tr + g.flatten(1)[:, i]
    return tr


def _trace_hutchinson(D, x, probes):
    """Unbiased estimate E[e^T (dD/dx) e] with fixed probes e (Hutchinson 1989; FFJORD)."""
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for e in probes:
        (g,) = torch.autograd.grad(D, x, e, retain_graph=True)
        tr = tr + (g * e).flatten(1).sum(1)
    return tr / len(probes)


def log_likelihood(denoiser, x: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   cond: dict | None = None, divergence: str = "exact", probes: int = 1,
                   rtol: float = 1e-5, atol: float = 1e-5, generator: torch.Generator | None = None):
    """log p_{sigma_min}(x) in nats per example, and the number of denoiser calls.

    divergence: 'exact' (dim backward passes per call) or 'hutchinson' (`probes` Rademacher
    probes, fixed for the whole solve, giving an unbiased estimate).
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; choose 'exact' or 'hutchinson'")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    cond = cond or {}
    B, shape, dim = x.shape[0], x.shape, x[0].numel()
    e = [torch.randint(0, 2, shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1
         for _ in range(probes)]

    def f(y, u):
        # the state y = [x flattened | delta] per example, delta = int (dim - tr dD/dx) du so far
        xt = y[:, :dim].reshape(shape).detach().requires_grad_(True)
        sigma = torch.full((B,), math.exp(u), dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            D = denoiser(xt, sigma, **cond)
            tr = _trace_exact(D, xt) if divergence == "exact" else _trace_hutchinson(D, xt, e)
        # dx/du = x - D and d delta/du = dim - tr dD/dx
        return torch.cat([(xt - D).detach().flatten(1), (dim - tr).detach()[:, None]], 1)

    y0 = torch.cat([x.detach().flatten(1), x.new_zeros(B, 1)], 1)
    y, _, nfe = integrate_rk45(f, y0, math.log(sigma_min), math.log(sigma_max), rtol=rtol, atol=atol)
    xT, delta = y[:, :dim], y[:, dim]
    prior = -0.5 * xT.pow(2).sum(1) / sigma_max**2 - dim * (math.log(sigma_max) + 0.5 * math.log(2 * math.pi))
    return prior + delta, nfe


def bits_per_dim(log_p: torch.Tensor, dim: int, levels: int = 256, data_range: float = 2.0) -> torch.Tensor:
    """Discrete bits/dim from a continuous log-density of uniformly dequantized data.

    Convention: integer data k in {0..levels-1} maps to x = k * (data_range/levels) - data_range/2
    (the left edge of its bin, width delta = data_range/levels), and the model is evaluated at
    x + u * delta with u ~ U[0, 1)^dim (see `dequantize`). Then
    -log P(k) <= -log p(x + u delta) - dim log delta, in nats, divided by dim log 2.
    """
    delta = data_range / levels
    return (-log_p - dim * math.log(delta)) / (dim * math.log(2))


def dequantize(x: torch.Tensor, levels: int = 256, data_range: float = 2.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization x + u * delta, u ~ U[0, 1), for x on the bin left edges (see bits_per_dim)."""
    return x + torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * (data_range / levels)
