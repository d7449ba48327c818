"""Sampler benchmark: accuracy vs NFE on exact Gaussian mixtures, and per-step time, beside the peers.

    .venv/bin/python benchmarks/samplers.py [--grid karras] [--out runs/bench] [--no-peers] [--help]
    .venv/bin/python benchmarks/samplers.py --overhead [--timing-repeats 31]   # part 2 only (~1 min)

The harness is unifusion.evaluation.sampler_bench (`unifusion bench samplers` runs it on ours
only); this script adds the peer adapters of benchmarks/peers.py (k-diffusion, diffusers) and, in
part 2, a bare loop: the same solver step written inline with no checks, no callback and no
progress bar, the floor that uf.sample's per-evaluation bookkeeping is measured against.
BENCHMARKS.md records the latest output.
"""
import argparse
import math
import sys

import torch
from peers import PEERS  # benchmarks/ is on sys.path when this script runs

from unifusion.evaluation.sampler_bench import (SIGMA_MAX, SIGMA_MIN, Peers, largest_steps, main, median_time,
                                                timing_table)
from unifusion.samplers import grids


def bare_loops(free, x0: torch.Tensor, nfe: int, repeats: int) -> dict:
    """Seconds per step of euler / dpmpp_2m / heun as inline loops over a precomputed Karras grid."""
    def euler(sig):
        x = x0
        for s, s_next in zip(sig[:-1], sig[1:]):
            x = torch.lerp(free(x, torch.full((x.shape[0],), s)), x, s_next / s)
        return x

    def dpmpp_2m(sig):
        x, D_prev, h_prev = x0, None, None
        for s, s_next in zip(sig[:-1], sig[1:]):
            D = free(x, torch.full((x.shape[0],), s))
            if s_next == 0:
                return D
            h = math.log(s / s_next)
            Dt = D if D_prev is None else torch.lerp(D_prev, D, 1 + h / (2 * h_prev))
            x, D_prev, h_prev = torch.lerp(Dt, x, s_next / s), D, h
        return x

    def heun(sig):
        x = x0
        for s, s_next in zip(sig[:-1], sig[1:]):
            d = (x - free(x, torch.full((x.shape[0],), s))) / s
            x_next = x + d * (s_next - s)
            if s_next > 0:
                d_next = (x_next - free(x_next, torch.full((x.shape[0],), s_next))) / s_next
                x_next = x + (d + d_next) * (0.5 * (s_next - s))
            x = x_next
        return x

    heun_n = largest_steps(lambda n: 2 * n - 1, nfe)
    rows = {}
    with torch.no_grad():
        for name, fn, n in (("euler", euler, nfe), ("dpmpp_2m", dpmpp_2m, nfe), ("heun", heun, heun_n)):
            sig = grids.make("karras", n, SIGMA_MIN, SIGMA_MAX).tolist()
            rows[name] = {"raw": median_time(lambda: fn(sig), repeats) / n}
    return rows


def with_bare(peers: Peers) -> Peers:
    """The peers' timing plus the bare loop's column, "raw"."""
    def timing(free, x0, nfe, repeats):
        rows, notes = peers.timing(free, x0, nfe, repeats)
        for name, by_lib in bare_loops(free, x0, nfe, repeats).items():
            rows.setdefault(name, {}).update(by_lib)
        return rows, notes + ["raw: the bare loop, the solver's step inline, no checks (samplers.py bare_loops)"]
    return Peers(runners=peers.runners, timing=timing)


def overhead(argv) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/samplers.py --overhead")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--timing-nfe", type=int, default=50)
    p.add_argument("--timing-repeats", type=int, default=31)
    args = p.parse_args(argv)
    print(timing_table(args.timing_nfe, args.timing_repeats, with_bare(PEERS)))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(overhead(argv) if "--overhead" in argv else main(argv, peers=with_bare(PEERS)))
