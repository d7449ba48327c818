"""Straightness of a flow model's ODE paths (Liu et al. 2022, rectified flow, Sec. 2.2 / Def. 2.2):

    S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt

for the paths Z_t of the probability-flow ODE from noise Z_1 = n (t = 1) to data Z_0 (t = 0)
under the flow process x_t = (1 - t) x_0 + t n. S = 0 exactly when every path is a straight line
walked at constant speed, which one Euler step then follows without error; reflow lowers it.

With the denoiser D in the sigma-domain (sigma = t / (1 - t), x_hat = x_t / (1 - t)) the velocity
is v(x_t, t) = (x_t - D(x_hat, sigma)) / t, and at t = 1 (sigma = inf) v = n - D(n, inf). The
integral is taken with `steps` Euler steps on a uniform t grid (the paths themselves are the
Euler solution, so this is S of that discretised flow; it converges as steps grows).
"""
from __future__ import annotations

import torch
from torch import Tensor


def straightness(denoise, noise: Tensor, steps: int = 100, cond: dict | None = None) -> dict:
    """S(Z) from the unit noises `noise` (B, ...): {"S": E int ||(Z1 - Z0) - v||^2 dt (summed
    over dimensions), "S_per_dim", "S_relative": S / E||Z1 - Z0||^2, "samples": Z_0}."""
    if steps < 2:
        raise ValueError(f"straightness needs steps >= 2, got {steps}")
    cond = cond or {}
    B = noise.shape[0]
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    vs = []
    with torch.no_grad():
        for i in range(steps):
            t = float(ts[i])
            if t == 1.0:
                v = x - denoise(x, torch.full((B,), float("inf"), device=x.device), **cond)
            else:
                sigma = torch.full((B,), t / (1 - t), device=x.device)
                v = (x - denoise(x / (1 - t), sigma, **cond)) / t
            vs.append(v)
            x = x - (t - float(ts[i + 1])) * v
    disp = noise - x  # Z_1 - Z_0
    dev = torch.stack([(disp - v).flatten(1).pow(2).sum(1) for v in vs])  # (steps, B)
    S = float(dev.mean(0).mean())  # uniform grid: the mean over steps is the integral over t
    norm = float(disp.flatten(1).pow(2).sum(1).mean())
    return {"S": S, "S_per_dim": S / noise[0].numel(), "S_relative": S / max(norm, 1e-30), "samples": x}


def model_straightness(model, n: int = 1000, steps: int = 100, seed: int = 0) -> dict:
    """straightness() of a flow-process model from seeds seed..seed+n-1 (the model's default
    conditions); other processes are refused (S is defined for the flow process's time)."""
    from ..models.base import seed_noise
    spec = model.spec
    if getattr(model, "one_pass", False) or not spec.process or spec.process.get("name") != "flow":
        raise ValueError("straightness is defined for flow-process models (rectified flow / flow matching); this "
                         f"is a {spec.family} model" + (f" with the {spec.process['name']} process" if spec.process
                                                        else ""))
    seeds = list(range(seed, seed + n))
    noise = seed_noise(spec.shape, seeds)
    cond = model.cond.default(seeds) if spec.num_classes else None
    return straightness(model.denoise, noise.to(model.device), steps,
                        {k: v.to(model.device) for k, v in (cond or {}).items()})
