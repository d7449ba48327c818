"""Sampler benchmark: accuracy against the exact PF-ODE solution, and per-step bookkeeping time.

Part 1 (accuracy vs NFE). On exact Gaussian mixtures (evaluation/mixture.py) every deterministic
sampler starts from the same noise at sigma_max = 80 and runs to sigma = 0 with a denoiser-call
budget N; its error is the RMSE against `GaussianMixture.pf_ode` (DOP853 at 1e-12) from the same
noise. The denoiser is wrapped in a call counter, so the table reports what each sampler really
spent and a sampler that overspends fails the run.

Part 2 (bookkeeping time). With a near-free denoiser (x * 0.5) on one 4x64x64 float32 latent and
one thread, the wall time per step is the solver machinery itself.

Peers, run on the same exact denoiser and the same Karras rho=7 grid where they allow it:
k-diffusion (only `k_diffusion/sampling.py` is loaded: its package __init__ imports torchvision)
and diffusers schedulers (their models see exactly their input/output conventions; see
`_edm_model` and `_vp_model`). Both are optional: a missing one is reported and skipped.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import samplers as uf_samplers
from ..samplers import grids as uf_grids
from ..samplers.registry import largest_steps
from .mixture import GaussianMixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DEFAULT_NFES = (5, 8, 10, 15, 20, 50)
# dim -> (mixture seed, batch); other dims use seed = dim, batch 128
PROBLEMS = {2: (0, 256), 64: (1, 128)}
PEER_GRIDS = ("karras", "loglinear")  # the grids diffusers' schedulers can build themselves


# --------------------------------------------------------------------------- counting and runners
class CountingDenoiser:
    """Wraps denoiser(x, sigma: Tensor(B,)) and counts its calls."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.fn(x, sigma, **cond)


@dataclass
class Runner:
    """One sampler of one library: run(denoiser, noise, nfe) -> sample at sigma = 0."""
    name: str  # 'uf:...', 'kd:...', 'hf:...'
    run: Callable


def _full(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- unifusion
def unifusion_runners(grid: str = "karras") -> list[Runner]:
    """Every deterministic, fixed-step sampler in the registry (unipc once per variant)."""
    out = []
    for name in uf_samplers.names():
        spec = uf_samplers.get(name)
        if spec.stochastic or spec.adaptive:
            continue
        variants = [("bh1", {"variant": "bh1"}), ("bh2", {"variant": "bh2"})] if name == "unipc" else [("", {})]
        for suffix, opts in variants:
            label = f"uf:{name}_{suffix}" if suffix else f"uf:{name}"

            def run(denoiser, noise, nfe, _name=name, _opts=opts):
                return uf_samplers.sample(denoiser, noise, _name, nfe=nfe, sigma_min=SIGMA_MIN,
                                          sigma_max=SIGMA_MAX, grid=grid, **_opts)
            out.append(Runner(label, run))
    if grid == "karras":  # unifusion's low-NFE recipe: the same samplers on grids.tuned
        for name in ("ipndm", "unipc", "dpmpp_2m"):
            def run(denoiser, noise, nfe, _name=name):
                return uf_samplers.sample(denoiser, noise, _name, nfe=nfe, sigma_min=SIGMA_MIN,
                                          sigma_max=SIGMA_MAX, grid="tuned")
            out.append(Runner(f"uf:{name}@tuned", run))
    return out


# --------------------------------------------------------------------------- k-diffusion
_KD = None


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Trailing singleton dims so x broadcasts against a tensor with target_dims dims."""
    extra = target_dims - x.ndim
    if extra < 0:
        raise ValueError(f"tensor has {x.ndim} dims, more than {target_dims}")
    return x[(...,) + (None,) * extra]


def load_k_diffusion():
    """Import k_diffusion.sampling without running the package __init__ (which needs torchvision):
    a stub package pointing at the installed directory plus a stub `utils` with append_dims."""
    global _KD
    if _KD is not None:
        return _KD
    if "k_diffusion.sampling" in sys.modules:
        _KD = sys.modules["k_diffusion.sampling"]
        return _KD
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    keys = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {k: sys.modules.get(k) for k in keys}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        _KD = importlib.import_module("k_diffusion.sampling")
    finally:  # leave sys.modules as it was, so a real `import k_diffusion` elsewhere is unaffected
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return _KD


# label -> (function, keyword arguments, denoiser calls for n grid levels followed by 0)
KD_SAMPLERS = {
    "kd:euler": ("sample_euler", {}, lambda n: n),
    "kd:heun": ("sample_heun", {}, lambda n: 2 * n - 1),
    "kd:dpm_2": ("sample_dpm_2", {}, lambda n: 2 * n - 1),
    "kd:lms": ("sample_lms", {}, lambda n: n),
    "kd:dpmpp_2m": ("sample_dpmpp_2m", {}, lambda n: n),
    "kd:dpmpp_2s_anc(eta=0)": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, lambda n: 2 * n - 1),
    "kd:dpmpp_3m_sde(eta=0)": ("sample_dpmpp_3m_sde", {"eta": 0.0}, lambda n: n),
}


def kd_sigmas(kd, n: int, grid: str) -> torch.Tensor:
    """n levels + 0: k-diffusion's own Karras grid (built in float64), else unifusion's grid."""
    if grid != "karras":
        return uf_grids.make(grid, n, SIGMA_MIN, SIGMA_MAX)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # get_sigmas_karras uses the default dtype
    try:
        return kd.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0)
    finally:
        torch.set_default_dtype(prev)


def kdiffusion_runners(grid: str = "karras") -> list[Runner]:
    kd = load_k_diffusion()
    out = []
    for label, (fname, kwargs, cost) in KD_SAMPLERS.items():
        def run(denoiser, noise, nfe, _f=getattr(kd, fname), _kw=kwargs, _cost=cost):
            sigmas = kd_sigmas(kd, largest_steps(_cost, nfe), grid).to(noise.dtype)
            # k-diffusion calls model(x, sigma * s_in): sigma is a (B,) tensor, as unifusion's contract
            return _f(lambda x, sigma: denoiser(x, sigma), noise, sigmas, disable=True, **_kw)
        out.append(Runner(label, run))
    return out


# --------------------------------------------------------------------------- diffusers
def _vp_trained_betas(n_train: int = 1000) -> np.ndarray:
    """Betas of a discrete VP process whose sigmas = sqrt((1 - abar) / abar) run geometrically
    over [SIGMA_MIN, SIGMA_MAX], so the VP schedulers' Karras grid spans the benchmark's range."""
    sig = np.exp(np.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), n_train))
    abar = 1 / (1 + sig**2)
    return 1 - abar / np.concatenate([[1.0], abar[:-1]])


def _edm_model(sched, denoiser, x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network output F an EDM scheduler expects (prediction_type 'epsilon' = EDM's F):
    it gets x_in = c_in x and turns F back into D = c_skip x + c_out F (precondition_outputs).
    c_in, c_skip, c_out are computed as the scheduler computes them, from its own float32 sigma."""
    sd = sched.config.sigma_data
    c_in = 1 / ((sigma**2 + sd**2) ** 0.5)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
    x = x_in / c_in
    D = denoiser(x, _full(x, sigma))
    return (D - c_skip * x) / c_out


def _vp_model(denoiser, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Epsilon prediction for a VP scheduler: x_t = alpha x with alpha = 1 / sqrt(1 + sigma^2),
    sigma_t = sigma alpha (the scheduler's _sigma_to_alpha_sigma_t), eps = (x_t - alpha D) / sigma_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    x = x_t / alpha
    D = denoiser(x, _full(x, sigma))
    return (x_t - alpha * D) / sigma_t


def _edm_loop(make_sched, denoiser, noise, nfe):
    sched = make_sched()
    sched.set_timesteps(nfe)  # n levels + final 0: one call per level
    sched.set_begin_index(0)
    x = noise
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        out = _edm_model(sched, denoiser, x_in, sched.sigmas[i])
        x = sched.step(out, t, x).prev_sample
        assert sched.step_index == i + 1
    return x


def _vp_loop(make_sched, denoiser, noise, nfe, final_denoise=False):
    """The usual pipeline loop in the VP domain, from x_t = alpha(sigma_max) * noise.

    final_denoise: the scheduler's grid ends at sigma_min with a zero-length last step (DEIS, or
    final_sigmas_type='sigma_min'); spend that last call on returning D(x, sigma_min) instead, which
    is what the step to sigma = 0 of final_sigmas_type='zero' returns."""
    sched = make_sched()
    sched.set_timesteps(nfe)
    sched.set_begin_index(0)
    s0 = sched.sigmas[0]
    x = noise / ((s0**2 + 1) ** 0.5)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        if final_denoise and i == len(sched.timesteps) - 1:
            alpha = 1 / ((sigma**2 + 1) ** 0.5)
            return denoiser(x / alpha, _full(x, sigma))
        x = sched.scale_model_input(x, t)
        out = _vp_model(denoiser, x, sigma)
        x = sched.step(out, t, x).prev_sample
        assert sched.step_index == i + 1
    return x


def diffusers_runners(grid: str = "karras") -> tuple[list[Runner], list[str]]:
    """diffusers schedulers on the exact denoiser; returns (runners, notes)."""
    import diffusers
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    if grid not in PEER_GRIDS:
        return [], [f"diffusers schedulers skipped: they build only {list(PEER_GRIDS)} grids, not {grid!r}"]
    edm_schedule = "karras" if grid == "karras" else "exponential"
    vp_grid = {"use_karras_sigmas": True} if grid == "karras" else {"use_exponential_sigmas": True}
    betas = _vp_trained_betas()

    def edm(cls, **kw):
        return lambda: cls(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=0.5, sigma_schedule=edm_schedule,
                           prediction_type="epsilon", rho=7.0, final_sigmas_type="zero", **kw)

    def vp(cls, **kw):
        return lambda: cls(trained_betas=betas, prediction_type="epsilon", **vp_grid, **kw)

    specs = [
        ("hf:edm_euler", edm(diffusers.EDMEulerScheduler), _edm_loop),
        ("hf:edm_dpmpp_2m", edm(diffusers.EDMDPMSolverMultistepScheduler, solver_order=2,
                                algorithm_type="dpmsolver++"), _edm_loop),
        ("hf:edm_dpmpp_3m", edm(diffusers.EDMDPMSolverMultistepScheduler, solver_order=3,
                                algorithm_type="dpmsolver++"), _edm_loop),
        ("hf:dpmpp_2m", vp(diffusers.DPMSolverMultistepScheduler, solver_order=2, algorithm_type="dpmsolver++",
                           final_sigmas_type="zero"), _vp_loop),
        ("hf:dpmpp_3m", vp(diffusers.DPMSolverMultistepScheduler, solver_order=3, algorithm_type="dpmsolver++",
                           final_sigmas_type="zero"), _vp_loop),
        # UniPC takes the range from sigma_min/sigma_max in its config, so it hits 0.002 exactly.
        # bh1 with final_sigmas_type='zero' returns NaN (its last step multiplies B(h) = -h = -inf by 0),
        # so it ends at sigma_min and that last call returns D(x, sigma_min): the same result as 'zero'
        ("hf:unipc_bh1", vp(diffusers.UniPCMultistepScheduler, solver_order=2, solver_type="bh1",
                            sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, final_sigmas_type="sigma_min"),
         lambda mk, d, x, n: _vp_loop(mk, d, x, n, final_denoise=True)),
        ("hf:unipc_bh2", vp(diffusers.UniPCMultistepScheduler, solver_order=2, solver_type="bh2",
                            sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, final_sigmas_type="zero"), _vp_loop),
        ("hf:deis_3", vp(diffusers.DEISMultistepScheduler, solver_order=3, algorithm_type="deis"),
         lambda mk, d, x, n: _vp_loop(mk, d, x, n, final_denoise=True)),
    ]
    out = []
    for label, make, loop in specs:
        def run(denoiser, noise, nfe, _make=make, _loop=loop):
            return _loop(_make, denoiser, noise, nfe)
        out.append(Runner(label, run))

    # the range each family really runs over (the VP ones are limited by float32 alphas_cumprod)
    notes = [
        "hf:* : diffusers keeps sigmas (and so its step coefficients) in float32; samples stay float64 "
        "except where a scheduler casts them (EDMEuler, DPMSolverMultistep)",
        f"hf:edm_* : range sigma {_range(specs[0][1])}, then 0",
        f"hf:dpmpp_*, hf:deis_3 (VP, trained_betas): range sigma {_range(specs[3][1])} "
        f"(float32 alphas_cumprod cannot represent sigma = 0.002 exactly), then 0",
        f"hf:unipc_* (VP, sigma_min/sigma_max in config): range sigma {_range(specs[5][1])}, then 0",
        "hf:deis_3, hf:unipc_bh1 : the grid ends at sigma_min with a zero-length last step; that last call "
        "returns D(x, sigma_min) instead (DEIS has no final_sigmas_type; UniPC bh1 gives NaN with 'zero')",
    ]
    return out, notes


def _range(make) -> str:
    sched = make()
    sched.set_timesteps(10)
    pos = sched.sigmas[sched.sigmas > 0]
    return f"{float(pos.max()):.6g} -> {float(pos.min()):.6g}"


# --------------------------------------------------------------------------- part 1: accuracy
@dataclass
class Result:
    rmse: float
    nfe_used: int


@dataclass
class AccuracyTable:
    dim: int
    nfes: list[int]
    rows: dict[str, dict[int, Result]] = field(default_factory=dict)  # sampler -> nfe -> result
    check_nfe: int | None = None
    check: dict[str, Result] = field(default_factory=dict)  # sampler -> result at check_nfe


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


def run_one(runner: Runner, gm: GaussianMixture, noise: torch.Tensor, ref: torch.Tensor, nfe: int) -> Result:
    counted = CountingDenoiser(gm.denoise)
    with torch.no_grad():
        x = runner.run(counted, noise.clone(), nfe)
    if counted.calls > nfe:
        raise AssertionError(f"{runner.name} made {counted.calls} denoiser calls with a budget of {nfe}")
    return Result(rmse(x, ref), counted.calls)


def accuracy_table(runners: list[Runner], dim: int, nfes, components: int, mixture_seed: int, batch: int,
                   noise_seed: int = 0, check_nfe: int | None = None) -> AccuracyTable:
    gm = GaussianMixture.random(dim, components, seed=mixture_seed)
    g = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64) * SIGMA_MAX
    ref = gm.pf_ode(noise, SIGMA_MAX, 0.0)  # computed once, shared by every sampler
    table = AccuracyTable(dim, list(nfes), check_nfe=check_nfe)
    for r in runners:
        table.rows[r.name] = {n: run_one(r, gm, noise, ref, n) for n in nfes}
        if check_nfe:
            table.check[r.name] = run_one(r, gm, noise, ref, check_nfe)
    return table


def _best(table: AccuracyTable, nfe: int, peers: bool, same_grid: bool = False) -> tuple[str, float] | None:
    cands = [(name, res[nfe].rmse) for name, res in table.rows.items()
             if (name.startswith("uf:") != peers) and math.isfinite(res[nfe].rmse)
             and not (same_grid and "@" in name)]
    return min(cands, key=lambda c: c[1]) if cands else None


def format_table(table: AccuracyTable) -> str:
    """Rows = samplers, columns = NFE budgets, cells = RMSE (3 significant digits); a cell whose
    sampler spent fewer calls than the budget shows the calls used in brackets."""
    w0 = max(len(n) for n in table.rows) + 2
    cw = 15
    head = "sampler".ljust(w0) + "".join(f"NFE {n}".rjust(cw) for n in table.nfes)
    if table.check_nfe:
        head += " |" + f"NFE {table.check_nfe} (check)".rjust(cw + 6)
    lines = [head, "-" * len(head)]

    def cell(res: Result, budget: int) -> str:
        txt = f"{res.rmse:.2e}"
        return txt + (f" [{res.nfe_used}]" if res.nfe_used != budget else "")

    prev_lib = None
    for name, res in table.rows.items():
        lib = name.split(":")[0]
        if prev_lib is not None and lib != prev_lib:
            lines.append("")
        prev_lib = lib
        line = name.ljust(w0) + "".join(cell(res[n], n).rjust(cw) for n in table.nfes)
        if table.check_nfe and name in table.check:
            line += " |" + cell(table.check[name], table.check_nfe).rjust(cw + 6)
        lines.append(line)
    lines.append("")
    lines.append("per NFE: best peer; best unifusion sampler on the same grid, and with its own recipe (@tuned);"
                 " error ratio ours/peer (< 1: ours more accurate)")
    for n in table.nfes:
        peer = _best(table, n, peers=True)
        same, own = _best(table, n, peers=False, same_grid=True), _best(table, n, peers=False)
        if same is None:
            continue
        txt = f"  NFE {n:>3}:"
        if peer is not None:
            txt += f" peer {peer[0]} {peer[1]:.2e} | same grid {same[0]} {same[1]:.2e} ratio {same[1] / peer[1]:.3g}"
            if own[0] != same[0]:
                txt += f" | recipe {own[0]} {own[1]:.2e} ratio {own[1] / peer[1]:.3g}"
        else:
            txt += f" {same[0]} {same[1]:.2e}"
        lines.append(txt)
    return "\n".join(lines)


def write_csv(tables: list[AccuracyTable], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dim", "sampler", "library", "nfe_budget", "nfe_used", "rmse"])
        for t in tables:
            for name, res in t.rows.items():
                items = list(res.items()) + ([(t.check_nfe, t.check[name])] if name in t.check else [])
                for n, r in items:
                    w.writerow([t.dim, name, name.split(":")[0], n, r.nfe_used, f"{r.rmse:.6e}"])


def _family(name: str) -> str:
    """The algorithm a row implements, so that one colour marks it in every library."""
    algo = name.split(":", 1)[1].split("(")[0].removeprefix("edm_")
    return {"ddim": "euler", "dpmpp_2s_anc": "dpmpp_2s", "dpmpp_3m_sde": "dpmpp_3m"}.get(algo, algo)


def plot(tables: list[AccuracyTable], path: str) -> None:
    """Error vs NFE, log-log: unifusion solid, peers dashed; one colour per algorithm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(7.5 * len(tables), 6), squeeze=False)
    families = sorted({_family(n) for t in tables for n in t.rows})
    cmap = plt.get_cmap("tab20" if len(families) > 10 else "tab10")
    colour = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    marker = {"uf": "o", "kd": "s", "hf": "^"}
    for ax, t in zip(axes[0], tables):
        for name, res in t.rows.items():
            found = list(res.values()) + ([t.check[name]] if name in t.check else [])
            pts = sorted((r.nfe_used, r.rmse) for r in found if r.rmse > 0 and math.isfinite(r.rmse))
            if not pts:
                continue
            lib = name.split(":")[0]
            ax.loglog(*zip(*pts), "-" if lib == "uf" else "--", marker=marker.get(lib, "x"), ms=3.5,
                      lw=1.6 if lib == "uf" else 1.0, color=colour[_family(name)], label=name)
        ticks = sorted(set(t.nfes) | ({t.check_nfe} if t.check else set()))
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("denoiser calls (NFE)")
        ax.set_ylabel("RMSE vs exact PF-ODE solution")
        ax.set_title(f"{t.dim}-D Gaussian mixture, sigma {SIGMA_MAX:g} -> 0")
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7.5)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- part 2: timing
def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_table(nfe: int = 50, repeats: int = 7, peers: bool = True, shape=(1, 4, 64, 64)) -> str:
    """Per-step wall time with a near-free denoiser, side by side, one thread, float32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timing_table(nfe, repeats, peers, shape)
    finally:
        torch.set_num_threads(threads)


def _timing_table(nfe, repeats, peers, shape) -> str:
    x0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * SIGMA_MAX

    def free(x, sigma):
        return x * 0.5

    heun_n = largest_steps(lambda n: 2 * n - 1, nfe)
    steps = {"euler": nfe, "dpmpp_2m": nfe, "heun": heun_n, "unipc": nfe}  # grid intervals per solve
    rows = {k: {} for k in steps}
    for name in steps:
        rows[name]["uf"] = _median_time(lambda: uf_samplers.sample(free, x0, name, nfe=nfe), repeats) / steps[name]

    notes = []
    if peers:
        try:
            kd = load_k_diffusion()
            with torch.no_grad():
                for name, fname, n in (("euler", "sample_euler", nfe), ("dpmpp_2m", "sample_dpmpp_2m", nfe),
                                       ("heun", "sample_heun", heun_n)):
                    sig = kd.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)
                    f = getattr(kd, fname)
                    rows[name]["kd"] = _median_time(lambda: f(free, x0, sig, disable=True), repeats) / n
        except ImportError:
            notes.append("k-diffusion not installed (make bench installs it)")
        try:
            import diffusers
            from diffusers.utils import logging as dlogging
            dlogging.set_verbosity_error()

            def loop(make):
                sched = make()
                sched.set_timesteps(nfe)
                x = x0
                for t in sched.timesteps:
                    out = free(sched.scale_model_input(x, t), t)
                    x = sched.step(out, t, x).prev_sample
                return x

            hf = {
                "euler": lambda: diffusers.EDMEulerScheduler(),
                "dpmpp_2m": lambda: diffusers.EDMDPMSolverMultistepScheduler(solver_order=2),
                "unipc": lambda: diffusers.UniPCMultistepScheduler(use_karras_sigmas=True, solver_order=2),
            }
            with torch.no_grad():
                for name, make in hf.items():
                    rows[name]["hf"] = _median_time(lambda: loop(make), repeats) / nfe
        except ImportError:
            notes.append("diffusers not installed (make bench installs it)")

    def us(v):
        return f"{v * 1e6:.1f}" if v is not None else "-"

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b is not None else "-"

    cols = ["uf µs/step", "kd µs/step", "hf µs/step", "uf/kd", "uf/hf"]
    lines = [f"per-step time, near-free denoiser (x * 0.5), one {'x'.join(map(str, shape))} float32 latent, "
             f"torch.set_num_threads(1), NFE {nfe} (heun: {heun_n} steps), median of {repeats}",
             "sampler".ljust(10) + "".join(c.rjust(12) for c in cols)]
    for name, r in rows.items():
        u, k, h = r.get("uf"), r.get("kd"), r.get("hf")
        lines.append(name.ljust(10) + "".join(s.rjust(12) for s in (us(u), us(k), us(h), ratio(u, k), ratio(u, h))))
    lines.append("peers timed: kd sample_euler / sample_dpmpp_2m / sample_heun; hf EDMEulerScheduler, "
                 "EDMDPMSolverMultistepScheduler(order 2), UniPCMultistepScheduler(order 2, bh2) step loops "
                 "(scale_model_input + step)")
    lines += notes
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def build_runners(grid: str, peers: bool) -> tuple[list[Runner], list[str]]:
    runners, notes = unifusion_runners(grid), []
    if not peers:
        return runners, notes
    try:
        runners += kdiffusion_runners(grid)
        notes.append("kd:* = k-diffusion 0.1.1 sampling.py; " + (
            "grid get_sigmas_karras(n, 0.002, 80, rho=7) + 0" if grid == "karras" else f"grid unifusion {grid!r} + 0"))
    except ImportError:
        print("k-diffusion not installed (make bench installs it)")
    try:
        hf, hf_notes = diffusers_runners(grid)
        runners += hf
        notes += hf_notes
    except ImportError:
        print("diffusers not installed (make bench installs it)")
    return runners, notes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="unifusion bench samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=list(PROBLEMS), help="mixture dimensions (default 2 64)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES), help="denoiser-call budgets")
    p.add_argument("--grid", default="karras", choices=["karras", "loglinear", "linear", "sd3"],
                   help="sigma grid for every sampler (diffusers only builds karras and loglinear)")
    p.add_argument("--batch", type=int, default=None, help="samples per problem (default 256 in 2-D, 128 in 64-D)")
    p.add_argument("--components", type=int, default=8, help="mixture components")
    p.add_argument("--check-nfe", type=int, default=200, help="extra NFE that checks convergence (0: off)")
    p.add_argument("--no-peers", action="store_true", help="only unifusion's samplers")
    p.add_argument("--no-timing", action="store_true", help="skip part 2 (per-step time)")
    p.add_argument("--timing-nfe", type=int, default=50)
    p.add_argument("--timing-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads for part 1 (part 2 always uses 1)")
    p.add_argument("--out", default="runs/bench", help="directory for samplers.csv and samplers.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """`unifusion bench samplers` / benchmarks/samplers.py: run, print the tables; exit status 0."""
    run(argv)
    return 0


def run(argv=None) -> dict:
    """Run the benchmark, print its tables; returns {'tables': [AccuracyTable], 'timing': str | None}."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    runners, notes = build_runners(args.grid, peers=not args.no_peers)
    print(f"# Samplers on exact Gaussian mixtures: RMSE of the final sample vs the exact PF-ODE solution "
          f"(DOP853, tol 1e-12), sigma {SIGMA_MAX:g} -> {SIGMA_MIN:g} -> 0, grid {args.grid}")
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s); "
          f"'[k]' after a cell: the sampler used only k of the budget's denoiser calls")
    for n in notes:
        print(f"# {n}")
    tables = []
    for dim in args.dims:
        seed, batch = PROBLEMS.get(dim, (dim, 128))
        batch = args.batch or batch
        t0 = time.perf_counter()
        table = accuracy_table(runners, dim, args.nfe, args.components, seed, batch,
                               check_nfe=args.check_nfe or None)
        tables.append(table)
        print(f"\n## {dim}-D: GaussianMixture.random({dim}, {args.components}, seed={seed}), batch {batch}, "
              f"noise = randn * {SIGMA_MAX:g} (float64)  [{time.perf_counter() - t0:.1f} s]")
        print(format_table(table))
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "samplers.csv"), os.path.join(args.out, "samplers.png")
    write_csv(tables, csv_path)
    plot(tables, png_path)
    print(f"\nwrote {csv_path} and {png_path}")
    timing = None
    if not args.no_timing:
        timing = timing_table(args.timing_nfe, args.timing_repeats, peers=not args.no_peers)
        print("\n## per-step bookkeeping time")
        print(timing)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    return {"tables": tables, "timing": timing}


if __name__ == "__main__":
    sys.exit(main())
