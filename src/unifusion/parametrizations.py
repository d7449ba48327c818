"""What the network F predicts, as a conversion to the denoiser D.

Every parametrization here is affine in F (EDM, Karras et al. 2022, eq. 7 and Table 1):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in * x, c_noise)

so the regression target for F is (x_0 - c_skip x) / c_out, and the F-loss equals the D-loss
||D - x_0||^2 weighted by 1 / c_out^2. In the sigma-domain, with x = x_0 + sigma n:

| name     | F predicts                         | c_skip             | c_out                        |
|----------|------------------------------------|--------------------|------------------------------|
| eps      | n                                  | 1                  | -sigma                       |
| x0       | x_0                                | 0                  | 1                            |
| v        | (n - sigma x_0) / sqrt(1+sigma^2)  | 1 / (1+sigma^2)    | -sigma / sqrt(1+sigma^2)     |
| velocity | n - x_0  (flow matching u)         | 1 / (1+sigma)      | -sigma / (1+sigma)           |
| edm      | EDM preconditioned F               | sd^2/(sigma^2+sd^2)| sigma sd / sqrt(sigma^2+sd^2)|
| consistency | a consistency function's F      | sd^2/((sigma-smin)^2+sd^2) | (sigma-smin) sd / sqrt(sigma^2+sd^2) |

v is Salimans & Ho (2022) v = alpha n - sigma_t x_0 of the VP process, written in the
sigma-domain so it is defined for every process; it equals EDM's F with sigma_data = 1 up to sign.

The network's input and noise label: EDM uses c_in = 1/sqrt(sigma^2 + sd^2), c_noise = ln(sigma)/4;
the others feed the network the process's own x_t = s(t) x and its time t, as the papers do.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .processes import Process


class Parametrization:
    """F <-> D conversion. Subclasses give c_skip and c_out; c_in/c_noise default to the process's."""

    name = "param"

    def c_skip(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_out(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_in(self, sigma: Tensor, process: Process) -> Tensor:
        return process.s_of_sigma(sigma)  # the network sees x_t = s(t) x

    def c_noise(self, sigma: Tensor, process: Process) -> Tensor:
        return process.t(sigma)

    def to_denoised(self, F: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """D = c_skip x + c_out F; sigma has shape (B,)."""
        return _bc(self.c_skip(sigma), x) * x + _bc(self.c_out(sigma), x) * F

    def from_denoised(self, D: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """The F that gives denoiser output D: the inverse of to_denoised."""
        return (D - _bc(self.c_skip(sigma), x) * x) / _bc(self.c_out(sigma), x)

    def target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """Regression target for F when x = x0 + sigma * noise."""
        return self.from_denoised(x0, x0 + _bc(sigma, x0) * noise, sigma)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) with ||F - target||^2 = lambda ||D - x0||^2."""
        return self.c_out(sigma) ** -2

    def at_infinity(self) -> tuple[float, float]:
        """(lim sigma c_skip(sigma), lim c_out(sigma)) as sigma -> inf.

        With x = sigma n, D(x, sigma) -> skip * n + out * F(n, c_noise(inf)): the limit that lets a
        flow model start at t = 1 exactly (the network input c_in x tends to n, since both
        s(t) sigma and sigma / sqrt(sigma^2 + sd^2) tend to 1)."""
        raise ValueError(f"the {self.name} parametrization has no finite denoiser at sigma = inf; "
                         "sample from a finite sigma_max instead")

    def __repr__(self):
        return f"{type(self).__name__}()"

    def kwargs(self) -> dict:
        """Constructor arguments, JSON-able (a saved model spec rebuilds it from these)."""
        return {}


def _bc(c: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-example coefficient of shape (B,) against x of shape (B, ...)."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)).to(x.dtype)


class Eps(Parametrization):
    """epsilon-prediction (Ho et al. 2020)."""

    name = "eps"

    def c_skip(self, sigma):
        return torch.ones_like(sigma)

    def c_out(self, sigma):
        return -sigma


class X0(Parametrization):
    """x_0-prediction."""

    name = "x0"

    def c_skip(self, sigma):
        return torch.zeros_like(sigma)

    def c_out(self, sigma):
        return torch.ones_like(sigma)

    def at_infinity(self):
        return 0.0, 1.0


class V(Parametrization):
    """v-prediction (Salimans & Ho 2022), sigma-domain form."""

    name = "v"

    def c_skip(self, sigma):
        return 1 / (1 + sigma**2)

    def c_out(self, sigma):
        return -sigma * (1 + sigma**2).rsqrt()

    def at_infinity(self):
        return 0.0, -1.0  # sigma / (1 + sigma^2) -> 0, -sigma / sqrt(1 + sigma^2) -> -1


class Velocity(Parametrization):
    """Flow-matching velocity u = n - x_0 (Lipman et al. 2023, Liu et al. 2023)."""

    name = "velocity"

    def c_skip(self, sigma):
        return 1 / (1 + sigma)

    def c_out(self, sigma):
        return -sigma / (1 + sigma)

    def at_infinity(self):
        return 1.0, -1.0  # D -> n - F: the flow velocity u = n - x_0 read at t = 1


class EDMPrecond(Parametrization):
    """EDM preconditioning (Karras et al. 2022, Table 1)."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data * (sigma**2 + self.sigma_data**2).rsqrt()

    def c_in(self, sigma, process):
        return (sigma**2 + self.sigma_data**2).rsqrt()

    def c_noise(self, sigma, process):
        return sigma.log() / 4

    def at_infinity(self):
        raise ValueError("EDM preconditioning feeds ln(sigma)/4 to the network, which is infinite at "
                         "sigma = inf; sample from a finite sigma_max instead")

    def __repr__(self):
        return f"EDMPrecond(sigma_data={self.sigma_data})"

    def kwargs(self) -> dict:
        return {"sigma_data": self.sigma_data}


class ConsistencyPrecond(EDMPrecond):
    """A consistency function's preconditioning (Song et al. 2023, Appendix C).

    EDM's c_in and c_noise, with c_skip and c_out shifted so that the boundary condition
    f(x, sigma_min) = x holds exactly, whatever the network returns:
        c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),  c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2).
    Its 1/c_out^2 loss weight is infinite at sigma_min: the consistency objectives (models/fewstep.py)
    compare denoiser outputs instead."""

    name = "consistency"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data)
        if not sigma_min > 0:
            raise ValueError(f"the consistency parametrization needs sigma_min > 0, got {sigma_min}")
        self.sigma_min = sigma_min

    def c_skip(self, sigma):
        return self.sigma_data**2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data**2)

    def c_out(self, sigma):
        return (sigma - self.sigma_min) * self.sigma_data * (sigma**2 + self.sigma_data**2).rsqrt()

    def at_infinity(self):
        raise ValueError("the consistency parametrization feeds ln(sigma)/4 to the network, which is infinite at "
                         "sigma = inf; sample from a finite sigma_max instead")

    def __repr__(self):
        return f"ConsistencyPrecond(sigma_data={self.sigma_data}, sigma_min={self.sigma_min})"

    def kwargs(self) -> dict:
        return {"sigma_data": self.sigma_data, "sigma_min": self.sigma_min}


PARAMETRIZATIONS = {"eps": Eps, "x0": X0, "v": V, "velocity": Velocity, "edm": EDMPrecond,
                    "consistency": ConsistencyPrecond}


def get(name: str, **kwargs) -> Parametrization:
    """Parametrization by name: one of PARAMETRIZATIONS."""
    if name not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {name!r}; choose one of {sorted(PARAMETRIZATIONS)}")
    return PARAMETRIZATIONS[name](**kwargs)


def limit_at_infinity(param: Parametrization, process: Process) -> tuple[float, float, float]:
    """(skip, out, c_noise at sigma = inf): D(n, inf) = skip n + out F(n, c_noise_inf). ValueError
    (naming the fix) when the parametrization has no finite limit or the process no finite time there."""
    skip, out = param.at_infinity()
    t_top = float(param.c_noise(torch.full((1,), math.inf, dtype=torch.float64), process))
    if not math.isfinite(t_top):
        raise ValueError(f"{process!r} has no finite time at sigma = inf; sample from a finite sigma_max")
    return skip, out, t_top


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: a constant, no graph break
def _limit(param: Parametrization, process: Process) -> tuple[float, float, float] | None:
    """limit_at_infinity, or None where there is none; computed once per (param, process) pair and kept
    on the parametrization (its float() reads a CPU tensor)."""
    cached = param.__dict__.get("_limit_at_inf")
    if cached is None or cached[0] is not process:
        try:
            limit = limit_at_infinity(param, process)
        except ValueError:
            limit = None
        cached = param.__dict__["_limit_at_inf"] = (process, limit)
    return cached[1]


def denoise(net, process: Process, param: Parametrization, x: Tensor, sigma: Tensor, **net_kwargs) -> Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, **net_kwargs) in the sigma-domain.

    sigma has shape (B,) (or is a scalar). A row at sigma = inf holds the unit noise direction
    n = lim x / sigma, and its D is the limit of Parametrization.at_infinity (the first sampling
    step from pure noise; the rows of one batch may mix inf and finite sigma).

    No value is read on the host (DESIGN §4.14: a read is a device sync per training step and per
    sampler call): the rows at inf are selected on the device with torch.where, which leaves every
    finite row's arithmetic exactly as without it. Where (param, process) has no finite limit at
    inf (EDM / eps preconditioning, a process with no finite time there), a row at sigma = inf
    comes out NaN, which the samplers report (limit_at_infinity raises the explanation up front).
    """
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    c_in, c_noise = param.c_in(sigma, process), param.c_noise(sigma, process).to(x.dtype)
    c_skip, c_out = param.c_skip(sigma), param.c_out(sigma)
    inf = torch.isinf(sigma)
    limit = _limit(param, process)
    if limit is None:
        c_out = torch.where(inf, math.nan, c_out)
    else:  # at inf the network sees n itself at the top time, and D = skip n + out F
        skip, out, t_top = limit
        c_in, c_noise = torch.where(inf, 1.0, c_in), torch.where(inf, t_top, c_noise)
        c_skip, c_out = torch.where(inf, skip, c_skip), torch.where(inf, out, c_out)
    F = net(_bc(c_in, x) * x, c_noise, **net_kwargs)
    return _bc(c_skip, x) * x + _bc(c_out, x) * F.to(x.dtype)  # Parametrization.to_denoised


class Denoiser(nn.Module):
    """Wraps a network F(x_in, c_noise, **kw) into D(x, sigma, **kw) in the sigma-domain."""

    def __init__(self, net: nn.Module, process: Process, param: Parametrization):
        super().__init__()
        self.net, self.process, self.param = net, process, param

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return denoise(self.net, self.process, self.param, x, sigma, **cond)
