"""Sampler benchmark: accuracy against the exact PF-ODE solution, and per-step bookkeeping time.

Part 1 (accuracy vs NFE). On exact Gaussian mixtures (evaluation/mixture.py) every deterministic
sampler starts from the same noise at sigma_max = 80 and runs to sigma = 0 with a denoiser-call
budget N; its error is the RMSE against `GaussianMixture.pf_ode` (DOP853 at 1e-12) from the same
noise. The denoiser is wrapped in a call counter, so the table reports what each sampler really
spent and a sampler that overspends fails the run.

Part 2 (bookkeeping time). With a near-free denoiser (x * 0.5) on one 4x64x64 float32 latent and
one thread, the wall time per step is the solver machinery itself.

This module runs unifusion's samplers only. Other libraries (k-diffusion, diffusers) plug in as a
`Peers` from outside the package: benchmarks/peers.py, composed by benchmarks/samplers.py (`make bench`).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import samplers as uf_samplers
from ..samplers.registry import largest_steps
from .mixture import GaussianMixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DEFAULT_NFES = (5, 8, 10, 15, 20, 50)
# dim -> (mixture seed, batch); other dims use seed = dim, batch 128
PROBLEMS = {2: (0, 256), 64: (1, 128)}
PEERS_HINT = "peers (k-diffusion, diffusers) run from benchmarks/samplers.py (`make bench` installs them)"


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
    name: str  # 'uf:...', or a peer's prefix ('kd:...', 'hf:...')
    run: Callable


@dataclass
class Peers:
    """Other libraries' samplers, supplied from outside the package (benchmarks/peers.py).

    runners(grid) -> (runners, notes): their samplers on the grid (an empty list where they lack it).
    timing(denoiser, x0, nfe, repeats) -> ({sampler: {library: seconds per step}}, notes), for the
    samplers of part 2 (TIMED), each solving from x0 with nfe calls of the near-free denoiser."""
    runners: Callable[[str], tuple[list[Runner], list[str]]]
    timing: Callable[[Callable, torch.Tensor, int, int], tuple[dict, list[str]]]


def full_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """sigma as the (B,) tensor a denoiser takes."""
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
    libs = list(dict.fromkeys(n.split(":")[0] for t in tables for n in t.rows if not n.startswith("uf:")))
    marker = {"uf": "o", **{lib: m for lib, m in zip(libs, "s^Dv<>p")}}
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
TIMED = ("euler", "dpmpp_2m", "heun", "unipc")  # the samplers part 2 times


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_table(nfe: int = 50, repeats: int = 7, peers: Peers | None = None, shape=(1, 4, 64, 64)) -> str:
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
    rows = {name: {} for name in TIMED}
    for name in TIMED:
        rows[name]["uf"] = median_time(lambda: uf_samplers.sample(free, x0, name, nfe=nfe), repeats) / steps[name]
    notes = []
    if peers is not None:
        theirs, notes = peers.timing(free, x0, nfe, repeats)
        for name, by_lib in theirs.items():
            rows[name].update(by_lib)

    def us(v):
        return f"{v * 1e6:.1f}" if v is not None else "-"

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b is not None else "-"

    libs = ["uf"] + list(dict.fromkeys(lib for r in rows.values() for lib in r if lib != "uf"))
    cols = [f"{lib} µs/step" for lib in libs] + [f"uf/{lib}" for lib in libs[1:]]
    lines = [f"per-step time, near-free denoiser (x * 0.5), one {'x'.join(map(str, shape))} float32 latent, "
             f"torch.set_num_threads(1), NFE {nfe} (heun: {heun_n} steps), median of {repeats}",
             "sampler".ljust(10) + "".join(c.rjust(12) for c in cols)]
    for name, r in rows.items():
        cells = [us(r.get(lib)) for lib in libs] + [ratio(r.get("uf"), r.get(lib)) for lib in libs[1:]]
        lines.append(name.ljust(10) + "".join(c.rjust(12) for c in cells))
    lines += notes if peers is not None else [PEERS_HINT]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def build_runners(grid: str, peers: Peers | None = None) -> tuple[list[Runner], list[str]]:
    """unifusion's runners, then the peers' (if given), and the notes that describe them."""
    runners, notes = unifusion_runners(grid), []
    if peers is None:
        return runners, [PEERS_HINT]
    theirs, notes = peers.runners(grid)
    return runners + theirs, notes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="unifusion bench samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=list(PROBLEMS), help="mixture dimensions (default 2 64)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES), help="denoiser-call budgets")
    p.add_argument("--grid", default="karras", choices=["karras", "loglinear", "linear", "sd3"],
                   help="sigma grid for every sampler (diffusers' schedulers only build karras and loglinear)")
    p.add_argument("--batch", type=int, default=None, help="samples per problem (default 256 in 2-D, 128 in 64-D)")
    p.add_argument("--components", type=int, default=8, help="mixture components")
    p.add_argument("--check-nfe", type=int, default=200, help="extra NFE that checks convergence (0: off)")
    p.add_argument("--no-peers", action="store_true", help="only unifusion's samplers (always so without peers)")
    p.add_argument("--no-timing", action="store_true", help="skip part 2 (per-step time)")
    p.add_argument("--timing-nfe", type=int, default=50)
    p.add_argument("--timing-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads for part 1 (part 2 always uses 1)")
    p.add_argument("--out", default="runs/bench", help="directory for samplers.csv and samplers.png")
    return p.parse_args(argv)


def main(argv=None, peers: Peers | None = None) -> int:
    """`unifusion bench samplers` (ours only) / benchmarks/samplers.py (with peers): run, print the
    tables; exit status 0."""
    run(argv, peers)
    return 0


def run(argv=None, peers: Peers | None = None) -> dict:
    """Run the benchmark, print its tables; returns {'tables': [AccuracyTable], 'timing': str | None}."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, None if args.no_peers else peers)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, peers: Peers | None) -> dict:
    t_start = time.perf_counter()
    runners, notes = build_runners(args.grid, peers)
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
        timing = timing_table(args.timing_nfe, args.timing_repeats, peers)
        print("\n## per-step bookkeeping time")
        print(timing)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    return {"tables": tables, "timing": timing}


if __name__ == "__main__":
    sys.exit(main())
