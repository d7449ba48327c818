"""Noise-level densities p(sigma) for training: each draws a (B,) float64 tensor of sigmas.

| name         | density                                            | paper                        |
|--------------|----------------------------------------------------|------------------------------|
| lognormal    | ln sigma ~ N(p_mean, p_std^2)                      | EDM (Karras et al. 2022)     |
| uniform_t    | t ~ U(t_min, t_max) of a process, sigma = sigma(t) | score SDE, flow matching     |
| logit_normal | flow t = sigmoid(m + s z), shifted, sigma = t/(1-t)| SD3 (Esser et al. 2024)      |
| discrete     | timestep i ~ U{0..T-1}, sigma = sigma_i            | DDPM (Ho et al. 2020)        |

`make(name, process, **kwargs)` builds one by name (what a config names).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from .processes import DDPM, Flow, Process, shift_time

# flow matching's t = 1 is sigma = inf: UniformT's default top on the flow process stays this far inside
FLOW_T_MARGIN = 1e-4


class NoiseDensity:
    """p(sigma): draws a (B,) tensor of noise levels."""

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        raise NotImplementedError


class LogNormal(NoiseDensity):
    """EDM: ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"LogNormal needs p_std > 0, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def sample(self, batch, generator=None, device=None):
        z = torch.randn(batch, generator=generator, dtype=torch.float64, device=device)
        return torch.exp(self.p_mean + self.p_std * z)


class UniformT(NoiseDensity):
    """t ~ U(t_min, t_max) of a process, mapped to sigma (score SDE, DDPM-continuous, flow matching)."""

    def __init__(self, process: Process, t_min: float | None = None, t_max: float | None = None):
        self.process = process
        self.t_min = process.t_min if t_min is None else t_min
        if t_max is None:  # on the flow process stay strictly inside t < 1, where sigma is finite
            t_max = min(process.t_max, 1 - FLOW_T_MARGIN) if isinstance(process, Flow) else process.t_max
        self.t_max = t_max
        if not self.t_min < self.t_max:
            raise ValueError(f"UniformT needs t_min < t_max, got {self.t_min}, {self.t_max}")
        top = float(process.sigma(torch.tensor(self.t_max, dtype=torch.float64)))
        if not math.isfinite(top):
            raise ValueError(f"UniformT: t_max={self.t_max} gives sigma = {top} on {process!r}; keep t_max below it "
                             f"(the default on Flow is 1 - {FLOW_T_MARGIN})")

    def sample(self, batch, generator=None, device=None):
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
        return self.process.sigma(self.t_min + (self.t_max - self.t_min) * u)


class LogitNormalT(NoiseDensity):
    """SD3 (Esser et al. 2024, eq. 19 and 23): flow time t = sigmoid(m + s z), then the shift
    t' = shift_time(t, shift); sigma = t' / (1 - t')."""

    def __init__(self, m: float = 0.0, s: float = 1.0, shift: float = 1.0):
        if not (s > 0 and shift > 0):
            raise ValueError(f"LogitNormalT needs s > 0 and shift > 0, got s={s}, shift={shift}")
        self.m, self.s, self.shift = m, s, shift

    def sample(self, batch, generator=None, device=None):
        z = torch.randn(batch, generator=generator, dtype=torch.float64, device=device)
        t = shift_time(torch.sigmoid(self.m + self.s * z), self.shift)
        t = t.clamp(1e-5, 1 - 1e-5)  # keep sigma finite and positive
        return t / (1 - t)


class DiscreteUniform(NoiseDensity):
    """DDPM: timestep i ~ U{0, ..., T-1}, sigma = sigma_i."""

    def __init__(self, process: DDPM):
        if not isinstance(process, DDPM):
            raise ValueError(f"DiscreteUniform needs a DDPM process, got {process!r}")
        self.process = process

    def sample(self, batch, generator=None, device=None):
        i = torch.randint(0, self.process.T, (batch,), generator=generator, device=device)
        return self.process.sigmas.to(device)[i]


DENSITIES = {"lognormal": LogNormal, "uniform_t": UniformT, "logit_normal": LogitNormalT, "discrete": DiscreteUniform}


def make(name: str, process: Process, **kwargs) -> NoiseDensity:
    """The density `name` (one of DENSITIES) for `process`, with its own keyword arguments:
    lognormal p_mean, p_std; uniform_t t_min, t_max; logit_normal m, s, shift; discrete none."""
    if name not in DENSITIES:
        raise ValueError(f"unknown noise density {name!r}; choose one of {sorted(DENSITIES)}")
    cls = DENSITIES[name]
    params = list(inspect.signature(cls).parameters)
    valid = [k for k in params if k != "process"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"noise density {name!r} has no argument(s) {unknown}; its arguments are {valid or 'none'}")
    # the process is an argument only of the densities defined through it
    return cls(process, **kwargs) if "process" in params else cls(**kwargs)
