"""Noise-level grids: decreasing float64 tensors of sigmas, the only schedule a sampler sees.

Each function returns n levels from sigma_max down to sigma_min (n >= 1); `make` appends the
final 0 (the denoised output). A process enters only through the grids it induces (uniform_t,
ddpm, sd3, and "native": its paper's own choice), never inside a solver.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..processes import DDPM, Process


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def loglinear(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log sigma (uniform in DPM-Solver's lambda)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def linear(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in sigma."""
    return torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)


def uniform_t(n: int, sigma_min: float, sigma_max: float, process: Process) -> Tensor:
    """Uniform in the process's own time t, mapped to sigma (score SDE, DDIM 'uniform' spacing)."""
    t_hi, t_lo = process.t(torch.tensor([sigma_max, sigma_min], dtype=torch.float64)).tolist()
    return process.sigma(torch.linspace(t_hi, t_lo, n, dtype=torch.float64))


def ddpm(n: int, sigma_min: float, sigma_max: float, process: Process, spacing: str = "trailing") -> Tensor:
    """Integer timesteps of a discrete process (Lin et al. 2024, Table 2 spacings), as sigmas.

    sigma_min/sigma_max clip the timestep range to the process's levels that lie inside them.
    """
    if not isinstance(process, DDPM):
        raise ValueError(f"grid 'ddpm' needs a discrete DDPM process, got {process!r}")
    inside = ((process.sigmas >= sigma_min * (1 - 1e-9)) & (process.sigmas <= sigma_max * (1 + 1e-9))).nonzero()
    if len(inside) == 0:
        raise ValueError(f"no DDPM timestep has sigma in [{sigma_min}, {sigma_max}]; its range is "
                         f"[{process.sigmas[0]:.4g}, {process.sigmas[-1]:.4g}]")
    lo, hi = int(inside[0]), int(inside[-1])
    if abs(float(process.sigmas[hi]) / sigma_max - 1) > 1e-6:
        # the noise was scaled by sigma_max, so the first timestep must sit exactly there
        raise ValueError(f"sigma_max={sigma_max} is not a noise level of {process!r}; the nearest below is "
                         f"{float(process.sigmas[hi])!r} (timestep {hi}); the top is {float(process.sigmas[-1])!r}")
    if spacing == "trailing":  # always includes the noisiest step hi
        steps = torch.round(hi - torch.arange(n, dtype=torch.float64) * (hi - lo + 1) / n).long()
    elif spacing == "leading":  # always includes the cleanest step lo (DDIM's original choice)
        steps = torch.flip(lo + torch.arange(n) * ((hi - lo + 1) // n), [0])
    elif spacing == "linspace":
        steps = torch.linspace(hi, lo, n, dtype=torch.float64).round().long()
    else:
        raise ValueError(f"unknown DDPM spacing {spacing!r}; choose trailing, leading or linspace")
    steps = torch.unique_consecutive(steps.clamp(lo, hi))
    if len(steps) < n:
        raise ValueError(f"only {hi - lo + 1} DDPM timesteps lie in [{sigma_min}, {sigma_max}]; asked for {n}")
    return process.sigmas[steps]


def sd3(n: int, sigma_min: float, sigma_max: float, shift: float = 3.0) -> Tensor:
    """SD3 (Esser et al. 2024, eq. 23): flow time t uniform, then t' = shift t / (1 + (shift-1) t)."""
    def flow_t(sig):
        return sig / (1 + sig)

    def unshift(t):
        return t / (shift - (shift - 1) * t)

    u = torch.linspace(unshift(flow_t(sigma_max)), unshift(flow_t(sigma_min)), n, dtype=torch.float64)
    t = shift * u / (1 + (shift - 1) * u)
    return t / (1 - t)


def tuned(n: int, sigma_min: float, sigma_max: float, rho: float = 15.0, scale: float = 1.0) -> Tensor:
    """Karras grid with rho=15 whose last level is max(sigma_min, scale / n).

    With a small budget a call at sigma ~ 0.002 is nearly wasted (D(x, sigma) ~ x there), so the
    last level rises as the budget shrinks. Chosen on held-out Gaussian mixtures with data scale
    ~1 (benchmarks/tune_grid.py); `scale` is the data's scale. Measured on exact mixtures only: on
    images a late stop may soften fine detail, so check it on your model before relying on it.
    """
    return karras(n, max(sigma_min, scale / n), sigma_max, rho)


GRIDS = {"karras": karras, "loglinear": loglinear, "linear": linear, "uniform_t": uniform_t,
         "ddpm": ddpm, "sd3": sd3, "tuned": tuned}
NEEDS_PROCESS = {"uniform_t", "ddpm"}


def make(grid, n: int, sigma_min: float, sigma_max: float, process: Process | None = None, **opts) -> Tensor:
    """n decreasing noise levels from grid name (or a callable / tensor), followed by a final 0."""
    if isinstance(grid, Tensor):
        sig = grid.to(torch.float64)
        return sig if float(sig[-1]) == 0 else torch.cat([sig, sig.new_zeros(1)])
    if grid == "native":  # the process's own discretization
        if process is None:
            raise ValueError("grid 'native' needs process=... (e.g. unifusion.processes.VP())")
        grid = process.native_grid
    if callable(grid):
        sig = grid(n, sigma_min, sigma_max, **opts)
    else:
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS) + ['native']}")
        if grid in NEEDS_PROCESS:
            if process is None:
                raise ValueError(f"grid {grid!r} needs process=... (e.g. unifusion.processes.VP())")
            opts = {**opts, "process": process}
        sig = GRIDS[grid](n, sigma_min, sigma_max, **opts)
    return torch.cat([sig.to(torch.float64), sig.new_zeros(1, dtype=torch.float64)])
