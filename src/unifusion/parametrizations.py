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

v is Salimans & Ho (2022) v = alpha n - sigma_t x_0 of the VP process, written in the
sigma-domain so it is defined for every process; it equals EDM's F with sigma_data = 1 up to sign.

The network's input and noise label: EDM uses c_in = 1/sqrt(sigma^2 + sd^2), c_noise = ln(sigma)/4;
the others feed the network the process's own x_t = s(t) x and its time t, as the papers do.
"""
from __future__ import annotations

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

    def __repr__(self):
        return f"{type(self).__name__}()"


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


class V(Parametrization):
    """v-prediction (Salimans & Ho 2022), sigma-domain form."""

    name = "v"

    def c_skip(self, sigma):
        return 1 / (1 + sigma**2)

    def c_out(self, sigma):
        return -sigma * (1 + sigma**2).rsqrt()


class Velocity(Parametrization):
    """Flow-matching velocity u = n - x_0 (Lipman et al. 2023, Liu et al. 2023)."""

    name = "velocity"

    def c_skip(self, sigma):
        return 1 / (1 + sigma)

    def c_out(self, sigma):
        return -sigma / (1 + sigma)


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

    def __repr__(self):
        return f"EDMPrecond(sigma_data={self.sigma_data})"


PARAMETRIZATIONS = {"eps": Eps, "x0": X0, "v": V, "velocity": Velocity, "edm": EDMPrecond}


def get(name: str, **kwargs) -> Parametrization:
    """Parametrization by name: one of PARAMETRIZATIONS."""
    if name not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {name!r}; choose one of {sorted(PARAMETRIZATIONS)}")
    return PARAMETRIZATIONS[name](**kwargs)


class Denoiser(nn.Module):
    """Wraps a network F(x_in, c_noise, **cond) into D(x, sigma, **cond) in the sigma-domain."""

    def __init__(self, net: nn.Module, process: Process, param: Parametrization):
        super().__init__()
        self.net, self.process, self.param = net, process, param

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        c_in = _bc(self.param.c_in(sigma, self.process), x)
        c_noise = self.param.c_noise(sigma, self.process).to(x.dtype)
        F = self.net(c_in * x, c_noise, **cond)
        return self.param.to_denoised(F.to(x.dtype), x, sigma)

