"""Training losses: E_{sigma ~ p(sigma)} lambda(sigma) || D(x_0 + sigma n, sigma) - x_0 ||^2.

The noise-level density p(sigma) and the weighting lambda(sigma) are chosen independently of the
parametrization. Writing the loss on F instead, ||F - target||^2 = ||D - x_0||^2 / c_out^2, so the
classic losses are instances:

| loss                         | p(sigma)                               | lambda(sigma)       |
|------------------------------|----------------------------------------|---------------------|
| DDPM eps (Ho et al. 2020)    | uniform over the T discrete levels     | 1/sigma^2 (eps)     |
| v (Salimans & Ho 2022)       | the process's t-density                | (1+sigma^2)/sigma^2 |
| flow matching (Lipman 2023)  | t ~ U(0,1) (or logit-normal, SD3)      | (1+sigma)^2/sigma^2 |
| EDM (Karras et al. 2022)     | ln sigma ~ N(P_mean, P_std^2)          | 1/c_out^2 (EDM)     |

i.e. lambda = parametrization.loss_weight(sigma) gives the "native" loss of each parametrization.
The densities p(sigma) live in densities.py; their names are re-exported here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .densities import DiscreteUniform, LogitNormalT, LogNormal, NoiseDensity, UniformT  # noqa: F401 (re-exported)
from .parametrizations import Parametrization, _bc


def weighting(name: str, param: Parametrization, sigma_data: float = 0.5):
    """lambda(sigma) by name: 'native' (the parametrization's own F-loss, 1/c_out^2), 'edm'
    (EDM's 1/c_out^2 with sigma_data, whatever the parametrization), 'snr' (1/sigma^2: the eps-loss),
    'min_snr5' (Hang et al. 2023: the eps-loss times min(SNR, 5)/SNR with SNR = 1/sigma^2, which is
    min(1/sigma^2, 5)), 'uniform' (1: the plain D-loss)."""
    if name == "native":
        return param.loss_weight
    if name == "edm":
        return lambda s: (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    if name == "snr":
        return lambda s: s**-2
    if name == "min_snr5":
        return lambda s: torch.clamp(s**-2, max=5.0)
    if name == "uniform":
        return lambda s: torch.ones_like(s)
    raise ValueError(f"unknown weighting {name!r}; choose native, edm, snr, min_snr5 or uniform")


def denoising_loss(denoiser, x0: Tensor, sigma: Tensor, weight, noise: Tensor | None = None,
                   generator: torch.Generator | None = None, **cond) -> Tensor:
    """Per-example lambda(sigma) * mean over dims of (D(x0 + sigma n, sigma) - x0)^2, shape (B,)."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    sigma = sigma.to(x0.dtype)
    D = denoiser(x0 + _bc(sigma, x0) * noise, sigma, **cond)
    return weight(sigma).to(x0.dtype) * (D - x0).pow(2).flatten(1).mean(1)
