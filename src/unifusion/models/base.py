"""The model interface every family implements; the training loop, the CLI and evaluation talk
only to this.

    model.loss(batch, generator) -> (B,)     batch: {"x0", "cond"?, "noise"?, "sigma"?, "drop"?}
    model.random(n, generator) -> dict       the per-example random draws of a global batch
    model.sample(seeds=..., sampler=..., nfe=..., cond=..., cfg=...) -> samples in data space
    model.log_likelihood(x) -> (B,) nats     where the family has one
    model.initialize(batch)                  data-dependent initialisation before step 0 (ActNorm)

`random` exists so that data parallel training is exact: the loop draws the randomness of the
whole global batch from one generator seeded by (seed, step), slices each rank's rows and puts
them into the batch, so K ranks see exactly the draws of one rank. A family whose loss needs
no randomness returns {}.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .spec import ModelSpec


def seed_noise(shape, seeds) -> Tensor:
    """Unit noise (len(seeds), *shape), row i from its own generator seeded with seeds[i]: what
    every family samples from, so a sample depends on its seed alone (not on its batch)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class Model(nn.Module):
    family = "model"
    one_pass = False  # True: sample() is one network pass (no sampler, no NFE, no grid)

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec

    # the loss is the module's forward, so a DistributedDataParallel wrapper can call it
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(f"the {self.family} family cannot be trained")

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """Per-example loss, shape (B,)."""
        return self(batch, generator)

    def random(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {}

    def initialize(self, batch: dict) -> None:
        """Data-dependent initialisation from the first batch of a new run (before step 0, before
        the EMA copy is taken); most families need none."""

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Family-specific checks of a spec (ModelSpec.validate calls this); raise ValueError."""

    def sample(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError(f"the {self.family} family cannot sample")

    def log_likelihood(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError(f"the {self.family} family has no likelihood")

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
