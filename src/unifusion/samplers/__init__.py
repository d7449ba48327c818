"""Samplers: one small function per solver family, a registry of names, and `sample`."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import adaptive, ancestral, dpmpp, grids, multistep, ode, sde, unipc  # noqa: F401  (registers)
from .registry import Spec, get, names, register

__all__ = ["sample", "names", "get", "register", "Spec", "grids", "make_denoise"]


def make_denoise(denoiser, batch: int, cond: dict | None = None, progress=None):
    """Adapt `denoiser(x, sigma: Tensor(B,), **cond)` to the solvers' `denoise(x, sigma: float)`."""
    cond = cond or {}

    def denoise(x, s):
        out = denoiser(x, torch.full((batch,), s, dtype=x.dtype, device=x.device), **cond)
        if progress is not None:
            progress.update(1)
        return out
    return denoise


def sample(denoiser, noise: torch.Tensor, sampler: str = "dpmpp_2m", nfe: int | None = None,
           steps: int | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0, grid="karras",
           generator: torch.Generator | None = None, cond: dict | None = None, *, process=None,
           grid_options: dict | None = None, progress: bool = False, **options) -> torch.Tensor:
    """Draw samples by solving from `noise` (already scaled: randn * sigma_max) down to sigma = 0.

    denoiser: callable (x, sigma, **cond) -> E[x_0 | x] in the sigma-domain; sigma has shape (B,).
    nfe: at most this many denoiser calls (default 10); the sampler picks its step count.
    steps: or the number of grid intervals instead (not both).
    grid: a name in grids.GRIDS, a callable (n, sigma_min, sigma_max) -> sigmas, or a tensor of sigmas.
    process: needed by the 'uniform_t' and 'ddpm' grids.
    options: the sampler's own keywords (e.g. eta=0.5 for ddim, rtol for dopri5).
    """
    spec = get(sampler)
    if nfe is not None and steps is not None:
        raise ValueError("give nfe=N or steps=N, not both")
    for key, val in (("nfe", nfe), ("steps", steps)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {val!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise ValueError(f"sampler {sampler!r} has no option(s) {sorted(unknown)}; "
                         f"its options are {sorted(spec.defaults)}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise ValueError("noise must be a tensor of shape (B, ...), e.g. torch.randn(B, ...) * sigma_max")
    opts = {**spec.defaults, **options}
    # nfe defaults to 10 only when neither steps nor an explicit grid fixes the length
    budget = 10 if nfe is None and steps is None and not isinstance(grid, torch.Tensor) else nfe
    if spec.adaptive:  # it picks its own steps between the two ends, within the budget
        options.setdefault("max_nfe", budget)
        sigmas = torch.tensor([sigma_max, sigma_min, 0.0], dtype=torch.float64)
    else:
        if isinstance(grid, torch.Tensor):
            steps = len(grid) - (float(grid[-1]) == 0)
        elif steps is None:
            need = spec.cost(1, opts)
            if budget < need:
                raise ValueError(f"sampler {sampler!r} needs nfe >= {need} (one step of it makes {need} denoiser "
                                 f"calls with options {opts}); raise nfe or pick another sampler")
            steps = spec.steps_for(budget, options)
        if budget is not None and spec.cost(steps, opts) > budget:
            raise ValueError(f"a grid of {steps} steps costs {spec.cost(steps, opts)} calls of {sampler!r}, "
                             f"over nfe={budget}; pass a shorter grid or a larger nfe")
        sigmas = grids.make(grid, steps, sigma_min, sigma_max, process=process, **(grid_options or {}))
    bar = tqdm(total=None if spec.adaptive else spec.cost(len(sigmas) - 1, opts),
               desc=sampler, unit="nfe", disable=not progress, leave=False)
    with torch.no_grad(), bar:
        denoise = make_denoise(denoiser, noise.shape[0], cond, bar)
        return spec.fn(denoise, noise, sigmas.tolist(), generator=generator, **options)
