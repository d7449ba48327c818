"""Stochastic sampler steps as Gaussian policies, with their exact log-probabilities (the
sampling side of reward fine-tuning, training/finetune.py).

Every step here is one denoiser call D = D(x, s) followed by

    x' = D + s_down * eps + s_up * z,    eps = (x - D) / s  (= x itself, the unit noise, at s = inf),  z ~ N(0, I)

so  x' | x ~ N(mean, s_up^2 I),  mean = D + s_down * eps,  and

    log pi(x' | x) = -||x' - mean||^2 / (2 s_up^2) - d log s_up - (d / 2) log(2 pi)      (exact, summed over d dims)

The samplers differ only in how a step s -> s' splits into the kept noise s_down and the fresh
noise s_up (a process enters only through the grid, as everywhere in samplers/):

    ddim(eta), euler_ancestral(eta)   s_up = eta s' sqrt(1 - s'^2 / s^2)      (DDIM eq. 16; eta = 1: DDPM)
    ddpm                              eta = 1: the DDPM posterior q(x_t' | x_t, x_0 = D)
    flow_sde(a)                       s_up = s' sqrt(1 - (s'/s)^(a^2))        (Flow-GRPO's SDE, below)
    consistency                       s_down = 0, s_up = sqrt(s'^2 - floor^2)  (multistep consistency sampling)

and s_down = sqrt(s'^2 - s_up^2): the step keeps the marginal noise level exactly s' (given an exact
D), so every one of them samples the ODE's marginals. A step to s' = 0 returns D (deterministic).

Flow-GRPO (Liu et al. 2025, eq. 8) turns a flow model's ODE into the SDE of the same marginals
    dx_t = [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t dw,   sigma_t = a sqrt(t / (1 - t)).
In the sigma-domain (x = x_t / (1 - t), sigma = t / (1 - t); the same for every process) its noise
is g^2 = a^2 sigma per unit sigma and it reads
    dx = (1 + a^2 / 2) (x - D) / sigma dsigma + a sqrt(sigma) dw      (sigma decreasing).
Flow-GRPO discretises it by Euler-Maruyama in t. Here it is integrated exactly with D held fixed
over the step (the linear part is solved in closed form): (x - D) scales by (s'/s)^(1 + a^2/2) and
the added variance is s'^2 (1 - (s'/s)^(a^2)), i.e. the split above. The two agree to first order in
the step (tests/test_logprob.py); this one also steps from sigma = inf (a flow model's t = 1) and
keeps s_down^2 + s_up^2 = s'^2 on any grid. a = sqrt(2) is the DDPM posterior; a -> 0 is DDIM.

An SDE window (Flow-GRPO-Fast) makes only some steps stochastic: the others run with s_up = 0
(the DDIM / Euler step of the PF-ODE) and have no log-probability.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .ancestral import ancestral_split
from .registry import get, noise_like, register

LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------ the noise splits
def flow_sde_split(s: float, s_next: float, a: float) -> tuple[float, float]:
    """(s_down, s_up) of Flow-GRPO's SDE with noise level a, integrated exactly over s -> s' (module docstring)."""
    r = 0.0 if math.isinf(s) else s_next / s
    keep = r ** (a * a)  # (s'/s)^(a^2): the share of s'^2 that stays deterministic
    return s_next * math.sqrt(keep), s_next * math.sqrt(max(0.0, 1.0 - keep))


@register("flow_sde", order=0, stochastic=True)
def flow_sde(denoise, x, sigmas, *, generator=None, noise_level=0.7):
    """Flow-GRPO's SDE (same marginals as the PF-ODE), noise level a = noise_level, exact steps."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        D = denoise(x, s)
        if s_next == 0:
            return D
        s_down, s_up = flow_sde_split(s, s_next, noise_level)
        # keep the predicted noise (x - D)/s at level s_down, add fresh noise for the rest of s'
        x = D + (x - D) * (s_down / s) + noise_like(x, generator) * s_up
    return x


@dataclass(frozen=True)
class Policy:
    """A sampler seen as a Gaussian policy: `split(s, s')` -> (s_down, s_up) of one step."""
    sampler: str
    level: float | None  # eta (ddim, euler_ancestral), a (flow_sde), None (ddpm, consistency)
    split: Callable[[float, float], tuple[float, float]]

    @property
    def stochastic(self) -> bool:
        """Whether any step draws noise (a ddim with eta = 0 is the deterministic ODE step)."""
        return self.level is None or self.level > 0


def _consistency_split(floor: float):
    return lambda s, s_next: (0.0, math.sqrt(max(s_next * s_next - floor * floor, 0.0)))


POLICY_SAMPLERS = {  # name -> (its noise option, default, split(level) -> split(s, s'))
    "ddpm": (None, None, lambda level: lambda s, t: ancestral_split(s, t, 1.0)),
    "ddim": ("eta", 1.0, lambda level: lambda s, t: ancestral_split(s, t, level)),
    "euler_ancestral": ("eta", 1.0, lambda level: lambda s, t: ancestral_split(s, t, level)),
    "flow_sde": ("noise_level", 0.7, lambda level: lambda s, t: flow_sde_split(s, t, level)),
    "consistency": (None, None, None),
}


def policy(sampler: str, level: float | None = None, sigma_floor: float = 0.0) -> Policy:
    """The sampler `sampler` as a Gaussian policy. level: its noise option (eta of ddim and
    euler_ancestral, default 1; a of flow_sde, default 0.7); ddpm and consistency have none.
    A deterministic or an unsupported stochastic sampler is a ValueError naming the ones that work."""
    spec = get(sampler)  # an unknown name lists every sampler
    ok = ", ".join(f"{n} (--noise-level = {o})" if o else n for n, (o, _, _) in POLICY_SAMPLERS.items())
    if sampler not in POLICY_SAMPLERS:
        why = ("is deterministic: an ODE step has no log-probability" if not spec.stochastic else
               "is stochastic, but its steps are not single Gaussians of closed-form density (several denoiser "
               "calls or Langevin corrections per step)")
        raise ValueError(f"sampler {sampler!r} {why}; policy-gradient fine-tuning needs one whose every step is a "
                         f"Gaussian: {ok}")
    option, default, make = POLICY_SAMPLERS[sampler]
    if option is None:
        if level is not None:
            raise ValueError(f"sampler {sampler!r} has no noise level (ddpm is eta = 1; consistency re-noises fully); "
                             "drop --noise-level, or use ddim / flow_sde")
        if sampler == "consistency":
            return Policy(sampler, None, _consistency_split(sigma_floor))
        return Policy(sampler, None, make(None))
    level = default if level is None else float(level)
    if not (math.isfinite(level) and level >= 0):
        raise ValueError(f"--noise-level ({option} of {sampler}) must be a finite number >= 0, got {level}")
    if option == "eta" and level > 1:
        raise ValueError(f"--noise-level ({option} of {sampler}) must lie in [0, 1], got {level}")
    return Policy(sampler, level, make(level))


# ------------------------------------------------------------------ one step, batched
def _bc(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def step_mean(x: Tensor, D: Tensor, s: Tensor, s_down: Tensor) -> Tensor:
    """mean = D + s_down eps with eps = (x - D) / s, or x itself at s = inf (unit noise); per-row s, s_down (B,)."""
    s, s_down = _bc(s.to(x), x), _bc(s_down.to(x), x)
    eps = torch.where(torch.isinf(s), x, (x - D) / s)
    return D + s_down * eps


def log_normal(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2 I) summed over every dimension but the first: (B,). std: (B,) > 0."""
    d = x[0].numel()
    z2 = ((x - mean) ** 2).flatten(1).sum(1)
    std = std.to(z2)
    return -0.5 * z2 / std**2 - d * std.log() - 0.5 * d * LOG_2PI


def kl_normal(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = ||mean_p - mean_q||^2 / (2 std^2): (B,)."""
    d2 = ((mean_p - mean_q) ** 2).flatten(1).sum(1)
    return 0.5 * d2 / std.to(d2) ** 2


# ------------------------------------------------------------------ a whole trajectory
@dataclass
class Plan:
    """A rollout's grid and its steps: sigmas[i] -> sigmas[i + 1] for i < n; s_down, s_up per step
    (s_up = 0 where the step is deterministic: outside the SDE window, and the last step to 0)."""
    sigmas: list[float]
    s_down: list[float]
    s_up: list[float]

    @property
    def n(self) -> int:
        return len(self.sigmas) - 1

    @property
    def stochastic(self) -> list[int]:
        """The indices of the steps that draw noise (and have a log-probability)."""
        return [i for i, u in enumerate(self.s_up) if u > 0]


def plan(sigmas, pol: Policy, window: tuple[int, int] | None = None) -> Plan:
    """The steps of `pol` on the grid `sigmas` (decreasing, ending at 0; may start at inf). window
    (start, size): only steps start..start+size-1 draw noise (Flow-GRPO-Fast), the rest are DDIM
    (PF-ODE) steps; None: every step but the last (to 0)."""
    sig = [float(s) for s in sigmas]
    if len(sig) < 2 or sig[-1] != 0:
        raise ValueError("a rollout grid must end at 0 and hold at least one level above it")
    downs, ups = [], []
    for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        inside = window is None or window[0] <= i < window[0] + window[1]
        if s_next == 0:
            downs.append(0.0), ups.append(0.0)
        elif inside:
            d, u = pol.split(s, s_next)
            downs.append(d), ups.append(u)
        else:
            downs.append(s_next), ups.append(0.0)
    return Plan(sig, downs, ups)


@dataclass
class Rollout:
    """What a rollout leaves for the policy-gradient update.

    xs:    (n + 1, B, ...) the states, xs[0] the start (scaled noise, or unit noise at inf), xs[n] the sample
    logp:  (B, m) log pi(x_{i+1} | x_i) of the m stochastic steps plan.stochastic, under the sampling weights
    ref_mean, kl: (m, B, ...) the reference's step means and (B, m) KL(policy || reference) per stochastic step,
           when a reference denoiser was given (else None)"""
    plan: Plan
    xs: Tensor
    logp: Tensor
    ref_mean: Tensor | None = None
    kl: Tensor | None = None

    @property
    def sample(self) -> Tensor:
        return self.xs[-1]


def _call(denoiser, x: Tensor, s: float, cond: dict) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device), **cond)


@torch.no_grad()
def rollout(denoiser, x: Tensor, steps: Plan, noises: Tensor | None = None, generator=None, cond: dict | None = None,
            reference=None) -> Rollout:
    """Sample one trajectory per row of x along `steps`, recording every state and the exact
    log-probability of every stochastic step. noises: (n, B, ...) the z of each step (drawn from
    `generator` when None; pre-drawn noise makes a rollout a pure function of its draws).
    reference: a second denoiser (same signature) whose step means and KL are recorded too."""
    cond = cond or {}
    xs, logps, refs, kls = [x], [], [], []
    for i in range(steps.n):
        s, s_next, s_up = steps.sigmas[i], steps.sigmas[i + 1], steps.s_up[i]
        D = _call(denoiser, x, s, cond)
        if s_next == 0:
            x = D
        else:
            B = x.shape[0]
            sv = torch.full((B,), s, dtype=torch.float64)
            mean = step_mean(x, D, sv, torch.full((B,), steps.s_down[i], dtype=torch.float64))
            if s_up > 0:
                z = noises[i] if noises is not None else noise_like(x, generator)
                x = mean + s_up * z.to(x)
                std = torch.full((B,), s_up, dtype=torch.float64, device=x.device)
                logps.append(log_normal(x, mean, std))
                if reference is not None:
                    ref = step_mean(xs[-1], _call(reference, xs[-1], s, cond), sv,
                                    torch.full((B,), steps.s_down[i], dtype=torch.float64))
                    refs.append(ref)
                    kls.append(kl_normal(mean, ref, std))
            else:
                x = mean
        xs.append(x)
    B = x.shape[0]
    stack = (lambda v: torch.stack(v, 1)) if logps else (lambda v: x.new_zeros(B, 0))
    return Rollout(steps, torch.stack(xs), stack(logps),
                   torch.stack(refs) if refs else None, stack(kls) if reference is not None else None)


def step_logprob(denoiser, x: Tensor, x_next: Tensor, s: Tensor, s_down: Tensor, s_up: Tensor,
                 cond: dict | None = None) -> tuple[Tensor, Tensor]:
    """(log pi(x_next | x), mean) for rows that may each sit at another step: s, s_down, s_up (B,)
    per row (s_up > 0). Differentiable in the denoiser's weights: the policy-gradient update."""
    D = denoiser(x, s.to(x), **(cond or {}))
    mean = step_mean(x, D, s, s_down)
    return log_normal(x_next, mean, s_up), mean


def differentiable_rollout(denoiser, x: Tensor, steps: Plan, noises: Tensor, cond: dict | None = None,
                           grad_from: int = 0, reference=None, checkpoint: bool = False) -> tuple[Tensor, Tensor]:
    """The trajectory `rollout` draws from the same start and noises, with the steps from index
    `grad_from` on run under autograd (DRaFT-K: K = n - grad_from), so the sample is a
    differentiable function of the weights (and the reward's gradient flows back through the last
    K steps: the reparametrised step x' = mean(x) + s_up z). checkpoint: each of those denoiser
    calls keeps only its input and recomputes its activations in backward (memory of one call,
    not K). Returns (sample, kl): kl (B,) is the KL to `reference` summed over the stochastic
    steps from grad_from on (zeros without a reference), differentiable along the path too."""
    from torch.utils.checkpoint import checkpoint as remat
    cond = cond or {}
    B = x.shape[0]
    kl = x.new_zeros(B, dtype=torch.float64)

    def call(fn, xx, s):
        if checkpoint and torch.is_grad_enabled():
            return remat(_call, fn, xx, s, cond, use_reentrant=False)
        return _call(fn, xx, s, cond)

    for i in range(steps.n):
        s, s_next, s_up = steps.sigmas[i], steps.sigmas[i + 1], steps.s_up[i]
        with torch.set_grad_enabled(i >= grad_from and torch.is_grad_enabled()):
            D = call(denoiser, x, s)
            if s_next == 0:
                x = D
                continue
            sv, dv = torch.full((B,), s, dtype=torch.float64), torch.full((B,), steps.s_down[i], dtype=torch.float64)
            mean = step_mean(x, D, sv, dv)
            if s_up > 0 and reference is not None and i >= grad_from:
                ref = step_mean(x, call(reference, x, s), sv, dv)
                kl = kl + kl_normal(mean, ref, torch.full((B,), s_up, dtype=torch.float64, device=x.device))
            x = mean + s_up * noises[i].to(x) if s_up > 0 else mean
    return x, kl
