"""The model interface every family implements; the training loop, the CLI and evaluation talk
only to this.

    model.loss(batch, generator) -> (B,)     batch: {"x0", "cond"?, "noise"?, "sigma"?, "drop"?}
    model.random(n, generator) -> dict       the per-example random draws of a global batch
    model.sample(seeds=..., sampler=..., nfe=..., cond=..., cfg=...) -> samples in data space
    model.log_likelihood(x) -> (B,) nats     where the family has one
    model.initialize(batch)                  data-dependent initialisation before step 0 (ActNorm)
    model.calibrate(sampler, nfe) -> grid    where sampling runs over a noise grid (the denoiser families):
                                             one fitted to the model (default: its own sampler and NFE)

and, as classmethods, what makes a family trainable from the command line (a family is one file:
these, its Model, and one registration line, models/registry.py):

    options                     a dataclass of the family's own training options (models/options.py)
    check_options(cfg)          checks of those options against the run's config (ValueError)
    spec_from_config(cfg, source, data, made) -> ModelSpec
                                the spec a run trains: cfg is the run's config (config.TrainConfig,
                                its own options in cfg.options), source the data source, data the
                                generic spec.data record, made how the run was started (couplings,
                                --init-from) or {}
    extends, selected_by(options)   a family joining another's command line (the students add
                                --objective to --family diffusion and build the spec when it is set)
    check_spec(spec)            family-specific checks of a loaded spec

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
    scores = "samples"  # what `unifusion eval` measures: "samples" (FID, ...) or "reconstructions" (autoencoders)
    previews = True  # the loop draws preview grids of its samples (False: a family that does not generate)
    options: type | None = None  # the family's own training options (a dataclass, models/options.py)
    extends: str | None = None   # a family whose command line these options join (see selected_by)

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

    def data_source(self, source):
        """The source the loop reads for this model (e.g. with captions in the items, data.captioned)."""
        return source

    def extra_files(self) -> dict[str, str]:
        """Text files a model folder holds besides spec.json and the weights (e.g. tokenizer.json)."""
        return {}

    def initialize(self, batch: dict) -> None:
        """Data-dependent initialisation from the first batch of a new run (before step 0, before
        the EMA copy is taken); most families need none."""

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Family-specific checks of a spec (ModelSpec.validate calls this); raise ValueError."""

    @classmethod
    def check_options(cls, cfg) -> None:
        """Checks of the family's options against the rest of the run's config (after the generic
        choices / bounds of models.options); raise ValueError naming the flag. Runs for every run of
        this family, and of the family it extends."""

    @classmethod
    def upgrade_stored(cls, values: dict) -> dict:
        """A run's stored config from an older unifusion -> today's keys and values (e.g. a family
        that now refuses a value the old flat config stored as its default)."""
        return values

    @classmethod
    def selected_by(cls, options) -> bool:
        """For a family that `extends` another: whether these options choose it."""
        return False

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        """The ModelSpec a run of this family trains (see the module docstring)."""
        raise NotImplementedError(f"the {cls.family} family cannot be trained from a config (it defines no "
                                  "spec_from_config)")

    def sample(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError(f"the {self.family} family cannot sample")

    def log_likelihood(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError(f"the {self.family} family has no likelihood")

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
