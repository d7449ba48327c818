"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 / App. D.2).

In u = log sigma the PF-ODE reads dx/du = f(x, u) = x - D(x, e^u), and the log-density along
its solution changes as d log p / du = -div f = tr(dD/dx) - dim. Integrating from sigma_min
(the data) to sigma_max, where p is close to N(0, sigma_max^2 I):

    log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int (dim - tr dD/dx) du

The density is the sigma-domain one at sigma_min; for processes with s(t_min) != 1 the data
space density differs by -dim * log s(t_min). The ODE is solved on x's device with the samplers'
Dormand-Prince integrator (samplers/adaptive.py), the state (x, log-density change) kept as one tensor.
The same function, differentiable (create_graph=True), trains the cnf family by maximum likelihood.
"""
from __future__ import annotations

import math

import torch

from .samplers.adaptive import integrate_rk45


def _trace_exact(D, x, create_graph=False):
    """tr(dD/dx) per example: one backward pass per dimension (fine for small dims)."""
    flat = D.flatten(1)
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        tr = tr + g.flatten(1)[:, i]
    return tr


def _trace_hutchinson(D, x, probes, create_graph=False):
    """Unbiased estimate E[e^T (dD/dx) e] with fixed probes e (Hutchinson 1989; FFJORD)."""
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for e in probes:
        (g,) = torch.autograd.grad(D, x, e, retain_graph=True, create_graph=create_graph)
        tr = tr + (g * e).flatten(1).sum(1)
    return tr / len(probes)


def _rk4(f, y, u0: float, u1: float, steps: int):
    h = (u1 - u0) / steps
    for i in range(steps):
        u = u0 + i * h
        k1 = f(y, u)
        k2 = f(y + k1 * (h / 2), u + h / 2)
        k3 = f(y + k2 * (h / 2), u + h / 2)
        k4 = f(y + k3 * h, u + h)
        y = y + (k1 + 2 * k2 + 2 * k3 + k4) * (h / 6)
    return y, 4 * steps


def log_likelihood(denoiser, x: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   cond: dict | None = None, divergence: str = "exact", probes: int | torch.Tensor = 1,
                   rtol: float = 1e-5, atol: float = 1e-5, generator: torch.Generator | None = None,
                   create_graph: bool = False, steps: int = 0):
    """log p_{sigma_min}(x) in nats per example, and the number of denoiser calls.

    divergence: 'exact' (dim backward passes per call) or 'hutchinson' (`probes` Rademacher
    probes, fixed for the whole solve, giving an unbiased estimate; or a tensor (P, *x.shape)
    of given probes). steps = 0 solves with adaptive RK45 at (rtol, atol); steps > 0 with that
    many fixed RK4 steps in log sigma. create_graph=True keeps the whole solve differentiable
    with respect to the denoiser's parameters: maximum-likelihood training of a continuous
    normalizing flow (the cnf family; FFJORD, Grathwohl et al. 2019, by backpropagating through
    the solver's steps rather than an adjoint ODE).
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; choose 'exact' or 'hutchinson'")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    cond = cond or {}
    B, shape, dim = x.shape[0], x.shape, x[0].numel()
    if isinstance(probes, torch.Tensor):
        if probes.shape[1:] != shape:
            raise ValueError(f"probes of shape {tuple(probes.shape)} do not fit x of shape {tuple(shape)}")
        e = list(probes.to(x))
    else:
        e = [torch.randint(0, 2, shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1
             for _ in range(probes)]

    def f(y, u):
        # the state y = [x flattened | delta] per example, delta = int (dim - tr dD/dx) du so far
        xt = y[:, :dim].reshape(shape)
        if not create_graph or not xt.requires_grad:
            xt = xt.detach().requires_grad_(True)
        sigma = torch.full((B,), math.exp(u), dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            D = denoiser(xt, sigma, **cond)
            tr = (_trace_exact(D, xt, create_graph) if divergence == "exact"
                  else _trace_hutchinson(D, xt, e, create_graph))
        # dx/du = x - D and d delta/du = dim - tr dD/dx
        out = torch.cat([(xt - D).flatten(1), (dim - tr)[:, None]], 1)
        return out if create_graph else out.detach()

    y0 = torch.cat([x.detach().flatten(1), x.new_zeros(B, 1)], 1)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    if steps:
        y, nfe = _rk4(f, y0, lo, hi, steps)
    else:
        y, _, nfe = integrate_rk45(f, y0, lo, hi, rtol=rtol, atol=atol)
    xT, delta = y[:, :dim], y[:, dim]
    prior = -0.5 * xT.pow(2).sum(1) / sigma_max**2 - dim * (math.log(sigma_max) + 0.5 * math.log(2 * math.pi))
    return prior + delta, nfe


# ------------------------------------------------------------------------------ discrete data
# One convention for every family (diffusion and flow matching through the PF-ODE, coupling flows
# exactly, the CNF through its ODE) and for `unifusion eval --nll`: data with L levels sits at the
# bin centres x_k = -data_range/2 + k delta, k = 0..L-1, delta = data_range / (L - 1) (digits: 17
# levels, images: 256, both mapped onto [-1, 1]); uniform dequantization evaluates the density at
# x + (u - 1/2) delta, u ~ U[0, 1)^dim, inside the bin centred on x, and
#     -log P(x) <= E_u[-log p(x + (u - 1/2) delta)] - dim log delta          (nats)
# so bits/dim = (-log p - dim log delta) / (dim log 2).

def bin_width(levels: int, data_range: float = 2.0) -> float:
    """delta = data_range / (levels - 1): the spacing of L levels spread over data_range."""
    if not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    return data_range / (levels - 1)


def bits_per_dim(log_p: torch.Tensor, dim: int, levels: int = 256, data_range: float = 2.0) -> torch.Tensor:
    """Discrete bits/dim from the continuous log-density (nats) of uniformly dequantized data:
    (-log p - dim log delta) / (dim log 2), delta = bin_width(levels, data_range)."""
    return (-log_p - dim * math.log(bin_width(levels, data_range))) / (dim * math.log(2))


def dequantize(x: torch.Tensor, levels: int = 256, data_range: float = 2.0,
               generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """x + (u - 1/2) delta with u ~ U[0, 1)^dim (or the given u): a uniform point in the bin
    centred on each level (see the convention above)."""
    if u is None:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + (u.to(x.dtype) - 0.5) * bin_width(levels, data_range)


def check_levels(x: torch.Tensor, levels: int, data_range: float = 2.0, where: str = "the data") -> None:
    """Raise one ValueError when x is not on the L levels of data_range (what dequantization assumes)."""
    delta = bin_width(levels, data_range)
    k = (x.double() + data_range / 2) / delta
    lo, hi = float(x.min()), float(x.max())
    if lo < -data_range / 2 - 1e-4 or hi > data_range / 2 + 1e-4:
        raise ValueError(f"{where} lies in [{lo:.4g}, {hi:.4g}], outside the dequantization range "
                         f"[{-data_range / 2:g}, {data_range / 2:g}]; map images to [-1, 1] (the data sources do)")
    off = float((k - k.round()).abs().max())
    if off > 1e-3:
        raise ValueError(f"{where} is not on {levels} levels (a value is {off:.3g} bins off the nearest level); "
                         f"give discrete data ({levels} levels over [{-data_range / 2:g}, {data_range / 2:g}]) "
                         "or train on continuous data without dequantization")
