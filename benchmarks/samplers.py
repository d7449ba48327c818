"""Sampler benchmark: accuracy vs NFE on exact Gaussian mixtures, and per-step time, beside the peers.

    .venv/bin/python benchmarks/samplers.py [--grid karras] [--out runs/bench] [--no-peers] [--help]

The harness is unifusion.evaluation.sampler_bench (`unifusion bench samplers` runs it on ours
only); this script adds the peer adapters of benchmarks/peers.py (k-diffusion, diffusers).
BENCHMARKS.md records the latest output.
"""
import sys

from peers import PEERS  # benchmarks/ is on sys.path when this script runs

from unifusion.evaluation.sampler_bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], peers=PEERS))
