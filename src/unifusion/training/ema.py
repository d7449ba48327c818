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


class EMA:
    """A float32 shadow copy of a model's parameters and floating buffers (others are copied)."""

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

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int) -> None:
        """Fold the model's current weights in, after a step on batch_size samples."""
        beta = self.beta(batch_size)
        current = _named_tensors(model)
        if current.keys() != self.shadow.keys():
            raise ValueError("model does not match the EMA: parameter/buffer names differ")
        for name, ema in self.shadow.items():
            theta = current[name].detach()
            if ema.is_floating_point():
                ema.lerp_(theta.to(ema.device, torch.float32), 1.0 - beta)
            else:
                ema.copy_(theta)
        self.samples_seen += batch_size

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
