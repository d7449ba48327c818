"""Guidance as denoiser wrappers: the result is again a denoiser, so every sampler takes it."""
from __future__ import annotations

import torch

from .parametrizations import _bc


def classifier_free(denoiser, scale: float, uncond: dict, batched: bool = True):
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale * (D_c - D_u).

    uncond: keyword overrides that make the call unconditional, e.g. {"y": the null class} (models.conditioning.ClassConditioning.null).
    scale = 1 is the conditional denoiser (one call), scale = 0 the unconditional one.
    batched: evaluate both in one call of batch 2B when every conditioning value is a tensor
    with the batch as its first axis (faster on accelerators, same result).
    """
    def guided(x, sigma, **cond):
        if scale == 1:
            return denoiser(x, sigma, **cond)
        ucond = {**cond, **uncond}
        if scale == 0:
            return denoiser(x, sigma, **ucond)
        same_keys = cond.keys() == ucond.keys()
        if batched and same_keys and all(isinstance(v, torch.Tensor) and isinstance(ucond[k], torch.Tensor)
                                         and v.shape[:1] == x.shape[:1] == ucond[k].shape[:1]
                                         for k, v in cond.items()):
            both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            **{k: torch.cat([cond[k], ucond[k]]) for k in cond})
            D_c, D_u = both.chunk(2)
        else:
            D_c, D_u = denoiser(x, sigma, **cond), denoiser(x, sigma, **ucond)
        return D_u + scale * (D_c - D_u)
    return guided


def classifier(denoiser, log_prob, scale: float = 1.0):
    """Classifier guidance (Dhariwal & Nichol 2021): score + scale * grad_x log p(y | x, sigma),
    i.e. D + sigma^2 * scale * grad_x log p(y | x, sigma).

    log_prob(x, sigma, **cond) -> (B,) log-probabilities of the target labels given in cond.
    """
    def guided(x, sigma, **cond):
        D = denoiser(x, sigma, **cond)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob(xg, sigma, **cond).sum(), xg)
        return D + _bc(sigma.to(x.dtype) ** 2 * scale, x) * grad
    return guided
