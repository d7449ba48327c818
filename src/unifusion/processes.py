"""Noise processes x_t = s(t) * (x_0 + sigma(t) * n)  (EDM, Karras et al. 2022, Table 1).

A process is only bookkeeping between its own time t and the noise level sigma: s(t), sigma(t),
their t-derivatives, and t(sigma). Samplers work in the sigma-domain x = x_t / s(t) and never
see a process; a process contributes grids (see samplers/grids.py) and the network's inputs
(see parametrizations.Denoiser).

All methods take and return tensors (float64 recommended for t close to the ends).
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch
from torch import Tensor


class Process:
    """Base class. Subclasses set t_min/t_max and implement s, sigma, ds, dsigma and t."""

    name = "process"
    t_min = 0.0
    t_max = 1.0
    native_grid = "uniform_t"  # the discretization its paper samples with (samplers/grids.py)
    # a new model's default grid (`--grid auto`): the most accurate for this process's range with dpmpp_2m on
    # held-out exact mixtures, chosen by benchmarks/defaults.py (BENCHMARKS.md, "Default samplers and grids")
    default_grid = "native"
    # a new model's default sampler and NFE (`--sampler auto`) on that grid, chosen by the same benchmark on the
    # mixtures and trained toys; the model's spec records them (training["sampling"])
    default_sampling = ("dpmpp_2m", 20)

    def s(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def ds(self, t: Tensor) -> Tensor:
        """ds/dt."""
        raise NotImplementedError

    def dsigma(self, t: Tensor) -> Tensor:
        """dsigma/dt."""
        raise NotImplementedError

    def t(self, sigma: Tensor) -> Tensor:
        """Inverse of sigma(t)."""
        raise NotImplementedError

    def sigma_range(self) -> tuple[float, float]:
        """(sigma(t_min), sigma(t_max)): the noise levels this process covers."""
        t = torch.tensor([self.t_min, self.t_max], dtype=torch.float64)
        lo, hi = self.sigma(t).tolist()
        return lo, hi

    def s_of_sigma(self, sigma: Tensor) -> Tensor:
        return self.s(self.t(sigma))

    def kwargs(self) -> dict:
        """The constructor's arguments as a JSON-able dict: get(self.name, **self.kwargs()) rebuilds it."""
        return {k: getattr(self, k) for k in _arguments(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs().items())
        return f"{type(self).__name__}({args})"


def _arguments(cls) -> list[str]:
    """The names a process class's constructor takes (each is stored under the same attribute name)."""
    return [k for k, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _finite(**values) -> None:
    """ValueError unless every value is a finite real number."""
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{k} must be a finite number, got {v!r}")


def _vp_s(sigma: Tensor) -> Tensor:
    # every variance-preserving process has s^2 (1 + sigma^2) = 1
    return (1 + sigma**2).rsqrt()


class VE(Process):
    """Variance exploding / SMLD (Song & Ermon 2019; Song et al. 2021 eq. 30): geometric sigma, s = 1."""

    name = "ve"
    default_grid = "tuned"
    default_sampling = ("unipc", 20)

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        _finite(sigma_min=sigma_min, sigma_max=sigma_max)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def s(self, t):
        return torch.ones_like(t)

    def ds(self, t):
        return torch.zeros_like(t)

    def sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def dsigma(self, t):
        return self.sigma(t) * self._log_ratio

    def t(self, sigma):
        return torch.log(sigma / self.sigma_min) / self._log_ratio


class VP(Process):
    """Variance preserving score SDE (Song et al. 2021): abar(t) = exp(-beta_d t^2 / 2 - beta_min t)."""

    name = "vp"
    default_grid = "tuned"
    default_sampling = ("dpmpp_3m", 20)

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, t_min: float = 1e-3):
        _finite(beta_min=beta_min, beta_d=beta_d, t_min=t_min)
        if beta_min < 0 or beta_d < 0 or beta_min + beta_d <= 0:
            raise ValueError(f"{type(self).__name__} needs beta_min >= 0 and beta_d >= 0, not both 0; "
                             f"got beta_min={beta_min}, beta_d={beta_d} (Song et al. use 0.1 and 19.9)")
        if not 0 <= t_min < self.t_max:
            raise ValueError(f"{type(self).__name__} needs 0 <= t_min < t_max = {self.t_max}, got t_min={t_min}")
        self.beta_min, self.beta_d, self.t_min = float(beta_min), float(beta_d), float(t_min)

    def _g(self, t):  # -log abar(t)
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def s(self, t):
        return torch.exp(-0.5 * self._g(t))

    def ds(self, t):
        return -0.5 * (self.beta_d * t + self.beta_min) * self.s(t)

    def sigma(self, t):
        return torch.sqrt(torch.expm1(self._g(t)))

    def dsigma(self, t):
        g = self._g(t)
        return torch.exp(g) * (self.beta_d * t + self.beta_min) / (2 * torch.sqrt(torch.expm1(g)))

    def t(self, sigma):
        # solve beta_d/2 t^2 + beta_min t = log(1 + sigma^2) for t >= 0
        c = torch.log1p(sigma**2)
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * c) - self.beta_min) / self.beta_d


class SubVP(VP):
    """Sub-VP score SDE (Song et al. 2021 eq. 29): mean sqrt(abar), std 1 - abar."""

    name = "subvp"
    default_grid = "tuned"
    default_sampling = ("dpmpp_3m", 20)

    def sigma(self, t):
        return 2 * torch.sinh(0.5 * self._g(t))  # (1 - abar) / sqrt(abar)

    def dsigma(self, t):
        return torch.cosh(0.5 * self._g(t)) * (self.beta_d * t + self.beta_min)

    def t(self, sigma):
        g = 2 * torch.asinh(0.5 * sigma)
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * g) - self.beta_min) / self.beta_d


def ddpm_betas(schedule: str = "linear", T: int = 1000) -> Tensor:
    """DDPM noise schedules: linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021 eq. 17)."""
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        i = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown DDPM schedule {schedule!r}; choose 'linear' or 'cosine'")


class DDPM(Process):
    """Discrete DDPM: sigma_i = sqrt((1 - abar_i) / abar_i) at timesteps i = 0..T-1.

    Between integer timesteps log sigma is interpolated linearly, so t is a continuous index and
    a network trained on integer t can be queried anywhere (as k-diffusion's DiscreteSchedule).
    """

    name = "ddpm"
    default_grid = "tuned"
    default_sampling = ("dpmpp_3m", 20)
    native_grid = "ddpm"

    def __init__(self, schedule: str = "linear", T: int = 1000):
        if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 2:
            raise ValueError(f"DDPM needs an integer number of timesteps T >= 2, got T={T!r}")
        self.schedule, self.T = schedule, int(T)
        abar = torch.cumprod(1 - ddpm_betas(schedule, self.T), 0)
        self.sigmas = torch.sqrt((1 - abar) / abar)  # increasing in i
        self.log_sigmas = self.sigmas.log()
        self.t_min, self.t_max = 0.0, float(T - 1)

    def _locate(self, t):
        t = t.to(torch.float64).clamp(0, self.T - 1)
        i = t.floor().long().clamp(max=self.T - 2)
        return i, t - i

    def sigma(self, t):
        i, w = self._locate(t)
        ls = self.log_sigmas.to(t.device)
        return torch.exp(ls[i] + w * (ls[i + 1] - ls[i])).to(t.dtype)

    def dsigma(self, t):
        i, _ = self._locate(t)
        ls = self.log_sigmas.to(t.device)
        return (self.sigma(t) * (ls[i + 1] - ls[i]).to(t.dtype))

    def s(self, t):
        return _vp_s(self.sigma(t))

    def ds(self, t):
        sig = self.sigma(t)
        return -sig * self.dsigma(t) * (1 + sig**2) ** -1.5

    def t(self, sigma):
        ls = self.log_sigmas.to(sigma.device)
        lsig = sigma.to(torch.float64).log().clamp(ls[0], ls[-1])
        i = (torch.searchsorted(ls, lsig.contiguous()) - 1).clamp(0, self.T - 2)
        w = (lsig - ls[i]) / (ls[i + 1] - ls[i])
        return (i + w).to(sigma.dtype)


class EDM(Process):
    """EDM (Karras et al. 2022): s = 1, sigma = t."""

    name = "edm"
    default_grid = "tuned"
    default_sampling = ("unipc", 20)
    native_grid = "karras"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        _finite(sigma_min=sigma_min, sigma_max=sigma_max)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def s(self, t):
        return torch.ones_like(t)

    def ds(self, t):
        return torch.zeros_like(t)

    def sigma(self, t):
        return t

    def dsigma(self, t):
        return torch.ones_like(t)

    def t(self, sigma):
        return sigma


class Flow(Process):
    """Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): x_t = (1-t) x_0 + t n."""

    name = "flow"
    default_sampling = ("ipndm", 20)

    def __init__(self, t_max: float = 1.0):
        _finite(t_max=t_max)
        if not 0 < t_max <= 1:
            raise ValueError(f"Flow needs 0 < t_max <= 1 (t = 1 is pure noise, sigma = inf), got t_max={t_max}")
        self.t_max = float(t_max)

    def s(self, t):
        return 1 - t

    def ds(self, t):
        return -torch.ones_like(t)

    def sigma(self, t):
        return t / (1 - t)

    def dsigma(self, t):
        return (1 - t) ** -2

    def t(self, sigma):
        # sigma = inf is pure noise, t = 1 exactly (inf / (1 + inf) would be nan)
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def shift_time(t, shift: float):
    """SD3's resolution shift of flow time (Esser et al. 2024, eq. 23): t' = shift t / (1 + (shift - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t, shift: float):
    """Inverse of shift_time: from t' (1 + (shift - 1) t) = shift t, t = t' / (shift - (shift - 1) t')."""
    return t / (shift - (shift - 1) * t)


PROCESSES = {"ve": VE, "vp": VP, "subvp": SubVP, "ddpm": DDPM, "edm": EDM, "flow": Flow}


def get(name: str, **kwargs) -> Process:
    """Process by name (one of PROCESSES) with its constructor's keyword arguments."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; choose one of {sorted(PROCESSES)}")
    valid = _arguments(PROCESSES[name])
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"process {name!r} has no argument(s) {unknown}; its arguments are {valid}")
    return PROCESSES[name](**kwargs)
