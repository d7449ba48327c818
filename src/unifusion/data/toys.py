"""2-D toy distributions, drawn directly in the data range [-1, 1].

Scaling is fixed per distribution, never fitted to a sample set: each toy is drawn in the
usual coordinates below and divided by a constant, so its bounded part lies within 0.9 of
the origin and the same distribution always lands on the same coordinates. Gaussian noise
tails that would leave [-1, 1] are clamped onto the border; with these widths that is more
than 6 noise standard deviations away (probability < 1e-8 per point).

    gmm           8 Gaussians, means 0.7 (cos 2 pi k/8, sin 2 pi k/8), std 0.05; label k
    moons         sklearn's two moons, (cos t, sin t) and (1 - cos t, 0.5 - sin t), t ~ U[0, pi],
                  noise std 0.05, then ((x, y) - (0.5, 0.25)) / 1.8
    checkerboard  uniform on the 8 dark squares of a 4x4 board on [-2, 2]^2, then / 2 (no noise)
    swissroll     (t cos t, t sin t), t ~ U[1.5 pi, 4.5 pi], noise std 0.3, then / 16
    rings         radius uniform over {0.2, 0.4, 0.6, 0.8}, angle uniform, radial noise std 0.025

Every draw uses its own torch.Generator seeded with `seed`, so (name, n, seed) fixes the output.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

_f64 = torch.float64


def _gmm(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    k = torch.randint(0, 8, (n,), generator=g)
    angle = 2 * math.pi * k.to(_f64) / 8
    means = 0.7 * torch.stack([angle.cos(), angle.sin()], 1)
    return means + 0.05 * torch.randn(n, 2, generator=g, dtype=_f64), k


def _moons(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    t = math.pi * torch.rand(n, generator=g, dtype=_f64)
    lower = torch.rand(n, generator=g) < 0.5  # which moon
    x = torch.where(lower, 1 - t.cos(), t.cos())
    y = torch.where(lower, 0.5 - t.sin(), t.sin())
    xy = torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=g, dtype=_f64)
    return (xy - torch.tensor([0.5, 0.25], dtype=_f64)) / 1.8, None


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    # column x1 in [-2, 2); row chosen so that floor(x1) + floor(x2) is even (the dark squares)
    x1 = 4 * torch.rand(n, generator=g, dtype=_f64) - 2
    x2 = torch.rand(n, generator=g, dtype=_f64) - 2 * torch.randint(0, 2, (n,), generator=g).to(_f64)
    x2 = x2 + torch.floor(x1).remainder(2)
    return torch.stack([x1, x2], 1) / 2, None


def _swissroll(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=_f64))
    xy = torch.stack([t * t.cos(), t * t.sin()], 1) + 0.3 * torch.randn(n, 2, generator=g, dtype=_f64)
    return xy / 16, None


def _rings(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    radius = 0.2 * (1 + torch.randint(0, 4, (n,), generator=g)).to(_f64)
    radius = radius + 0.025 * torch.randn(n, generator=g, dtype=_f64)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=_f64)
    return radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1), None


# name -> (draw(n, generator) -> (x float64 (n, 2), labels int64 (n,) or None), number of classes)
TOYS: dict[str, tuple[Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]], int]] = {
    "gmm": (_gmm, 8),
    "moons": (_moons, 0),
    "checkerboard": (_checkerboard, 0),
    "swissroll": (_swissroll, 0),
    "rings": (_rings, 0),
}


def names() -> list[str]:
    return list(TOYS)


def num_classes(name: str) -> int:
    """Number of labels `make(name, ..., labels=True)` returns (0: unlabelled)."""
    return _get(name)[1]


def _get(name: str):
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of {names()}")
    return TOYS[name]


def make(name: str, n: int = 10_000, seed: int = 0, labels: bool = False):
    """n points (n, 2) float32 in [-1, 1]; with labels=True returns (x, y), y int64 (n,) or None."""
    draw, _ = _get(name)
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    x, y = draw(int(n), torch.Generator().manual_seed(int(seed)))
    x = x.clamp(-1, 1).to(torch.float32)
    return (x, y) if labels else x
