"""Noise-level grids: decreasing float64 tensors of sigmas, the only schedule a sampler sees.

Each function returns n levels from sigma_max down to sigma_min (n >= 1); `make` appends the
final 0 (the denoised output). A process enters only through the grids it induces (uniform_t,
ddpm, sd3, and "native": its paper's own choice), never inside a solver.

sigma_max = inf (pure noise, flow time t = 1) is a grid's first level only where the grid is
defined through flow time: uniform_t of a process that reaches sigma = inf (Flow), and sd3; and
in a distilled flow student's own `levels`.

Two grids belong to few-step models (models/fewstep.py) and take their discretisation from the
model's spec: `consistency` (n levels of a consistency model's karras(N) discretisation) and
`levels` (n of a distilled student's fixed levels). Asking either for more levels than the model
was trained on is a ValueError.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..processes import DDPM, Flow, Process, shift_time, unshift_time


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
    if not math.isfinite(t_hi):  # e.g. VE, VP: sigma = inf is no time of theirs
        raise ValueError(f"grid 'uniform_t': {process!r} has no time t with sigma = {sigma_max}; its range is "
                         f"sigma {process.sigma_range()}. Pass a finite sigma_max, or use Flow (sigma = inf at t = 1)")
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
    flow = Flow()
    # the unshifted flow times of the two ends (sigma_max = inf is t = 1, a fixed point of the shift)
    u_hi, u_lo = unshift_time(flow.t(torch.tensor([sigma_max, sigma_min], dtype=torch.float64)), shift).tolist()
    sig = flow.sigma(shift_time(torch.linspace(u_hi, u_lo, n, dtype=torch.float64), shift))
    if math.isinf(sigma_max):  # t = 1 is a fixed point of the shift: keep it exact, whatever the rounding
        sig[0] = math.inf
    return sig


def tuned(n: int, sigma_min: float, sigma_max: float, rho: float = 15.0, scale: float = 1.0) -> Tensor:
    """Karras grid with rho=15 whose last level is max(sigma_min, scale / n).

    With a small budget a call at sigma ~ 0.002 is nearly wasted (D(x, sigma) ~ x there), so the
    last level rises as the budget shrinks. Chosen on held-out Gaussian mixtures with data scale
    ~1 (benchmarks/tune_grid.py); `scale` is the data's scale. Measured on exact mixtures only: on
    images a late stop may soften fine detail, so check it on your model before relying on it.
    """
    return karras(n, max(sigma_min, scale / n), sigma_max, rho)


def pick(count: int, n: int) -> Tensor:
    """n of the points 0..count-1 of a discretisation whose point `count` is its end: indices
    round(linspace(0, count, n + 1))[:-1], spread evenly, the first always 0 (distinct for n <= count)."""
    return torch.linspace(0, count, n + 1, dtype=torch.float64).round().long()[:-1]


def consistency(n: int, sigma_min: float, sigma_max: float, steps: int | None = None, rho: float = 7.0) -> Tensor:
    """n levels of a consistency model's discretisation karras(steps, sigma_min, sigma_max, rho)
    (Song et al. 2023): the points pick(steps - 1, n), never its last point sigma_min (where the
    consistency function is the identity). A model's spec sets `steps` (its training N)."""
    if steps is None or steps < 2:
        raise ValueError(f"grid 'consistency' needs steps=N >= 2 (a consistency model's spec sets it), got {steps!r}")
    if n > steps - 1:
        raise ValueError(f"this consistency model's discretisation has {steps - 1} steps; ask for at most "
                         f"{steps - 1} (nfe <= {steps - 1})")
    return karras(steps, sigma_min, sigma_max, rho)[pick(steps - 1, n)]


def levels(n: int, sigma_min: float, sigma_max: float, sigmas: list | None = None) -> Tensor:
    """n of a distilled student's fixed noise levels `sigmas` (its spec sets them; "inf" is sigma = inf):
    all of them for n = len(sigmas), else pick(len(sigmas), n). The student was trained there only."""
    if not sigmas:
        raise ValueError("grid 'levels' needs sigmas=[...] (a distilled student's spec sets them)")
    sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float64)
    if n > len(sig):
        raise ValueError(f"this student was distilled for {len(sig)} steps on fixed noise levels; ask for at most "
                         f"{len(sig)} (nfe <= {len(sig)}), or pass another grid")
    if float(sig[0]) != sigma_max:
        raise ValueError(f"this student's levels start at sigma = {float(sig[0])}, not sigma_max = {sigma_max}; "
                         "sample it from its own sigma_max (or pass another grid)")
    return sig[pick(len(sig), n)]


GRIDS = {"karras": karras, "loglinear": loglinear, "linear": linear, "uniform_t": uniform_t,
         "ddpm": ddpm, "sd3": sd3, "tuned": tuned, "consistency": consistency, "levels": levels}
NEEDS_PROCESS = {"uniform_t", "ddpm"}
FROM_INF = {"uniform_t", "sd3", "levels"}  # the grids that can start at sigma_max = inf


def make(grid, n: int, sigma_min: float, sigma_max: float, process: Process | None = None, **opts) -> Tensor:
    """n decreasing noise levels from grid name (or a callable / tensor), followed by a final 0.

    A tensor is taken as given (n, sigma_min are ignored; a final 0 is appended if missing) after
    `check`; with sigma_max = inf it must start with inf."""
    if isinstance(grid, Tensor):
        sig = grid.detach().to("cpu", torch.float64)
        if len(sig) == 0 or float(sig[-1]) != 0:
            sig = torch.cat([sig, sig.new_zeros(1)])
        return check(sig, sigma_max)
    name = getattr(grid, "__name__", repr(grid)) if callable(grid) else repr(grid)
    if grid == "native":  # the process's own discretization
        if process is None:
            raise ValueError("grid 'native' needs process=... (e.g. unifusion.processes.VP())")
        grid = process.native_grid
        name = f"'native' ({grid!r} for {process!r})"
    if math.isinf(sigma_max) and not (isinstance(grid, str) and grid in FROM_INF):
        raise ValueError(f"grid {name} cannot start at sigma_max=inf; use 'uniform_t', 'sd3' or 'native' (with a "
                         f"process that reaches sigma = inf, e.g. Flow), or a finite sigma_max")
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
    return check(torch.cat([sig.to(torch.float64), sig.new_zeros(1, dtype=torch.float64)]), sigma_max)


def check(sig: Tensor, sigma_max: float) -> Tensor:
    """Return sig if it is a grid: strictly decreasing positive levels and a final 0, finite except a
    first level inf that goes with sigma_max = inf (and must be there then); else ValueError."""
    levels = sig[:-1]
    if len(levels) == 0:
        raise ValueError("the grid has no noise level; give at least one sigma > 0")
    if torch.isnan(sig).any():
        raise ValueError(f"the grid holds NaN at index {int(torch.isnan(sig).nonzero()[0])}: {sig.tolist()}")
    starts_inf = math.isinf(float(levels[0]))
    if starts_inf != math.isinf(sigma_max):
        raise ValueError("the grid starts at inf: pass sigma_max=float('inf') (and unit noise)" if starts_inf else
                         f"sigma_max=inf, but the grid starts at {float(levels[0])}; start it with inf or pass "
                         f"sigma_max={float(levels[0])}")
    if torch.isinf(sig[1:]).any():
        raise ValueError(f"the grid holds inf after its first level: {sig.tolist()}; only a first level inf "
                         f"(with sigma_max=inf) is allowed")
    if not (levels > 0).all():
        raise ValueError(f"grid levels must be > 0 (only a final 0 is allowed): {sig.tolist()}")
    if not (sig[1:] < sig[:-1]).all():
        i = int((sig[1:] >= sig[:-1]).nonzero()[0]) + 1
        raise ValueError(f"the grid must be strictly decreasing, but level {i} ({float(sig[i])}) >= level {i - 1} "
                         f"({float(sig[i - 1])}); sort it from sigma_max down and drop repeats")
    return sig
