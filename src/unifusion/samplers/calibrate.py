"""Calibrated grids: fit one sampler's sigma grid, at one NFE, to one denoiser.

A fixed recipe (Karras, `tuned`) places the noise levels the same way for every model; the best
places depend on the model's curvature. `calibrate` solves the PF-ODE accurately from a few noises
(the reference), then moves the sampler's levels to minimise the RMSE of its final samples against
that reference (the idea of "Align Your Steps", Sabour et al. 2024, and LD3, Tong et al. 2025,
measured here on the final sample only), and reports the error on held-out noises beside the Karras
and `tuned` grids. The result is a `Calibration`, saved as JSON, that `uf.sample(grid=...)` accepts.

The grid is parametrised so that it is always valid: from log sigma_max down to log sigma_min the
log-sigma span is cut into pieces by softmax(z); the pieces are the gaps between levels, plus a last
piece below the last level (slack), so the last level floats above sigma_min where that helps (with
few steps a call at sigma ~ 0.002 is nearly wasted, as `grids.tuned` found). Levels are strictly
decreasing for every z.

Optimisers:
- 'powell' / 'nelder-mead' (derivative-free, scipy.optimize on z): run the registered samplers
  unchanged, so they work for every fixed-step deterministic sampler and any denoiser.
- 'gradient': L-BFGS on z through small differentiable re-implementations of the solvers
  (`DIFFERENTIABLE`, tested to match the registered ones to 1e-10); needs a denoiser that autograd
  can go through. On the exact mixtures it reaches lower error than Powell or Nelder-Mead in the
  same time (benchmarks/calibrate_mixtures.py --compare-methods).
- 'auto' (default): gradient, then a short Powell polish from its result.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import grids
from .expint import lagrange_weights
from .fitted import check_coefficients, fitted_t, step_orders
from .registry import get
from .unipc import unipc_system

FORMAT = "unifusion.calibration"
VERSION = 1
METHODS = ("auto", "gradient", "powell", "nelder-mead")
DEFAULT_REFERENCE = {"rtol": 1e-6, "atol": 1e-6, "max_nfe": 4000}
POLISH = 30  # method='auto': Powell evaluations per free level after the gradient fit
MIN_PIECE = 1e-6  # the smallest share of the log-sigma span between two levels
INF_TOP = 10.0  # from sigma_max = inf the first finite level may float up to INF_TOP x its initial value
MAX_NFE = 100  # above this every grid is close to the reference, and each fit evaluation costs nfe x n_ref calls


class NotDifferentiable(RuntimeError):
    """method='gradient' with a denoiser that autograd cannot go through."""


# --------------------------------------------------------------------------- the result
@dataclass(eq=False)  # holds a tensor: compare .sigmas and the fields, not the objects
class Calibration:
    """A sigma grid fitted for one (sampler, NFE, options, sigma range), and how well it did.

    rmse_fit / rmse_val: RMSE of the final samples against the reference on the fit noises and on
    the held-out ones (median_val: the median of the held-out samples' own RMS errors), for 'calibrated' and the baseline grids ('karras', 'tuned'; from sigma_max =
    inf: 'uniform_t', 'sd3'). seconds: {'reference', 'fit', 'total'} wall time (total adds the
    baselines' and the held-out evaluations)."""
    sampler: str
    nfe: int
    sigmas: Tensor  # float64, strictly decreasing, ending with 0
    sigma_min: float
    sigma_max: float
    options: dict = field(default_factory=dict)  # the sampler's options it was fitted with
    rmse_fit: dict = field(default_factory=dict)
    rmse_val: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    n_ref: int = 0
    n_val: int = 0
    method: str = ""
    evaluations: int = 0  # objective evaluations (each: one solve of the fit noises)
    reference: dict = field(default_factory=dict)  # how the reference was solved
    coefficients: list | None = None  # sampler 'fitted': the per-step corrections fitted with the grid
    # the median over held-out noises of each sample's RMS error: the typical error, which a few trajectories
    # that end in another mode (and dominate rmse_val) do not move
    median_val: dict = field(default_factory=dict)

    def grid_for(self, sampler: str, nfe: int | None, options: dict | None = None) -> Tensor:
        """The sigmas, after checking they were calibrated for this sampler, NFE and options;
        ValueError otherwise (a grid fitted for one pair is no better than a guess for another)."""
        if sampler != self.sampler or (nfe is not None and nfe != self.nfe):
            asked = f"{sampler} at NFE {nfe}" if nfe is not None else sampler
            raise ValueError(f"this grid was calibrated for {self.sampler} at NFE {self.nfe}, not {asked}; "
                             f"calibrate again for that pair (uf.samplers.calibrate)")
        spec = get(sampler)
        mine = {k: v for k, v in {**spec.defaults, **self.options}.items() if k != "coefficients"}
        theirs = {k: v for k, v in {**spec.defaults, **(options or {})}.items() if k != "coefficients"}
        if mine != theirs:
            diff = {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
            raise ValueError(f"this grid was calibrated for {sampler} with options {self.options or 'default'}; "
                             f"these differ (calibrated, given): {diff}; calibrate again with those options")
        return self.sigmas.clone()

    def check_range(self, sigma_min: float, sigma_max: float) -> None:
        """ValueError unless (sigma_min, sigma_max) is the range it was calibrated on."""
        def same(a, b):
            return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-9 * max(abs(a), abs(b)))
        if not (same(sigma_min, self.sigma_min) and same(sigma_max, self.sigma_max)):
            raise ValueError(f"this grid was calibrated for sigma {self.sigma_max:g} -> {self.sigma_min:g}, not "
                             f"{sigma_max:g} -> {sigma_min:g}; pass sigma_min={self.sigma_min!r}, "
                             f"sigma_max={self.sigma_max!r} (and noise scaled by that sigma_max) or calibrate again")

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigmas"] = [_num(s) for s in self.sigmas.tolist()]
        d["sigma_min"], d["sigma_max"] = _num(self.sigma_min), _num(self.sigma_max)
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration") -> "Calibration":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{where} is not a unifusion calibration file (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: calibration format version {d.get('version')!r}; this unifusion reads "
                             f"version {VERSION}")
        d = {k: v for k, v in d.items() if k not in ("format", "version")}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        try:
            d["sigmas"] = torch.tensor([_unnum(s) for s in d["sigmas"]], dtype=torch.float64)
            d["sigma_min"], d["sigma_max"] = _unnum(d["sigma_min"]), _unnum(d["sigma_max"])
            cal = cls(**d)
            get(cal.sampler)
            grids.check(cal.sigmas, cal.sigma_max)
            if cal.coefficients is not None:
                if cal.sampler != "fitted":
                    raise ValueError(f"coefficients are for sampler 'fitted', not {cal.sampler!r}")
                steps = len(cal.sigmas) - 1 - math.isinf(float(cal.sigmas[0]))
                opts = {**get("fitted").defaults, **cal.options}
                cal.coefficients = check_coefficients(cal.coefficients, steps, opts["order"],
                                                      opts["lower_order_final"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a valid calibration: {e}") from None
        return cal

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically: the old file or the new one, never a mix)."""
        from ..safeio import atomic_write
        return atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"calibration file {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e})") from None
        return cls.from_dict(d, where=str(p))

    def summary(self) -> str:
        """One line per grid: its fit and held-out RMSE."""
        lines = [f"{self.sampler} at NFE {self.nfe}, sigma {self.sigma_max:g} -> {self.sigma_min:g}, {self.method}, "
                 f"{self.evaluations} evaluations, reference {self.seconds.get('reference', 0):.1f} s + fit "
                 f"{self.seconds.get('fit', 0):.1f} s; n_ref {self.n_ref}, n_val {self.n_val}"]
        for name in self.rmse_fit:
            val = self.rmse_val.get(name)
            med = self.median_val.get(name)
            lines.append(f"  {name:10s} fit RMSE {self.rmse_fit[name]:.3e}" +
                         (f"   held-out RMSE {val:.3e}" if val is not None else "") +
                         (f" (median {med:.2e})" if med is not None else ""))
        lines.append("  sigmas " + ", ".join(f"{s:.4g}" for s in self.sigmas.tolist()))
        return "\n".join(lines)


def _num(v: float):
    return "inf" if math.isinf(v) else v


def _unnum(v):
    return math.inf if v == "inf" else float(v)


def resolve(grid, sampler: str, nfe: int | None, options: dict, sigma_min: float, sigma_max: float):
    """(sigmas, fitted coefficients or None) of a Calibration (or of a calibration JSON file) for
    sample(), checked against the sampler, NFE, options and sigma range it is used with."""
    cal = grid if isinstance(grid, Calibration) else Calibration.load(grid)
    sig = cal.grid_for(sampler, nfe, options)
    cal.check_range(sigma_min, sigma_max)
    return sig, cal.coefficients


def is_calibration(grid) -> bool:
    """A Calibration, or a path to a .json file (what sample(grid=...) sends to `resolve`)."""
    return isinstance(grid, Calibration) or (isinstance(grid, (str, Path)) and str(grid).endswith(".json"))


# --------------------------------------------------------------------------- the grid parametrisation
class GridParam:
    """sigmas(z): the first level (sigma_max, or inf), then `levels - 1` levels exp(log_hi - cumsum(w)),
    w = softmax(z) * (log_hi - log sigma_min): the log span from log_hi down to sigma_min cut into pieces.
    log_hi is log sigma_max, or from inf log `top` (so the first finite level floats below top).
    float_last: one more piece, the slack under the last level, lets it float above sigma_min;
    without it the last level is sigma_min."""

    def __init__(self, levels: int, sigma_min: float, sigma_max: float, top: float | None = None,
                 float_last: bool = True):
        self.inf = math.isinf(sigma_max)
        self.levels, self.float_last = levels, float_last  # positive levels, inf included
        self.first = sigma_max  # exactly: the noise was scaled by it
        self.log_hi, self.log_lo = math.log(top if self.inf else sigma_max), math.log(sigma_min)
        self.size = levels - 1 + float_last  # pieces of the span = len(z)

    @property
    def free(self) -> int:
        """Degrees of freedom (softmax ignores a shift of z)."""
        return max(self.size - 1, 0)

    def sigmas(self, z: Tensor) -> Tensor:
        w = self._pieces(z) * (self.log_hi - self.log_lo)
        levels = (self.log_hi - torch.cumsum(w, 0)[: self.levels - 1]).exp()
        head = torch.full((1,), self.first, dtype=z.dtype)
        return torch.cat([head, levels, z.new_zeros(1)])

    def _pieces(self, z: Tensor) -> Tensor:
        """softmax(z) with a floor of MIN_PIECE, so that no two levels ever meet."""
        return (torch.softmax(z, 0) + MIN_PIECE) / (1 + self.size * MIN_PIECE)

    def init(self, sig: Tensor) -> Tensor:
        """z with sigmas(z) = the grid `sig` (its levels after the first), pieces floored at a small size."""
        pos = [float(s) for s in sig if float(s) > 0][1:]
        if len(pos) != self.levels - 1:
            raise ValueError(f"the initial grid has {len(pos) + 1} positive levels, not {self.levels}")
        u = [self.log_hi] + [math.log(s) for s in pos]
        gaps = [a - b for a, b in zip(u[:-1], u[1:])] + ([u[-1] - self.log_lo] if self.float_last else [])
        span = self.log_hi - self.log_lo
        gaps = [max(g, 1e-3 * span / self.size) for g in gaps]
        if self.float_last:  # a softmax piece near 0 has a gradient near 0: a slack of 0 (Karras, last level at
            gaps[-1] = max(gaps[-1], 0.02 * span)  # sigma_min) would keep the last level there for good
        # invert _pieces: softmax(z) = p (1 + size MIN_PIECE) - MIN_PIECE
        return torch.tensor([math.log(g / sum(gaps) * (1 + self.size * MIN_PIECE) - MIN_PIECE) for g in gaps],
                            dtype=torch.float64)


# --------------------------------------------------------------------------- differentiable solvers
# The registered solvers keep their coefficients as Python floats (fast, but autograd cannot see the
# grid). These re-derive the same updates with the grid as a tensor, for method='gradient' only;
# tests/test_calibrate.py checks each against the registered solver to 1e-10 on fixed grids.
def _euler_t(denoise, x, sig, **_):
    for i in range(len(sig) - 1):
        D = denoise(x, sig[i])
        x = D + (sig[i + 1] / sig[i]) * (x - D)
    return x


def _dpmpp_2m_t(denoise, x, sig, **_):
    D_prev = h_prev = None
    for i in range(len(sig) - 1):
        D = denoise(x, sig[i])
        if sig[i + 1].item() == 0:
            return D
        h = torch.log(sig[i] / sig[i + 1])
        Dt = D if D_prev is None else D_prev + (1 + h / (2 * h_prev)) * (D - D_prev)
        x = Dt + (sig[i + 1] / sig[i]) * (x - Dt)
        D_prev, h_prev = D, h
    return x


_AB = [[1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


def _ipndm_t(denoise, x, sig, *, order=4):
    hist = []
    for i in range(len(sig) - 1):
        hist = [(x - denoise(x, sig[i])) / sig[i]] + hist[: order - 1]
        for c, d in zip(_AB[len(hist) - 1], hist):
            x = x + d * (c * (sig[i + 1] - sig[i]))
    return x


def _moments_t(h: Tensor, p: int) -> list[Tensor]:
    """expint.moments with h a tensor: m_k = int_0^h e^{-(h - tau)} tau^k dtau, k < p."""
    if h.item() < 1.0:  # the positive series, as in expint.moments
        out = []
        for k in range(p):
            term, total = h ** (k + 1), 0.0
            for j in range(60):  # h < 1: far fewer terms reach 1e-17
                add = term / (j + k + 1)
                total = total + add
                if add.item() <= 1e-17 * total.item():
                    break
                term = term * h / (j + 1)
            out.append(torch.exp(-h) * total)
        return out
    out = [-torch.expm1(-h)]
    for k in range(1, p):
        out.append(h ** k - k * out[-1])
    return out


def _low_order_end(order: int, have: int, left: int, lower_order_final: bool, n: int) -> int:
    """The order a multistep step uses (as in dpmpp_3m and unipc): warm start, lower order at the end."""
    k = min(order, have, left) if lower_order_final and n < 15 else min(order, have)
    return max(k, 1)


def _dpmpp_3m_t(denoise, x, sig, *, order=3, lower_order_final=True):
    n = len(sig) - 1
    lam = -torch.log(sig[:-1])
    Ds = []
    for i in range(n):
        D = denoise(x, sig[i])
        if sig[i + 1].item() == 0:
            return D
        Ds = ([D] + Ds)[:order]
        k = _low_order_end(order, len(Ds), n - 1 - i, lower_order_final, n)
        h = lam[i + 1] - lam[i]
        w = lagrange_weights([lam[i - j] - lam[i] for j in range(k)], _moments_t(h, k))
        x = x * torch.exp(-h)
        for wj, Dj in zip(w, Ds[:k]):
            x = x + Dj * wj
    return x


def _unipc_coefficients_t(h: Tensor, rks: list, variant: str) -> list:
    """unipc.unipc_coefficients with h a tensor (the same system, solved by torch, out of place)."""
    if len(rks) == 1:
        return [0.5]
    rows, b = unipc_system(h, rks, variant, torch.expm1)

    def t(v):
        return torch.as_tensor(v, dtype=torch.float64)
    A = torch.stack([torch.stack([t(v) for v in row]) for row in rows])
    return list(torch.linalg.solve(A, torch.stack([t(v) for v in b])))


def _unipc_t(denoise, x, sig, *, order=2, variant="bh2", corrector=True, lower_order_final=True,
             final_corrector=False):
    def B(h):
        return -h if variant == "bh1" else torch.expm1(-h)

    def base(x, D0, h, a, rks, Ds):
        out = x * torch.exp(-h) + D0 * (-torch.expm1(-h))
        for ak, rk, Dk in zip(a, rks, Ds[1:]):
            out = out - (Dk - D0) * (B(h) * ak / rk)
        return out

    n = len(sig) - 1
    lam = -torch.log(sig[:-1])
    hist, last = [], None
    for i in range(n):
        D = denoise(x, sig[i])
        if corrector and last is not None:
            x_prev, h, rks, Ds = last
            a = _unipc_coefficients_t(h, rks + [1.0], variant)
            x_c = base(x_prev, Ds[0], h, a[:-1], rks, Ds) - (D - Ds[0]) * (B(h) * a[-1])
            if sig[i + 1].item() == 0 and final_corrector:
                return D + (x_c - x)
            x = x_c
        hist = [(lam[i], D)] + hist[: max(order, 1) - 1]
        if sig[i + 1].item() == 0:
            return D
        p = _low_order_end(order, len(hist), n - 1 - i, lower_order_final, n)
        h = lam[i + 1] - lam[i]
        rks = [(hist[k][0] - lam[i]) / h for k in range(1, p)]
        Ds = [hd[1] for hd in hist[:p]]
        a = _unipc_coefficients_t(h, rks, variant) if p > 1 else []
        last = (x, h, rks, Ds)
        x = base(x, D, h, a, rks, Ds)
    return x


def _fitted_t(denoise, x, sig, **options):
    return fitted_t(denoise, x, sig, moments=_moments_t, **options)


DIFFERENTIABLE = {"euler": _euler_t, "ddim": _euler_t, "dpmpp_2m": _dpmpp_2m_t, "ipndm": _ipndm_t,
                  "dpmpp_3m": _dpmpp_3m_t, "unipc": _unipc_t, "fitted": _fitted_t}


def solve_differentiable(sampler: str, denoiser, noise: Tensor, sigmas: Tensor, cond: dict | None = None,
                         **options) -> Tensor:
    """The registered sampler's result on the grid `sigmas` (a tensor, which may require grad),
    differentiable in the grid (and in the denoiser's parameters). From sigmas[0] = inf the first step
    is `first_step`'s: x_1 = D(n, inf) + sigma_1 n."""
    if sampler not in DIFFERENTIABLE:
        raise ValueError(f"no differentiable {sampler!r}; method='gradient' works for {sorted(DIFFERENTIABLE)}")
    if sampler == "ddim" and options.get("eta", 0.0) != 0:
        raise ValueError("ddim with eta > 0 is stochastic; calibrate the deterministic samplers")
    options = {k: v for k, v in options.items() if k != "eta"}
    cond, batch = cond or {}, noise.shape[0]

    def denoise(x, s):
        out = denoiser(x, s.to(x.dtype).expand(batch), **cond)
        if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad) and not out.requires_grad:
            raise NotDifferentiable("the denoiser's output does not depend differentiably on its input (it "
                                    "detaches, or runs under no_grad); use method='powell'")
        return out

    x = noise
    if math.isinf(sigmas[0].item()):
        D_inf = denoise(noise, sigmas[0].detach())
        if sigmas[1].item() == 0:
            return D_inf
        x, sigmas = D_inf + noise * sigmas[1].to(noise.dtype), sigmas[1:]
    return DIFFERENTIABLE[sampler](denoise, x, sigmas.to(noise.device), **options)


# --------------------------------------------------------------------------- calibrate
class ReferenceNotConverged(RuntimeError):
    """The reference PF-ODE solve did not reach sigma_min within its budget."""


class _OutOfTime(Exception):
    pass


class _PolishDone(Exception):
    pass


def calibrate(denoiser, shape, sampler: str, nfe: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
              n_ref: int = 64, n_val: int = 64, cond=None, process=None, seed: int = 0, method: str = "auto",
              init="tuned", dtype: torch.dtype = torch.float64, device=None, reference=None,
              time_budget_s: float | None = None, max_evals: int | None = None, batch_size: int | None = None,
              float_last: bool = True, options: dict | None = None, progress: bool = False,
              regularization: float = 0.0) -> Calibration:
    """Fit `sampler`'s sigma grid at `nfe` denoiser calls to `denoiser`; see the module docstring.

    denoiser(x, sigma: Tensor(B,), **cond) -> E[x_0 | x], as for uf.sample. shape: one example's
    shape, e.g. (2,) or (1, 8, 8). The noises (seeded by `seed`): n_ref to fit on, n_val held out;
    unit randn scaled by sigma_max (sigma_max = inf: unit noise, the grid starts at inf, as in sample).
    cond: a dict of tensors with n_ref + n_val rows (fit rows first), or a callable
        cond(split, n) -> dict of n rows with split 'fit' or 'val' (e.g. different labels for each).
    method: 'gradient' (L-BFGS through a differentiable copy of the solver; euler, ddim, dpmpp_2m,
        ipndm, dpmpp_3m, unipc; the denoiser must be differentiable), 'powell' or 'nelder-mead'
        (derivative-free, the registered solver unchanged; any fixed-step deterministic sampler);
        'auto' (default): gradient where it can, then a short Powell polish (POLISH evaluations per free
        level, within the time budget), which helps where a learned denoiser makes the loss rough in
        sigma; powell where there is no differentiable solver or the denoiser is not differentiable.
    init: the starting grid: a grid name ('tuned', 'karras', ...), a tensor, or 'best' (the better
        baseline on the fit noises); or a list of them: a fit from each (each with its share of the
        time budget and max_evals), keeping the best. From sigma_max = inf, 'tuned' and 'karras' mean
        'uniform_t'.
    reference: dopri5 options {'rtol', 'atol', 'max_nfe'} (default DEFAULT_REFERENCE; rtol = atol = 1e-5
        for a float32 dtype), or a callable
        reference(noise, cond) -> the exact final samples. A dopri5 solve that does not reach
        sigma_min within max_nfe raises ReferenceNotConverged.
    time_budget_s / max_evals: stop the optimiser after this many seconds / objective evaluations
        (the best grid so far is kept). batch_size: examples per denoiser call (default: all).
    float_last: let the last level rise above sigma_min (else it stays at sigma_min).
    options: the sampler's own keywords; sample() then checks they are the same.
    sampler 'fitted': after the grid, the grid and the per-step correction coefficients are fitted
        together (L-BFGS; each half of the time budget and max_evals), and kept where they lower the fit
        RMSE; `regularization` adds that weight x the sum of squared coefficients to the log RMSE.
        Needs a differentiable denoiser.
    progress: progress bars for the reference solve (denoiser calls) and the fit (evaluations).
    nfe is at most MAX_NFE.
    """
    from . import _plan, sample  # the package's sample and its grid planning (same levels as sample uses)

    spec = get(sampler)
    options = dict(options or {})
    if spec.stochastic or spec.adaptive:
        raise ValueError(f"calibrate fits the grid of a deterministic fixed-step sampler; {sampler!r} is "
                         f"{'stochastic' if spec.stochastic else 'adaptive'}")
    if sampler == "ddim" and options.get("eta", 0.0) != 0:
        raise ValueError("ddim with eta > 0 is stochastic; calibrate it with eta=0 (or calibrate euler)")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    auto = method == "auto"
    fit_coefficients = sampler == "fitted"
    if fit_coefficients and "coefficients" in options:
        raise ValueError("calibrate fits the 'fitted' coefficients itself; do not pass options['coefficients']")
    if fit_coefficients and method not in ("auto", "gradient"):
        raise ValueError(f"sampler 'fitted' fits its coefficients by gradient; use method='auto' or 'gradient', "
                         f"not {method!r}")
    if auto:
        method = "gradient" if sampler in DIFFERENTIABLE else "powell"
    if method == "gradient" and sampler not in DIFFERENTIABLE:
        raise ValueError(f"method='gradient' has differentiable solvers for {sorted(DIFFERENTIABLE)}, not "
                         f"{sampler!r}; use method='powell'")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if nfe > MAX_NFE:
        raise ValueError(f"nfe must be at most {MAX_NFE}, got {nfe}: a calibrated grid is for small budgets (above "
                         f"~{MAX_NFE} calls every grid is close to exact, and each fit evaluation costs nfe x n_ref "
                         "denoiser calls)")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if n_ref < 1 or n_val < 0:
        raise ValueError(f"need n_ref >= 1 and n_val >= 0, got n_ref={n_ref}, n_val={n_val}")
    inf = math.isinf(sigma_max)
    t_start = time.perf_counter()

    # ---- the noises, their conditions, the reference
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_ref + n_val, *shape, generator=g, dtype=torch.float64)
    z = (z if inf else z * sigma_max).to(device=device, dtype=dtype)
    noise = {"fit": z[:n_ref], "val": z[n_ref:]}
    conds = _split_cond(cond, n_ref, n_val, device)
    chunks = {k: _chunks(noise[k], conds[k], batch_size) for k in noise}
    # one reference solve for fit and held-out noises together (per batch_size rows)
    from tqdm.auto import tqdm
    with tqdm(desc=f"calibrate {sampler} NFE {nfe}: reference solve", unit="call", disable=not progress,
              leave=False, dynamic_ncols=True) as ref_bar:
        ref_info, ref_all = _reference(reference, denoiser, _chunks(z, _join(conds, n_val), batch_size), sigma_min,
                                       sigma_max, tick=ref_bar.update)
    ref = {"fit": list(ref_all[:n_ref].split(batch_size or n_ref)),
           "val": list(ref_all[n_ref:].split(batch_size or max(n_val, 1))) if n_val else []}
    t_ref = time.perf_counter() - t_start

    # ---- the grids: baselines and init, planned exactly as sample() plans them
    def plan(grid):
        return torch.tensor(_plan(spec, dict(options), nfe, None, grid, sigma_min, sigma_max,
                                  process if process is not None else _flow(), {}), dtype=torch.float64)

    base_names = ("uniform_t", "sd3") if inf else ("karras", "tuned")
    baselines = {name: plan(name) for name in base_names}

    def run(sig, split, coefficients=None, median=False):
        """RMSE of the registered sampler on `split` with grid sig (and 'fitted' coefficients); with
        median=True, (RMSE, the median over samples of each one's RMS error)."""
        sse, count, each = 0.0, 0, []
        extra = {} if coefficients is None else {"coefficients": coefficients}
        for (x, c), r in zip(chunks[split], ref[split]):
            with torch.no_grad():
                out = sample(denoiser, x, sampler, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, grid=sig,
                             cond=c, **options, **extra)
            err2 = (out.double() - r.double()).pow(2)
            sse += float(err2.sum())
            count += out.numel()
            each.append(err2.flatten(1).mean(1).sqrt())
        total = math.sqrt(sse / count) if math.isfinite(sse) else math.inf
        return (total, float(torch.cat(each).median())) if median else total

    rmse_fit = {name: run(sig, "fit") for name, sig in baselines.items()}
    n_levels = int((baselines[base_names[0]] > 0).sum())

    def start_grid(name) -> Tensor:
        if isinstance(name, Tensor):
            start = grids.make(name, 0, sigma_min, sigma_max)
        elif name == "best":
            start = baselines[min(rmse_fit, key=rmse_fit.get)]
        elif inf and name in ("tuned", "karras"):
            start = baselines["uniform_t"]
        else:
            start = baselines[name] if name in baselines else plan(name)
        if int((start > 0).sum()) != n_levels:
            raise ValueError(f"the initial grid has {int((start > 0).sum())} levels; {sampler} at NFE {nfe} uses "
                             f"{n_levels} (plus the final 0)")
        return start

    # ---- fit, from each start in turn (a list of inits: multi-start, each with its share of the budget)
    starts = [start_grid(i) for i in (init if isinstance(init, (list, tuple)) else [init])]
    # 'fitted': the grid fit gets half the budget, the joint grid + coefficient fit the other half
    share = len(starts) * (2 if fit_coefficients else 1)
    bar = tqdm(desc=f"calibrate {sampler} NFE {nfe}: fit", unit="eval", disable=not progress, leave=False,
               dynamic_ncols=True)
    t_fit, fits = time.perf_counter(), []
    for start in starts:
        param = GridParam(n_levels, sigma_min, sigma_max, top=INF_TOP * float(start[1]) if inf else None,
                          float_last=float_last)
        fits.append(_fit_one(param, start, method, auto, run, sampler, denoiser, chunks["fit"], ref["fit"], options,
                             None if time_budget_s is None else time_budget_s / share,
                             None if max_evals is None else max(1, max_evals // share), bar))
    bar.close()
    sig, _, evaluations, method_used = min(fits, key=lambda f: f[1])
    evaluations = sum(f[2] for f in fits)
    if len(starts) > 1:
        method_used += f" (best of {len(starts)} starts)"
    seconds_fit = time.perf_counter() - t_fit
    fitted = run(sig, "fit")
    # the baselines the parametrisation could express (float_last=False: those ending at sigma_min)
    ok = [k for k, b in baselines.items() if float_last or abs(float(b[-2]) / sigma_min - 1) < 1e-9]
    floor = min(ok, key=rmse_fit.get) if ok else None
    # e.g. stopped early from a worse init: never hand back a grid worse than a baseline on the fit noises
    if floor is not None and fitted > rmse_fit[floor]:
        warnings.warn(f"calibration of {sampler} at NFE {nfe} did not beat the {floor!r} grid on the fit noises "
                      f"({fitted:.3e} vs {rmse_fit[floor]:.3e}); returning the {floor!r} grid", RuntimeWarning)
        sig, fitted, method_used = baselines[floor], rmse_fit[floor], f"{method_used}; kept {floor} (no gain)"
    coefficients, grid_only = None, None
    if fit_coefficients:
        t_coef = time.perf_counter()
        grid_only = (sig, fitted)
        sig_c, coefficients, n_evals = _fit_coefficients(
            GridParam(n_levels, sigma_min, sigma_max, top=INF_TOP * float(sig[1]) if inf else None,
                      float_last=float_last), sig, denoiser, chunks["fit"], ref["fit"], options,
            None if time_budget_s is None else time_budget_s / 2,
            None if max_evals is None else max(1, max_evals // 2), bar, regularization)
        evaluations += n_evals
        with_coef = run(sig_c, "fit", coefficients)
        if with_coef < fitted:  # kept only where they gain on the fit noises
            sig, fitted = sig_c, with_coef
            method_used += " + coefficients (L-BFGS)"
        else:
            coefficients = None
            method_used += " + coefficients (no gain, none kept)"
        seconds_fit += time.perf_counter() - t_coef
    rmse_fit = {"calibrated": fitted, **({"grid only": grid_only[1]} if grid_only else {}), **rmse_fit}
    evaluated = {"calibrated": (sig, coefficients), **({"grid only": (grid_only[0], None)} if grid_only else {}),
                 **{k: (b, None) for k, b in baselines.items()}}
    both = {name: run(s, "val", c, median=True) for name, (s, c) in evaluated.items()} if n_val else {}
    rmse_val, median_val = {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}
    return Calibration(sampler=sampler, nfe=nfe, sigmas=sig, sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                       options=options, rmse_fit=rmse_fit, rmse_val=rmse_val,
                       seconds={"reference": round(t_ref, 3), "fit": round(seconds_fit, 3),
                                "total": round(time.perf_counter() - t_start, 3)}, n_ref=n_ref,
                       n_val=n_val, method=method_used, evaluations=evaluations, reference=ref_info,
                       coefficients=coefficients, median_val=median_val)


def _fit_coefficients(param: GridParam, sig: Tensor, denoiser, fit_chunks, fit_ref, options, time_budget_s,
                      max_evals, bar, regularization: float) -> tuple[Tensor, list, int]:
    """L-BFGS on the grid (z) and the 'fitted' coefficients together, from the grid `sig` and zero
    coefficients; returns (sigmas, coefficients as lists of floats, objective evaluations)."""
    opts = {**get("fitted").defaults, **options}
    steps = len(sig) - 1 - param.inf
    sizes = step_orders(steps, opts["order"], opts["lower_order_final"])
    z = param.init(sig).requires_grad_(True)
    theta = torch.zeros(sum(sizes), dtype=torch.float64, requires_grad=True)
    best = {"loss": math.inf, "z": z.detach().clone(), "theta": theta.detach().clone(), "evals": 0}

    def solve(x, c):
        return solve_differentiable("fitted", denoiser, x, param.sigmas(z), c,
                                    **{**options, "coefficients": list(theta.split(sizes))})

    try:
        _lbfgs({"z": z, "theta": theta}, solve, fit_chunks, fit_ref, best, time.perf_counter(), time_budget_s,
               max_evals, bar, penalty=(lambda: regularization * theta.pow(2).sum()) if regularization else None,
               tolerance=(1e-8, 1e-7), history=30)
    except _OutOfTime:
        pass
    coefficients = [[float(v) for v in part] for part in best["theta"].split(sizes)]
    return param.sigmas(best["z"]).detach(), coefficients, best["evals"]


def _lbfgs(tensors: dict, solve, fit_chunks, fit_ref, best: dict, t0: float, time_budget_s, max_evals, bar,
           penalty=None, tolerance=(1e-7, 1e-6), history: int = 20) -> None:
    """L-BFGS (strong Wolfe line search) on the named tensors, minimising the log RMSE of solve(x, cond)
    against the reference (plus penalty()); best[name] keeps the values of the best evaluation. Raises
    _OutOfTime at the budget; restarts with a fresh history while it still gains (a line search can stall)."""
    params = list(tensors.values())

    def lbfgs():
        return torch.optim.LBFGS(params, lr=1.0, max_iter=10_000, tolerance_grad=tolerance[0],
                                 tolerance_change=tolerance[1], history_size=history, line_search_fn="strong_wolfe")

    opt = lbfgs()

    def closure():
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            raise _OutOfTime
        if max_evals is not None and best["evals"] >= max_evals:
            raise _OutOfTime
        opt.zero_grad()
        sse, count = 0.0, 0
        for (x, c), r in zip(fit_chunks, fit_ref):
            out = solve(x, c)
            part = (out.double() - r.double()).pow(2).sum()
            part.backward()  # per chunk, so only one chunk's graph is alive
            sse += part.item()
            count += out.numel()
        best["evals"] += 1
        if not math.isfinite(sse) or sse <= 0:
            for t in params:
                t.grad = torch.zeros_like(t)
            return torch.tensor(1e3, dtype=torch.float64)
        for t in params:
            t.grad = t.grad * (0.5 / sse)  # d/dt of log sqrt(sse / count)
        val = 0.5 * math.log(sse / count)
        if penalty is not None:
            extra = penalty()
            extra.backward()
            val += extra.item()
        if val < best["loss"]:
            best.update(loss=val, **{k: t.detach().clone() for k, t in tensors.items()})
        bar.update(1)
        bar.set_postfix(rmse=f"{math.exp(best['loss']):.3e}")
        return torch.tensor(val, dtype=torch.float64)

    for _ in range(3):
        before = best["loss"]
        opt.step(closure)
        if not best["loss"] < before - 1e-3:
            break
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(best[k])
        opt = lbfgs()


def _fit_one(param: GridParam, start: Tensor, method: str, auto: bool, run, sampler, denoiser, fit_chunks, fit_ref,
             options, time_budget_s, max_evals, bar) -> tuple[Tensor, float, int, str]:
    """Fit z from the grid `start`; returns (sigmas, log fit RMSE, evaluations, what ran)."""
    t_fit = time.perf_counter()
    best = {"loss": math.inf, "z": param.init(start), "evals": 0}

    def loss_of(zz: Tensor) -> float:
        if time_budget_s is not None and time.perf_counter() - t_fit > time_budget_s:
            raise _OutOfTime
        if max_evals is not None and best["evals"] >= max_evals:
            raise _OutOfTime
        if best.get("cap") is not None and best["evals"] >= best["cap"]:
            raise _PolishDone
        best["evals"] += 1
        e = run(param.sigmas(zz), "fit")
        val = math.log(e) if e > 0 and math.isfinite(e) else 1e3
        if val < best["loss"]:
            best.update(loss=val, z=zz.detach().clone())
        bar.update(1)
        bar.set_postfix(rmse=f"{math.exp(best['loss']):.3e}")
        return val

    method_used = method
    if param.free == 0:
        method_used = "none (no free level)"
        loss_of(best["z"])
        return param.sigmas(best["z"]).detach(), best["loss"], best["evals"], method_used
    try:
        if method == "gradient":
            try:
                _fit_gradient(param, best, sampler, denoiser, fit_chunks, fit_ref, options, time_budget_s, t_fit,
                              max_evals, bar)
                if auto:  # a short Powell polish: a learned denoiser can make the loss rough in sigma
                    best["cap"] = best["evals"] + POLISH * param.free
                    method_used = "gradient + powell"
                    _fit_scipy("powell", param, best, loss_of)
            except NotDifferentiable:
                if not auto:
                    raise
                method_used = "powell (the denoiser is not differentiable)"
                _fit_scipy("powell", param, best, loss_of)
        else:
            _fit_scipy(method, param, best, loss_of)
    except _OutOfTime:
        method_used += " (stopped by its budget)"
    except _PolishDone:
        pass
    return param.sigmas(best["z"]).detach(), best["loss"], best["evals"], method_used


def _flow():
    from ..processes import Flow
    return Flow()


def _split_cond(cond, n_ref: int, n_val: int, device) -> dict:
    """{'fit': dict, 'val': dict} of per-example condition tensors."""
    if cond is None:
        return {"fit": {}, "val": {}}
    if callable(cond):
        out = {"fit": cond("fit", n_ref), "val": cond("val", n_val) if n_val else {}}
    elif isinstance(cond, dict):
        out = {"fit": {k: v[:n_ref] for k, v in cond.items()}, "val": {k: v[n_ref:] for k, v in cond.items()}}
        for k, v in cond.items():
            if len(v) != n_ref + n_val:
                raise ValueError(f"cond[{k!r}] has {len(v)} rows; it needs n_ref + n_val = {n_ref + n_val} "
                                 f"(fit rows first), or pass a callable cond(split, n)")
    else:
        raise ValueError(f"cond must be a dict of tensors or a callable cond(split, n), got {type(cond).__name__}")
    for split, n in (("fit", n_ref), ("val", n_val)):
        if not isinstance(out[split], dict):
            raise ValueError(f"cond({split!r}, {n}) must return a dict of tensors, got {type(out[split]).__name__}")
        for k, v in out[split].items():
            if n and len(v) != n:
                raise ValueError(f"cond for {split!r}: {k!r} has {len(v)} rows, not {n}")
        out[split] = {k: v.to(device) if device is not None else v for k, v in out[split].items()}
    return out


def _chunks(x: Tensor, cond: dict, batch_size: int | None) -> list[tuple[Tensor, dict]]:
    n = len(x)
    if n == 0:
        return []
    step = batch_size or n
    return [(x[i:i + step], {k: v[i:i + step] for k, v in cond.items()}) for i in range(0, n, step)]


def _reference(reference, denoiser, parts: list, sigma_min: float, sigma_max: float,
               tick=lambda n: None) -> tuple[dict, Tensor]:
    """The exact final samples of every (noise, cond) part, concatenated, and how they were computed;
    tick(1) after every denoiser call of the dopri5 solve (a progress bar)."""
    from . import sample
    if callable(reference):
        out, info = [reference(x, c) for x, c in parts], {"kind": "given"}
    else:
        loose = any(x.dtype != torch.float64 for x, _ in parts)
        # float32 cannot resolve a relative error of 1e-6 reliably: its default is 1e-5 there
        opts = {**DEFAULT_REFERENCE, **({"rtol": 1e-5, "atol": 1e-5} if loose else {}), **(reference or {})}
        unknown = set(opts) - set(DEFAULT_REFERENCE)
        if unknown:
            raise ValueError(f"reference options {sorted(unknown)} unknown; give {sorted(DEFAULT_REFERENCE)} "
                             f"(dopri5) or a callable reference(noise, cond)")
        calls = [0]

        def counted(x, s, **c):
            calls[0] += 1
            tick(1)
            return denoiser(x, s, **c)

        out = []
        for x, c in parts:
            try:
                out.append(sample(counted, x, "dopri5", nfe=opts["max_nfe"], sigma_min=sigma_min, sigma_max=sigma_max,
                                  cond=c, rtol=opts["rtol"], atol=opts["atol"]))
            except RuntimeError as e:
                if "max_nfe" not in str(e):
                    raise
                raise ReferenceNotConverged(
                    f"the reference solve (dopri5, rtol={opts['rtol']}, atol={opts['atol']}) did not reach "
                    f"sigma_min={sigma_min} within max_nfe={opts['max_nfe']} denoiser calls; pass "
                    f"reference={{'max_nfe': {4 * opts['max_nfe']}}}, or a looser tolerance such as "
                    f"reference={{'rtol': {10 * opts['rtol']:g}, 'atol': {10 * opts['atol']:g}}}. A grid fitted to an "
                    f"unfinished reference would fit its error") from None
        info = {"kind": "dopri5", **opts, "calls": calls[0]}
    for r, (x, _) in zip(out, parts):
        if getattr(r, "shape", None) != x.shape or not torch.isfinite(r).all():
            raise ReferenceNotConverged(f"the reference samples are not finite or not shaped like the noise "
                                        f"{tuple(x.shape)}")
    return info, torch.cat(out)


def _join(conds: dict, n_val: int) -> dict:
    """The fit and held-out conditions as one set of rows (fit first), for one reference solve."""
    fit, val = conds["fit"], conds["val"]
    if not n_val:
        return fit
    if set(fit) != set(val):
        raise ValueError(f"cond gives keys {sorted(fit)} for 'fit' but {sorted(val)} for 'val'; give both the same")
    return {k: torch.cat([fit[k], val[k]]) for k in fit}


def _fit_scipy(method: str, param: GridParam, best: dict, loss_of) -> None:
    """Powell or Nelder-Mead on z[1:] - z[0] (softmax ignores a common shift)."""
    from scipy.optimize import minimize

    z0 = best["z"]

    def f(v):
        return loss_of(torch.cat([z0.new_zeros(1), torch.as_tensor(v, dtype=torch.float64)]))

    x0 = (z0[1:] - z0[0]).numpy()
    if method == "powell":
        minimize(f, x0, method="Powell", options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": 100000})
    else:
        import numpy as np
        simplex = np.vstack([x0] + [x0 + 0.5 * np.eye(len(x0))[i] for i in range(len(x0))])
        minimize(f, x0, method="Nelder-Mead",
                 options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-4, "maxfev": 100000,
                          "adaptive": len(x0) > 5})


def _fit_gradient(param, best, sampler, denoiser, fit_chunks, fit_ref, options, time_budget_s, t_fit, max_evals,
                  bar) -> None:
    """L-BFGS (strong Wolfe line search) on z; log RMSE through the differentiable solver."""
    z = best["z"].clone().requires_grad_(True)
    _lbfgs({"z": z}, lambda x, c: solve_differentiable(sampler, denoiser, x, param.sigmas(z), c, **options),
           fit_chunks, fit_ref, best, t_fit, time_budget_s, max_evals, bar)
