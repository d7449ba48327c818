"""Greedy search of a few-step sampler's intermediate noise levels (Song et al. 2023, "Consistency
Models", Sec. 6: "we pick the intermediate time steps ... with a greedy algorithm, one at a time,
each by searching the level that minimises FID given the earlier ones").

For a sampler that makes one denoiser call per level (euler, consistency) and a budget of k
calls, the levels are s_0 > s_1 > ... > s_{k-1} > 0 with s_0 the model's own first level (its
sigma_max: inf for a flow, 80 for a consistency model). The search keeps s_0 and picks

    s_i = argmin_{low < s < min(high, s_{i-1})}  metric(samples drawn on s_0, ..., s_{i-1}, s)

for i = 1 .. k-1 in turn (the samples of the truncated sampler: i + 1 calls, then 0): a sweep of
`points` log-spaced candidates, then `refine` golden-section steps in log sigma inside the
bracket of the best one. The metric is FID against the model's training data in the evaluation
feature space (digits classifier for digits) of n samples from seeds first_seed.. (by default
SEARCH_SEED = 1,000,000 on, disjoint from the seeds 0..n-1 that `unifusion eval` and the
benchmarks report on, so a reported FID is not the one the levels were picked on). Any other
metric(x, cond) -> float (lower is better) can stand in.

The result is a `Calibration` (samplers/calibrate.py) of method "greedy level search": the grid
for (sampler, nfe) that `store` puts in a model folder's spec.calibrated, where sampling and
`unifusion eval` take it as the model's default for that pair. `unifusion eval --search-levels`
runs it from the command line.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..samplers.calibrate import Calibration
from . import features as fx
from . import metrics

SAMPLERS = ("euler", "consistency")  # one denoiser call per level: k levels = k calls
SEARCH_SEED = 1_000_000  # the search's first seed; eval and the benchmarks report on seeds 0..n-1
INF_HIGH = 100.0  # the top candidate below a first level sigma = inf (flow time t ~ 0.99)
MAX_NFE = 10
METHOD = "greedy level search"
GOLDEN = (math.sqrt(5) - 1) / 2


def _check_nfe(nfe) -> None:
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"the level search needs NFE >= 2 (it picks the levels between the first one and 0; at NFE "
                         f"1 there is only the first), got {nfe!r}")
    if nfe > MAX_NFE:
        raise ValueError(f"the level search is for few-step budgets: NFE <= {MAX_NFE}, got {nfe}")


def greedy_levels(score: Callable[[list[float]], float], first: float, nfe: int, low: float, high: float,
                  points: int = 9, refine: int = 6) -> tuple[list[float], list[dict]]:
    """The levels [first, s_1, ..., s_{nfe-1}] picked one at a time (module docstring): s_i minimises
    score([first, ..., s_{i-1}, s]) over low <= s < min(high, s_{i-1}) (a log-spaced sweep of
    `points`, then `refine` golden-section evaluations in log s around the best). Returns the levels and
    every trial {"level": i, "sigma": s, "score": value}."""
    _check_nfe(nfe)
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"the candidate levels need 0 < low < high < inf, got low={low}, high={high}")
    if not low < first:
        raise ValueError(f"the first level {first} must lie above the lowest candidate {low}")
    if points < 2 or refine < 0:
        raise ValueError(f"the search needs points >= 2 and refine >= 0, got points={points}, refine={refine}")
    levels, trials = [float(first)], []
    for i in range(1, nfe):
        top = min(high, levels[-1])
        below = top == levels[-1]  # the previous level itself is no candidate (levels strictly decrease)
        if not low < top:
            raise ValueError(f"level {i}: no candidate left between low={low} and the level above, {levels[-1]}; "
                             "lower the lowest candidate or ask for fewer calls")
        seen: dict[float, float] = {}

        def f(u: float, i=i, seen=seen) -> float:
            s = math.exp(u)
            if s not in seen:
                seen[s] = float(score(levels + [s]))
                trials.append({"level": i, "sigma": s, "score": seen[s]})
            return seen[s]
        us = np.linspace(math.log(low), math.log(top), points + below)[:points].tolist()
        values = [f(u) for u in us]
        j = int(np.nanargmin(values)) if not all(map(math.isnan, values)) else 0
        a = us[max(j - 1, 0)]
        b = us[j + 1] if j + 1 < len(us) else math.log(top)
        # golden section on [a, b], the bracket of the best sweep point: `refine` evaluations inside it
        # (never at b, which may be the level above)
        if refine:
            c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
            fc = f(c)
            fd = f(d) if refine > 1 else math.inf
            for _ in range(refine - 2):
                if fc <= fd:
                    b, d, fd = d, c, fc
                    c = b - GOLDEN * (b - a)
                    fc = f(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + GOLDEN * (b - a)
                    fd = f(d)
        finite = {s: v for s, v in seen.items() if not math.isnan(v)}
        if not finite:
            raise ValueError(f"level {i}: every candidate scored NaN; the model's samples are not finite")
        levels.append(min(finite, key=finite.get))
    return levels, trials


# ------------------------------------------------------------------------------ on a model
def fid_metric(ref) -> Callable:
    """metric(x, cond) = FID of samples x against the reference's training statistics, in its
    feature space (evaluation.evaluate.reference)."""
    def metric(x, cond=None) -> float:
        mu, cov = metrics.feature_stats(fx.extract(ref.extractor, x))
        return metrics.frechet_distance(mu, cov, ref.stats.mu, ref.stats.cov)
    metric.name = f"FID ({ref.extractor.name} features)"
    return metric


def check_model(model, sampler: str, nfe: int) -> None:
    """One ValueError for what cannot be searched: a model without noise levels, a sampler with more
    than one call per level, a budget below 2 or above MAX_NFE."""
    family = getattr(getattr(model, "spec", None), "family", type(model).__name__)
    if getattr(model, "one_pass", False) or not callable(getattr(model, "denoise", None)):
        raise ValueError(f"a {family} model has no noise levels to search: give a diffusion or flow model or a "
                         "few-step student (distill, progressive, cd, ict)")
    if sampler not in SAMPLERS:
        raise ValueError(f"the level search needs a sampler with one denoiser call per level ({' or '.join(SAMPLERS)}), "
                         f"not {sampler!r}; pass --sampler euler (or consistency)")
    _check_nfe(nfe)


def search_levels(model, nfe: int, metric: Callable | None = None, ref=None, sampler: str | None = None,
                  n: int = 1000, first_seed: int = SEARCH_SEED, low: float | None = None, high: float | None = None,
                  points: int = 9, refine: int = 6, batch_size: int = 500, progress: bool = False) -> Calibration:
    """The greedy level search on a model (module docstring). metric(x, cond) -> float (lower is
    better), default FID against `ref` (an evaluation.evaluate.Reference); sampler: default the
    model's own (a few-step student's), which must be one of SAMPLERS; low / high: the candidate
    range (default: the model's sigma_min, and its sigma_max or INF_HIGH below a first level inf).
    Returns a Calibration whose `reference` records the metric, the seeds, the score of the
    searched levels and of the model's own grid at this NFE, and every trial."""
    own = model.spec.sampling_defaults()[0]
    sampler = sampler or own
    check_model(model, sampler, nfe)
    if metric is None:
        if ref is None:
            raise ValueError("give the level search a metric or a reference to score FID against")
        metric = fid_metric(ref)
    if n < 4:
        raise ValueError(f"the level search scores n >= 4 samples per candidate, got n={n}")
    lo, hi = model.spec.sigma_range()
    low = lo if low is None else float(low)
    high = (INF_HIGH if math.isinf(hi) else hi) if high is None else float(high)
    seeds = range(first_seed, first_seed + n)
    options = model.sampler_options(sampler) if hasattr(model, "sampler_options") else {}

    def draw(grid):
        with torch.no_grad():
            return model.sample(seeds=seeds, sampler=sampler, nfe=len(grid) - 1 if isinstance(grid, torch.Tensor)
                                else nfe, grid=grid, batch_size=batch_size, return_cond=True)

    def score(levels: list[float]) -> float:
        x, cond = draw(torch.tensor(levels + [0.0], dtype=torch.float64))
        value = float(metric(x, cond))
        if progress:
            print(f"  levels {', '.join(f'{s:.4g}' for s in levels)}: {value:.4f}", flush=True)
        return value

    t0 = time.perf_counter()
    levels, trials = greedy_levels(score, hi, nfe, low, high, points, refine)
    seconds = time.perf_counter() - t0
    try:  # the model's own grid at this NFE, for comparison (a distilled student's may have fewer levels)
        default = float(metric(*draw(model.spec.grid["name"])))
    except ValueError:
        default = None
    best = next(t["score"] for t in reversed(trials) if t["sigma"] == levels[-1] and t["level"] == nfe - 1)
    sigmas = torch.tensor(levels + [0.0], dtype=torch.float64)
    return Calibration(sampler=sampler, nfe=nfe, sigmas=sigmas, sigma_min=lo, sigma_max=hi, options=dict(options),
                       seconds={"fit": seconds, "total": time.perf_counter() - t0}, n_ref=n, method=METHOD,
                       evaluations=len(trials),
                       reference={"metric": getattr(metric, "name", getattr(metric, "__name__", "metric")),
                                  "seeds": [first_seed, first_seed + n - 1], "score": best,
                                  "default_grid": model.spec.grid["name"], "default_score": default,
                                  "candidates": [low, high], "points": points, "refine": refine,
                                  "weights": getattr(model, "info", {}).get("weights"), "trials": trials})


def summary(cal: Calibration) -> str:
    """One line: the searched levels, and the metric against the model's own grid."""
    r = cal.reference
    default = "-" if r.get("default_score") is None else f"{r['default_score']:.4f}"
    return (f"{cal.sampler} at NFE {cal.nfe}: levels {', '.join(f'{s:.4g}' for s in cal.sigmas[:-1].tolist())} "
            f"({r['metric']} {r['score']:.4f} on seeds {r['seeds'][0]}..{r['seeds'][1]}; the model's own grid "
            f"{r['default_grid']}: {default}; {cal.evaluations} evaluations, {cal.seconds['fit']:.1f} s)")


def is_search(cal) -> bool:
    return isinstance(cal, Calibration) and cal.method == METHOD


def model_folder(path) -> Path:
    """The model folder a path names (itself, or a finished run's <run>/model), where `store` writes."""
    from ..models import io
    folder = Path(path)
    folder = folder / "model" if not (folder / io.SPEC_FILE).is_file() else folder
    if not (folder / io.SPEC_FILE).is_file():
        raise ValueError(f"the searched levels are stored in a model folder: give a model folder or a finished run "
                         f"(with <run>/model), not {path}")
    return folder


def store(folder, cal: Calibration) -> Path:
    """Put the searched grid into the spec of the model folder: its default for (sampler, nfe)."""
    from ..models import io
    from ..models.spec import calibration_key
    folder = model_folder(folder)
    spec = io.read_spec(folder, "the model folder")
    spec.calibrated[calibration_key(cal.sampler, cal.nfe)] = cal.to_dict()
    spec.validate()
    return io.save_spec(folder, spec)
