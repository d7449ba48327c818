"""Exact-score oracles for tests: Gaussian mixtures with full covariances (closed forms in
unifusion.evaluation.mixture), and helpers that count denoiser calls."""
from __future__ import annotations

import torch

from unifusion.evaluation.mixture import GaussianMixture


def mixture_2d(classes: int | None = None) -> GaussianMixture:
    """4 well-separated anisotropic components in 2-D."""
    return GaussianMixture.random(2, 4, seed=0, classes=classes)


def mixture_nd(dim: int = 8) -> GaussianMixture:
    return GaussianMixture.random(dim, 5, seed=3)


class Counting:
    """Wraps a denoiser and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.fn(x, sigma, **cond)


def noise(batch: int, dim: int, sigma_max: float = 80.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g, dtype=torch.float64) * sigma_max


def central_differences(loss, z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The gradient of the scalar loss(z) at z by central differences, one coordinate at a time."""
    fd = torch.zeros_like(z)
    with torch.no_grad():
        for i in range(len(z)):
            e = torch.zeros_like(z)
            e[i] = eps
            fd[i] = (loss(z + e) - loss(z - e)) / (2 * eps)
    return fd
