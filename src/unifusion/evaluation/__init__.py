"""Evaluation: exact oracles, sampler benchmarks, plots. Calls samplers; never trains."""
