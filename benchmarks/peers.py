"""Peer adapters for the sampler benchmark: k-diffusion and diffusers on the same exact denoiser.

They live outside the package (DESIGN.md: peer adapters never inside it). benchmarks/samplers.py
hands `PEERS` to unifusion.evaluation.sampler_bench, which runs them beside unifusion's samplers.

k-diffusion: only `k_diffusion/sampling.py` is loaded (its package __init__ imports torchvision),
on the same Karras rho=7 grid. diffusers: schedulers whose models see exactly their input/output
conventions (see `_edm_model` and `_vp_model`). Both are optional: a missing one is reported and
skipped. `make bench` installs k-diffusion 0.1.1.post1 (--no-deps) and diffusers 0.42.1.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import torch

from unifusion.evaluation.sampler_bench import (SIGMA_MAX, SIGMA_MIN, Peers, Runner, full_sigma, median_time)
from unifusion.samplers import grids
from unifusion.samplers.registry import largest_steps

PEER_GRIDS = ("karras", "loglinear")  # the grids diffusers' schedulers can build themselves


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
        return grids.make(grid, n, SIGMA_MIN, SIGMA_MAX)
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
    D = denoiser(x, full_sigma(x, sigma))
    return (D - c_skip * x) / c_out


def _vp_model(denoiser, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Epsilon prediction for a VP scheduler: x_t = alpha x with alpha = 1 / sqrt(1 + sigma^2),
    sigma_t = sigma alpha (the scheduler's _sigma_to_alpha_sigma_t), eps = (x_t - alpha D) / sigma_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    x = x_t / alpha
    D = denoiser(x, full_sigma(x, sigma))
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
            return denoiser(x / alpha, full_sigma(x, sigma))
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


# --------------------------------------------------------------------------- composed for the harness
def runners(grid: str) -> tuple[list[Runner], list[str]]:
    """Every installed peer's runners on `grid`, and notes on what they run (or that they are missing)."""
    out, notes = [], []
    try:
        out += kdiffusion_runners(grid)
        notes.append("kd:* = k-diffusion 0.1.1 sampling.py; " + (
            "grid get_sigmas_karras(n, 0.002, 80, rho=7) + 0" if grid == "karras" else f"grid unifusion {grid!r} + 0"))
    except ImportError:
        notes.append("k-diffusion not installed (make bench installs it)")
    try:
        hf, hf_notes = diffusers_runners(grid)
        out += hf
        notes += hf_notes
    except ImportError:
        notes.append("diffusers not installed (make bench installs it)")
    return out, notes


def timing(free, x0: torch.Tensor, nfe: int, repeats: int) -> tuple[dict, list[str]]:
    """Seconds per step of the peers' euler / dpmpp_2m / heun / unipc loops with the near-free denoiser."""
    rows, notes = {}, []
    heun_n = largest_steps(lambda n: 2 * n - 1, nfe)
    try:
        kd = load_k_diffusion()
        with torch.no_grad():
            for name, fname, n in (("euler", "sample_euler", nfe), ("dpmpp_2m", "sample_dpmpp_2m", nfe),
                                   ("heun", "sample_heun", heun_n)):
                sig = kd.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)
                f = getattr(kd, fname)
                rows.setdefault(name, {})["kd"] = median_time(lambda: f(free, x0, sig, disable=True), repeats) / n
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
                rows.setdefault(name, {})["hf"] = median_time(lambda: loop(make), repeats) / nfe
    except ImportError:
        notes.append("diffusers not installed (make bench installs it)")
    timed = ("peers timed: kd sample_euler / sample_dpmpp_2m / sample_heun; hf EDMEulerScheduler, "
             "EDMDPMSolverMultistepScheduler(order 2), UniPCMultistepScheduler(order 2, bh2) step loops "
             "(scale_model_input + step)")
    return rows, [timed] + notes


PEERS = Peers(runners=runners, timing=timing)
