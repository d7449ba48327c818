"""A model family from outside the unifusion package (tests/test_plugin_family.py registers it
through a `unifusion.families` entry point): a diagonal Gaussian with a learnable mean and
std, trained by maximum likelihood. Nothing under src/ knows it exists."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unifusion.models import Model, ModelSpec
from unifusion.models.base import seed_noise
from unifusion.models.options import option


@dataclass
class DiagGaussOptions:
    init_log_std: float = option(0.0, "initial log std of every dimension")


class DiagGaussModel(Model):
    """x ~ N(mean, diag(exp(log_std))^2): loss -log p(x) in nats, one-pass sampling, exact likelihood."""

    options = DiagGaussOptions
    one_pass = True

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        d = math.prod(spec.shape)
        self.mean = nn.Parameter(torch.zeros(d))
        self.log_std = nn.Parameter(torch.full((d,), float(spec.training["init_log_std"])))

    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.network != "auto":
            raise ValueError("the diag-gauss family has no network: drop --network")

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        if spec.process is not None or spec.conditioning.get("kind") != "none":
            raise ValueError("a diag-gauss model has no process and no conditioning")

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        return ModelSpec(family=cls.family, network={"class": "DiagGauss", "kwargs": {"dim": math.prod(source.shape)}},
                         process=None, parametrization=None, grid=None, data=data,
                         training={"init_log_std": cfg.options.init_log_std}).validate()

    def log_prob(self, x):
        z = (x.flatten(1) - self.mean) / self.log_std.exp()
        return -0.5 * z.pow(2).sum(1) - self.log_std.sum() - 0.5 * z.shape[1] * math.log(2 * math.pi)

    def forward(self, batch, generator=None):
        return -self.log_prob(batch["x0"])

    def sample(self, n=None, seeds=None, noise=None, temperature=1.0, return_cond=False, **ignored):
        seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
        z = seed_noise((self.mean.numel(),), seeds).to(self.mean)
        with torch.no_grad():
            x = (self.mean + temperature * self.log_std.exp() * z).reshape((len(seeds),) + self.spec.shape)
        return (x, None) if return_cond else x

    def log_likelihood(self, x, return_nfe=False, **ignored):
        with torch.no_grad():
            lp = self.log_prob(x.to(self.mean)).to(x.dtype)
        return (lp, 1) if return_nfe else lp
