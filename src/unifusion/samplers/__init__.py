"""Samplers: one small function per solver family, a registry of names, and `sample`."""
from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from . import adaptive, ancestral, consistency, dpmpp, fitted, grids, logprob, multistep, ode, sde, unipc  # noqa: F401  (registers)
from .registry import NonFiniteError, Spec, get, names, register

__all__ = ["sample", "names", "get", "register", "Spec", "grids", "make_denoise", "Denoise", "NonFiniteError",
           "calibrate", "Calibration"]

# From sigma_max = inf an adaptive solver (which uses no grid) first steps to this level. For data
# N(m, C) the exact solution from inf is x(s) = m + sqrt(C + s^2) n, the first step gives m + s n, and
# the descent to 0 shrinks that difference by sqrt(C / (C + s^2)): a final error ~ C^{3/2} / (2 s^2),
# about 1e-4 for unit-scale data at s = 80, under dopri5's default tolerance.
ADAPTIVE_FIRST_LEVEL = 80.0


class Denoise:
    """The solvers' denoise(x, sigma: float) over denoiser(x, sigma: Tensor(B,), **cond) -> E[x_0 | x].

    Every call: checks the output's shape (first call only), keeps the output's (min, max) on the
    device (one reduction; NaN propagates into both and an inf shows in one, so both are finite
    exactly when every element is; no host read, so no sync on a GPU), then advances `progress` and
    calls callback(x, sigma, denoised). The flags are read once, by `first_nonfinite`, when the
    sample turns out non-finite; with check_finite=True each call reads its own flag and raises at
    the first bad one."""

    CHUNK = 32

    def __init__(self, denoiser, batch: int, cond: dict | None = None, progress=None, callback=None,
                 check_finite: bool = False):
        self.denoiser, self.batch, self.cond = denoiser, batch, cond or {}
        self.progress, self.callback, self.check_finite = progress, callback, check_finite
        self.calls, self.sigmas = 0, []  # the sigma of each call
        # each call's output (min, max) as 0-dim device tensors, stacked every CHUNK calls: few long-lived
        # small tensors (many of them fragment a CPU heap until each step's buffers page-fault afresh)
        self.pending, self.ranges = [], []

    def __call__(self, x: torch.Tensor, s: float) -> torch.Tensor:
        out = self.denoiser(x, torch.full((self.batch,), s, dtype=x.dtype, device=x.device), **self.cond)
        if self.calls == 0 and getattr(out, "shape", None) != x.shape:
            raise ValueError(f"the denoiser returned {tuple(out.shape) if hasattr(out, 'shape') else type(out)} for "
                             f"x of shape {tuple(x.shape)}; it must return E[x_0 | x], shaped like x")
        self.calls += 1
        if out.numel():  # aminmax refuses an empty tensor, which is finite anyway
            lo_hi = torch.aminmax(out)
            if self.check_finite and not _finite(lo_hi):  # a host read per call, only when asked for
                raise NonFiniteError(f"the denoiser returned NaN or inf at sigma={s:.6g} (call {self.calls})")
            self.sigmas.append(s)
            self.pending += lo_hi
            if len(self.pending) == 2 * self.CHUNK:
                self.ranges.append(torch.stack(self.pending))
                self.pending = []
        if self.progress is not None:
            self.progress.update(1)
        if self.callback is not None:
            self.callback(x, s, out)
        return out

    def first_nonfinite(self) -> float | None:
        """The first sigma at which the denoiser returned NaN or inf, or None (one host read)."""
        if not self.sigmas:
            return None
        parts = self.ranges + ([torch.stack(self.pending)] if self.pending else [])
        ok = torch.isfinite(torch.cat(parts).view(-1, 2)).all(1).tolist()
        return next((s for s, good in zip(self.sigmas, ok) if not good), None)


def _finite(lo_hi) -> bool:
    """Whether a tensor with this (min, max) is finite throughout (one host read)."""
    return bool(torch.isfinite(lo_hi[0]) & torch.isfinite(lo_hi[1]))


def _all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all(), in one reduction (isfinite is a few times slower on a CPU)."""
    return t.numel() == 0 or _finite(torch.aminmax(t))


def make_denoise(denoiser, batch: int, cond: dict | None = None, progress=None, callback=None,
                 check_finite: bool = False) -> Denoise:
    """Adapt `denoiser(x, sigma: Tensor(B,), **cond)` to the solvers' `denoise(x, sigma: float)` (see Denoise)."""
    return Denoise(denoiser, batch, cond, progress, callback, check_finite)


def sample(denoiser, noise: torch.Tensor, sampler: str = "dpmpp_2m", nfe: int | None = None,
           steps: int | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0, grid="karras",
           generator: torch.Generator | None = None, cond: dict | None = None, *, process=None,
           grid_options: dict | None = None, progress: bool = False, callback=None, check_finite: bool = False,
           **options) -> torch.Tensor:
    """Draw samples by solving from `noise` (already scaled: randn * sigma_max) down to sigma = 0.

    denoiser: callable (x, sigma, **cond) -> E[x_0 | x] in the sigma-domain; sigma has shape (B,).
    nfe: at most this many denoiser calls (default 10; adaptive samplers: no cap, they stop at their
        tolerance); the sampler picks its step count. steps: or the number of grid intervals (not both).
    sigma_max: float('inf') starts from pure noise (flow models' t = 1); then `noise` is unit noise n
        (randn, not scaled) and the first step is x_1 = D(n, inf) + sigma_1 n (see `first_step`); the
        grid must be 'uniform_t' or 'native' with a process reaching sigma = inf (Flow), 'sd3', or a
        tensor starting with inf. It costs one call of the budget; steps=N runs N steps after it.
    grid: a name in grids.GRIDS, a callable (n, sigma_min, sigma_max) -> sigmas, a tensor of sigmas, or a
        `Calibration` (or the path of its .json file, see `calibrate`): its sigmas, after checking that it
        was calibrated for this sampler, nfe (None: its own), options and sigma range (ValueError if not);
        for sampler 'fitted' also its fitted coefficients.
    process: needed by the 'uniform_t' and 'ddpm' grids.
    callback: fn(x, sigma: float, denoised) after every denoiser call.
    check_finite: raise NonFiniteError (a FloatingPointError and ValueError) at the first NaN/inf
        denoiser output or sample; by default a non-finite sample only warns, naming where it began.
    options: the sampler's own keywords (e.g. eta=0.5 for ddim, rtol for dopri5).
    """
    spec = get(sampler)
    _check_arguments(spec, noise, nfe, steps, sigma_min, sigma_max, options)
    if is_calibration(grid):
        if steps is not None:
            raise ValueError("a calibrated grid fixes the steps; pass nfe (the one it was calibrated for), not steps")
        if "coefficients" in options:
            raise ValueError("a calibration carries its own coefficients; pass the calibration or coefficients=, "
                             "not both")
        grid, fitted_coefficients = resolve(grid, sampler, nfe, options, sigma_min, sigma_max)
        if fitted_coefficients is not None:
            options = {**options, "coefficients": fitted_coefficients}
    # nfe defaults to 10 only when neither steps nor an explicit grid fixes the length
    fixed = steps is not None or isinstance(grid, torch.Tensor) or spec.adaptive
    budget = nfe if nfe is not None or fixed else 10
    options = dict(options)
    sigmas = _plan(spec, options, budget, steps, grid, sigma_min, sigma_max, process, grid_options)
    inf = math.isinf(sigmas[0])
    total = None if spec.adaptive else inf + _solver_cost(spec, options, len(sigmas) - 1 - inf)
    bar = tqdm(total=total, desc=sampler, unit="nfe", disable=not progress, leave=False)
    with torch.no_grad(), bar:
        denoise = make_denoise(denoiser, noise.shape[0], cond, bar, callback, check_finite)
        x = noise
        if inf:
            x, sigmas = first_step(denoise, noise, sigmas)
        if len(sigmas) > 1:
            x = spec.fn(denoise, x, sigmas, generator=generator, **options)
    _report_nonfinite(x, denoise, check_finite)
    return x


def first_step(denoise, n: torch.Tensor, sigmas: list[float]) -> tuple[torch.Tensor, list[float]]:
    """The step sigma_0 = inf -> sigma_1 from unit noise n; returns x_1 and the rest of the grid.

    Euler (= DDIM) from sigma_0 with x_0 = sigma_0 n gives
        x_1 = D + (sigma_1 / sigma_0)(x_0 - D) = D(sigma_0 n, sigma_0) + sigma_1 n - (sigma_1 / sigma_0) D,
    whose limit as sigma_0 -> inf is D_inf + sigma_1 n, with D_inf the denoiser's limit. By
    convention the denoiser at sigma = inf receives the direction n = lim x / sigma (a perfect one
    returns E[x_0] there)."""
    D_inf = denoise(n, math.inf)
    # sigma_1 = 0 (a budget of one call) returns D_inf itself
    x = D_inf if sigmas[1] == 0 else D_inf + n * sigmas[1]
    return x, sigmas[1:]


def _check_arguments(spec, noise, nfe, steps, sigma_min, sigma_max, options) -> None:
    """ValueError naming the problem and the fix, before any denoiser call."""
    if nfe is not None and steps is not None:
        raise ValueError("give nfe=N or steps=N, not both")
    for key, val in (("nfe", nfe), ("steps", steps)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {val!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise ValueError(f"sampler {spec.name!r} has no option(s) {sorted(unknown)}; "
                         f"its options are {sorted(spec.defaults)}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise ValueError("noise must be a tensor of shape (B, ...), e.g. torch.randn(B, ...) * sigma_max")
    if not _all_finite(noise):
        raise ValueError("noise holds NaN or inf; pass torch.randn(B, ...) * sigma_max (unit randn for sigma_max=inf)")


def _solver_cost(spec, opts: dict, steps: int) -> int:
    """Denoiser calls of `steps` grid intervals of a fixed-step solver (none for no interval)."""
    return spec.cost(steps, {**spec.defaults, **opts}) if steps > 0 else 0


def _plan(spec, options, budget, steps, grid, sigma_min, sigma_max, process, grid_options) -> list[float]:
    """The decreasing sigmas, ending at 0, within the budget. From sigma_max = inf the first interval is
    `first_step` (one call) and the solver gets the rest of the grid and of the budget."""
    inf = math.isinf(sigma_max)
    if inf and budget == 1 and not isinstance(grid, torch.Tensor):  # the first step alone: x = D(n, inf)
        return [math.inf, 0.0]
    if spec.adaptive:  # it picks its own steps between the two ends, within the budget
        if budget is not None:
            options.setdefault("max_nfe", budget - inf)
        top = [math.inf, ADAPTIVE_FIRST_LEVEL] if inf and ADAPTIVE_FIRST_LEVEL > sigma_min else [sigma_max]
        return top + [sigma_min, 0.0]
    opts = {**spec.defaults, **options}
    if isinstance(grid, torch.Tensor):
        sigmas = grids.make(grid, 0, sigma_min, sigma_max)
        steps = len(sigmas) - 1 - inf
    elif steps is None:
        need = spec.cost(1, opts)
        if budget - inf < need:
            after = (f"nfe >= {need + 1} from sigma_max=inf (one call for the first step at inf, then {need} for one "
                     f"step of it) or nfe=1 (the first step alone)") if inf else f"nfe >= {need}"
            raise ValueError(f"sampler {spec.name!r} needs {after} (one step of it makes {need} denoiser calls with "
                             f"options {opts}); raise nfe or pick another sampler")
        steps = spec.steps_for(budget - inf, options)
    cost = inf + _solver_cost(spec, options, steps)
    if budget is not None and cost > budget:
        raise ValueError(f"a grid of {steps + inf} steps costs {cost} calls of {spec.name!r}, over nfe={budget}; "
                         f"pass a shorter grid or a larger nfe")
    if not isinstance(grid, torch.Tensor):
        sigmas = grids.make(grid, steps + inf, sigma_min, sigma_max, process=process, **(grid_options or {}))
    return sigmas.tolist()


def _report_nonfinite(x: torch.Tensor, denoise: Denoise, check_finite: bool) -> None:
    """Warn (or raise with check_finite) when the sample holds NaN or inf, naming where it began."""
    if _all_finite(x):
        return
    s = denoise.first_nonfinite()
    where = (f"the denoiser first returned NaN or inf at sigma={s:.6g}" if s is not None else
             "every denoiser output was finite, so the solver diverged: try more steps or another grid")
    if check_finite:
        raise NonFiniteError(f"the sample holds NaN or inf: {where}")
    warnings.warn(f"the sample holds NaN or inf: {where} (check_finite=True stops with an error there)",
                  RuntimeWarning, stacklevel=3)


from .calibrate import Calibration, calibrate, is_calibration, resolve  # noqa: E402  (uses sample)
