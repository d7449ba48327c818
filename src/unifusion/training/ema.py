"""Exponential moving average of the weights, with the half-life measured in training samples.

Half-life (EDM2, Karras et al. 2024; EDM training_loop.py): after the network has seen
``half_life_samples`` training samples, the weight of an old snapshot in the average has
halved. One update with a batch of B samples therefore uses

    beta = 0.5 ** (B / half_life),   ema <- beta * ema + (1 - beta) * theta

so the decay does not depend on the batch size. Optional warm-up (EDM's ``ema_rampup_ratio``):
with ``warmup_ratio > 0`` the effective half-life is ``min(half_life, warmup_ratio *
samples_seen)``, counted before the current batch, so early averages forget the random
initialisation quickly (the first update copies the weights).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

SAMPLES_SEEN_KEY = "__samples_seen__"


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (tied weights once)."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


def _float_pairs(shadow: dict[str, Tensor], current: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The floating shadows and the model's tensors of the same names as float32 on their devices."""
    avgs = [t for t in shadow.values() if t.is_floating_point()]
    thetas = [current[n].detach().to(t.device, torch.float32) for n, t in shadow.items() if t.is_floating_point()]
    return avgs, thetas


def _lerp_(avgs: list[Tensor], thetas: list[Tensor], weight: float) -> None:
    """avg.lerp_(theta, weight) for every pair, in one foreach launch (the same values as per tensor)."""
    if avgs:
        torch._foreach_lerp_(avgs, thetas, weight)


def _masked_lerp_(avgs: list[Tensor], thetas: list[Tensor], weight: Tensor) -> None:
    """avg += weight * (theta - avg) with a device scalar weight, in three foreach launches (a tensor
    weight makes _foreach_lerp_ read it on the host). Within rounding of the lerp (which fuses the
    multiply-add); weight 0 leaves avg exactly as it was."""
    if avgs:
        d = torch._foreach_sub(thetas, avgs)
        torch._foreach_mul_(d, weight)
        torch._foreach_add_(avgs, d)


class EMA:
    """A float32 shadow copy of a model's parameters and floating buffers (others are copied).

    `update` folds the weights in with one foreach launch per group. Given `ok`, a 0-dim bool tensor
    on the device (False: the step's optimizer update was skipped), it blends with the device weight
    ok * (1 - beta) instead, so a skipped step leaves the average exactly as it was without a host
    read; the skipped samples are taken off `samples_seen` when it is next read (one host read)."""

    def __init__(self, model: nn.Module, half_life_samples: float, warmup_ratio: float = 0.0):
        if not half_life_samples > 0:
            raise ValueError(f"half_life_samples must be > 0, got {half_life_samples}")
        if not warmup_ratio >= 0:
            raise ValueError(f"warmup_ratio must be >= 0, got {warmup_ratio}")
        self.half_life = float(half_life_samples)
        self.warmup_ratio = float(warmup_ratio)
        self.samples_seen = 0.0
        with torch.no_grad():
            self.shadow = {name: (t.detach().float() if t.is_floating_point() else t.detach()).clone()
                           for name, t in _named_tensors(model).items()}

    def beta(self, batch_size: int) -> float:
        """Decay for the next update of batch_size samples (see the module docstring)."""
        half_life = self.half_life
        if self.warmup_ratio > 0:
            half_life = min(half_life, self.warmup_ratio * self.samples_seen)
        if half_life <= 0:
            return 0.0
        return 0.5 ** (batch_size / half_life)

    @property
    def samples_seen(self) -> float:
        """Samples of the updates taken (skipped ones excluded)."""
        if self._skipped is not None:  # masked updates since the last read
            self._seen -= float(self._skipped)
            self._skipped = None
        return self._seen

    @samples_seen.setter
    def samples_seen(self, value: float) -> None:
        self._seen, self._skipped = float(value), None

    def _weight(self, batch_size: int, ok: Tensor) -> Tensor:
        """ok * (1 - beta) as a float32 device scalar, without a host read."""
        if self.warmup_ratio > 0 and self._skipped is not None:  # beta from the device count
            half_life = torch.clamp((self._seen - self._skipped) * self.warmup_ratio, max=self.half_life)
            w = 1 - torch.where(half_life > 0, 0.5 ** (batch_size / half_life), 0.0)
        else:
            w = 1.0 - self.beta(batch_size)
        return (ok * w).float()

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, ok: Tensor | None = None) -> None:
        """Fold the model's current weights in, after a step on batch_size samples (`ok`: see the class)."""
        current = _named_tensors(model)
        if current.keys() != self.shadow.keys():
            raise ValueError("model does not match the EMA: parameter/buffer names differ")
        avgs, thetas = _float_pairs(self.shadow, current)
        if ok is None:
            _lerp_(avgs, thetas, 1.0 - self.beta(batch_size))
        else:
            _masked_lerp_(avgs, thetas, self._weight(batch_size, ok))
        for name, ema in self.shadow.items():
            if not ema.is_floating_point():
                theta = current[name].detach().to(ema.device)
                ema.copy_(theta if ok is None else torch.where(ok, theta, ema))
        self._seen += batch_size
        if ok is not None:
            skipped = (~ok).double() * batch_size
            self._skipped = skipped if self._skipped is None else self._skipped + skipped

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into the model (cast to its dtypes)."""
        current = _named_tensors(model)
        for name, ema in self.shadow.items():
            current[name].copy_(ema)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped(model): sample(...)`` runs with the EMA weights, then restores."""
        with torch.no_grad():
            backup = {name: t.detach().clone() for name, t in _named_tensors(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                current = _named_tensors(model)
                for name, t in backup.items():
                    current[name].copy_(t)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors only (safetensors-ready); samples_seen travels as a float64 scalar."""
        out = dict(self.shadow)
        out[SAMPLES_SEEN_KEY] = torch.tensor(self.samples_seen, dtype=torch.float64)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        names = set(state) - {SAMPLES_SEEN_KEY}
        if names != set(self.shadow) or SAMPLES_SEEN_KEY not in state:
            missing = sorted(set(self.shadow) - names) + ([SAMPLES_SEEN_KEY] if SAMPLES_SEEN_KEY not in state else [])
            raise ValueError(f"EMA state does not match the model: missing {missing}, "
                             f"unexpected {sorted(names - set(self.shadow))}")
        for name, ema in self.shadow.items():
            ema.copy_(state[name])
        self.samples_seen = float(state[SAMPLES_SEEN_KEY])


# ------------------------------------------------------------------------------ post-hoc EMA
# Karras et al. 2024 (EDM2), Sec. 3 and App. C, written from the paper's equations. A power-function
# EMA with exponent gamma averages the weights seen up to step t with the profile
#     p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),  0 <= tau <= t,
# whose standard deviation relative to t is
#     sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
# Training tracks two such averages (update k: beta_k = (1 - 1/k)^(gamma + 1)) and saves both every
# K steps. Any other sigma_rel at a time T is then a linear combination of the snapshots: the
# coefficients minimise the L2 distance between the profiles, with closed-form inner products
#     <p_(t1,g1), p_(t2,g2)> = (g1 + 1)(g2 + 1) min(t1, t2)^(g1 + g2 + 1) / ((g1 + g2 + 1) t1^(g1 + 1) t2^(g2 + 1)).
POSTHOC_PREFIX = "posthoc"


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of a power-function EMA with this relative std (0 < sigma_rel < 0.2887):
    the real root of sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1 with gamma > 0."""
    import numpy as np
    s2 = float(sigma_rel) ** 2
    if not 0 < sigma_rel < math.sqrt(1 / 12):
        raise ValueError(f"a power-function EMA has a relative std in (0, {math.sqrt(1 / 12):.4f}) (gamma > 0), "
                         f"got {sigma_rel}")
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    return max(real)


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _profile_dot(t1, g1, t2, g2):
    """<p_(t1,g1), p_(t2,g2)> (broadcasting numpy arrays)."""
    import numpy as np
    t1, g1, t2, g2 = (np.asarray(v, dtype=np.float64) for v in (t1, g1, t2, g2))
    tm = np.minimum(t1, t2)
    # in logs: t^(g + 1) overflows for long runs
    log = (np.log(g1 + 1) + np.log(g2 + 1) + (g1 + g2 + 1) * np.log(tm) - np.log(g1 + g2 + 1)
           - (g1 + 1) * np.log(t1) - (g2 + 1) * np.log(t2))
    return np.exp(log)


def posthoc_coefficients(snap_t, snap_gamma, target_t: float, target_gamma: float) -> tuple[list[float], float]:
    """Least-squares coefficients x of the snapshots (times snap_t, exponents snap_gamma) whose
    combined profile is nearest to p_(target_t, target_gamma), and the relative L2 error of that
    fit, ||sum x_i p_i - p_target|| / ||p_target|| (0 when the target is a snapshot's own profile)."""
    import numpy as np
    t, g = np.asarray(snap_t, dtype=np.float64), np.asarray(snap_gamma, dtype=np.float64)
    A = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _profile_dot(t, g, target_t, target_gamma)
    x = np.linalg.lstsq(A, b, rcond=1e-13)[0]
    norm2 = float(_profile_dot(target_t, target_gamma, target_t, target_gamma))
    err2 = max(norm2 - 2 * float(x @ b) + float(x @ A @ x), 0.0)
    return [float(v) for v in x], math.sqrt(err2 / norm2)


class PowerEMA:
    """Power-function EMAs of a model's floating tensors, one per exponent (float32 shadows),
    updated once per optimiser step; `snapshot()` returns every profile's weights for saving."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...] = (0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.steps = 0
        with torch.no_grad():
            base = {n: t.detach().float().clone() for n, t in _named_tensors(model).items() if t.is_floating_point()}
        self.shadows = [{n: t.clone() for n, t in base.items()} for _ in self.gammas]

    @property
    def steps(self) -> int:
        """Updates taken (skipped ones excluded); after masked updates, reading it is one host read."""
        if self._skipped is not None:
            self._steps -= int(self._skipped)
            self._skipped = None
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps, self._skipped = int(value), None

    @torch.no_grad()
    def update(self, model: nn.Module, ok: Tensor | None = None) -> None:
        """Foreach launches per profile, not per tensor; `ok` (a 0-dim device bool, False for a skipped
        step) as in EMA.update: then beta comes from the device count of the updates taken, no host read."""
        _, thetas = _float_pairs(self.shadows[0], _named_tensors(model))  # the profiles share the names
        self._steps += 1
        if ok is not None:
            skipped = (~ok).double()
            self._skipped = skipped if self._skipped is None else self._skipped + skipped
        for gamma, shadow in zip(self.gammas, self.shadows):
            avgs = list(shadow.values())
            if self._skipped is None:  # every update taken: beta on the host
                beta = (1 - 1 / self._steps) ** (gamma + 1)  # the first update copies the weights
                _lerp_(avgs, thetas, 1.0 - beta)
            else:  # clamped: while no update was taken yet, ok is False and w is 0 anyway
                taken = torch.clamp(self._steps - self._skipped, min=1)
                w = 1 - (1 - 1 / taken) ** (gamma + 1)
                _masked_lerp_(avgs, thetas, (w if ok is None else ok * w).float())

    def snapshot(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors {'<i>/<name>'} of every profile and metadata {step, gammas, sigma_rels} (strings)."""
        tensors = {f"{i}/{name}": t for i, shadow in enumerate(self.shadows) for name, t in shadow.items()}
        meta = {"step": str(self.steps), "gammas": ",".join(repr(g) for g in self.gammas),
                "sigma_rels": ",".join(repr(s) for s in self.sigma_rels)}
        return tensors, meta

    def state_dict(self) -> dict[str, Tensor]:
        tensors, _ = self.snapshot()
        tensors[SAMPLES_SEEN_KEY] = torch.tensor(float(self.steps), dtype=torch.float64)
        return tensors

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = set(self.snapshot()[0])
        if set(state) - {SAMPLES_SEEN_KEY} != expected:
            raise ValueError("post-hoc EMA state does not match the model or its --posthoc-stds")
        for i, shadow in enumerate(self.shadows):
            for name, t in shadow.items():
                t.copy_(state[f"{i}/{name}"])
        self.steps = int(state[SAMPLES_SEEN_KEY])


def read_snapshots(folder) -> list[tuple[int, tuple[float, ...], dict[str, Tensor]]]:
    """The snapshots in a run's posthoc/ folder: (step, gammas, tensors), by step."""
    from pathlib import Path

    from ..safeio import read_safetensors
    out = []
    for p in sorted(Path(folder).glob("step-*.safetensors")):
        tensors, meta = read_safetensors(p, with_metadata=True)
        out.append((int(meta["step"]), tuple(float(g) for g in meta["gammas"].split(",")), tensors))
    return out


def reconstruct(snapshots, sigma_rel: float, at_step: int | None = None,
                max_error: float = 0.05) -> tuple[dict[str, Tensor], dict]:
    """The weights of a power-function EMA with relative std `sigma_rel` at `at_step` (default: the
    last snapshot), as the least-squares combination of the snapshots taken up to then. Raises a
    ValueError when the profile fit's relative L2 error exceeds `max_error` (a length the tracked
    profiles cannot express). Returns (weights, info)."""
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots: train with --posthoc-every K (e.g. 100) to record them")
    at = snapshots[-1][0] if at_step is None else int(at_step)
    used = [s for s in snapshots if s[0] <= at]
    if not used:
        raise ValueError(f"no snapshot at or before step {at} (the first is at step {snapshots[0][0]})")
    target = sigma_rel_to_gamma(sigma_rel)
    ts = [s[0] for s in used for _ in s[1]]
    gs = [g for s in used for g in s[1]]
    coef, err = posthoc_coefficients(ts, gs, at, target)
    if err > max_error:
        lo, hi = reconstructible_range(snapshots, at, max_error)
        raise ValueError(f"an EMA with relative std {sigma_rel} at step {at} cannot be reconstructed from these "
                         f"snapshots (profile error {err:.1%} > {max_error:.0%}); stds in about [{lo:.3f}, {hi:.3f}] can")
    out: dict[str, Tensor] = {}
    k = 0
    for _, gammas, tensors in used:
        for i in range(len(gammas)):
            prefix = f"{i}/"
            for name, t in tensors.items():
                if name.startswith(prefix):
                    key = name[len(prefix):]
                    out[key] = out[key] + coef[k] * t.double() if key in out else coef[k] * t.double()
            k += 1
    return {n: t.float() for n, t in out.items()}, {"step": at, "sigma_rel": sigma_rel, "gamma": target,
                                                      "profile_error": err, "snapshots": len(used)}


def reconstructible_range(snapshots, at: int, max_error: float = 0.05) -> tuple[float, float]:
    """The span of relative stds whose profile at step `at` the snapshots fit within max_error."""
    import numpy as np
    used = [s for s in snapshots if s[0] <= at]
    ts = [s[0] for s in used for _ in s[1]]
    gs = [g for s in used for g in s[1]]
    ok = [s for s in np.linspace(0.005, 0.28, 300)
          if posthoc_coefficients(ts, gs, at, sigma_rel_to_gamma(s))[1] <= max_error]
    return (min(ok), max(ok)) if ok else (float("nan"), float("nan"))


# ------------------------------------------------------------------------------ post-hoc EMA of a run
def snapshots_of(checkpoint) -> tuple:
    """(run folder, snapshots) of the run a checkpoint path belongs to; a clear error when it has none."""
    from ..models.io import run_folder
    run = run_folder(checkpoint)
    folder = run / POSTHOC_PREFIX
    snaps = read_snapshots(folder)
    if not snaps:
        raise ValueError(f"{run} has no post-hoc EMA snapshots ({folder} is empty or missing): train with "
                         "--posthoc-every K (e.g. 100) to record them")
    return run, snaps


def model_with(checkpoint, weights: dict):
    """The run's model with reconstructed floating tensors over its own (integer buffers kept)."""
    from .. import models
    spec, raw, _, info = models.read(checkpoint)
    model = models.build(spec)
    merged = {**raw, **{k: v for k, v in weights.items() if k in raw}}
    models.io.load_weights(model, merged, info["where"])
    return model.eval()


def parse_stds(text: str, flag: str = "--std") -> list[float]:
    """Comma-separated relative stds, e.g. '0.05,0.10'."""
    try:
        stds = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: cannot read {text!r}; give relative stds, e.g. 0.05,0.10,0.15") from None
    if not stds:
        raise ValueError(f"{flag}: give at least one relative std, e.g. 0.10")
    return stds
