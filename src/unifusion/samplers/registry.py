"""Sampler registry: name -> solver function, its NFE cost per grid, and what it promises.

A solver is a plain function  solver(denoise, x, sigmas, *, generator=None, **options) -> x
where `denoise(x, sigma: float)` returns D(x, sigma) and `sigmas` is a decreasing list of floats
that usually ends with 0 (then the last step returns a denoised sample).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Spec:
    name: str
    fn: Callable
    cost: Callable[[int, dict], int]  # denoiser calls for `steps` intervals ending at 0, given options
    order: int  # global order of accuracy on the PF-ODE; 0 for stochastic samplers
    stochastic: bool
    adaptive: bool  # chooses its own steps; takes the budget as max_nfe
    defaults: dict = field(default_factory=dict)
    doc: str = ""

    def steps_for(self, nfe: int, options: dict | None = None) -> int:
        """The most grid steps whose cost fits in `nfe` denoiser calls (at least 1)."""
        opts = {**self.defaults, **(options or {})}
        return largest_steps(lambda n: self.cost(n, opts), nfe)


def largest_steps(cost: Callable[[int], int], nfe: int) -> int:
    """The most steps n >= 1 with cost(n) <= nfe (cost increasing in n)."""
    n = 1
    while cost(n + 1) <= nfe:
        n += 1
    return n


_REGISTRY: dict[str, Spec] = {}


def register(name: str, *, cost=lambda n, o: n, order: int, stochastic: bool = False, adaptive: bool = False):
    def wrap(fn):
        # the solver's keyword options and their defaults are read off its signature
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.kind is p.KEYWORD_ONLY and k != "generator"}
        _REGISTRY[name] = Spec(name, fn, cost, order, stochastic, adaptive, defaults, (fn.__doc__ or "").strip())
        return fn
    return wrap


def names() -> list[str]:
    """Every sampler name accepted by unifusion.sample."""
    return sorted(_REGISTRY)


def get(name: str) -> Spec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; choose one of {names()}")
    return _REGISTRY[name]


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class NonFiniteError(FloatingPointError, ValueError):
    """A denoiser output or a solver state holds NaN or inf (a ValueError too, so callers that report
    bad input in one line report this the same way)."""
