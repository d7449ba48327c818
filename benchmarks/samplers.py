"""Sampler benchmark: accuracy vs NFE on exact Gaussian mixtures, and per-step time.

    .venv/bin/python benchmarks/samplers.py [--grid karras] [--out runs/bench] [--help]

The logic lives in unifusion.evaluation.sampler_bench (also `unifusion bench samplers`);
BENCHMARKS.md records the latest output.
"""
import sys

from unifusion.evaluation.sampler_bench import main

if __name__ == "__main__":
    sys.exit(main())
