"""Normalizing flows trained by exact maximum likelihood: the coupling-flow families and the CNF.

A coupling flow is an invertible network z = f(x) with a tractable Jacobian
(networks/invertible.py), so by the change of variables

    log p(x) = log N(f(x); 0, I) + log |det df/dx|

    family          network    layers
    flow-nice       NICE       additive couplings (unit Jacobian) + a diagonal scale (Dinh et al. 2014)
    flow-realnvp    RealNVP    affine couplings, checkerboard / channel masks, squeeze, multi-scale (2016)
    flow-glow       Glow       ActNorm (data-dependent init), invertible 1x1 convolutions (LU), affine
                               couplings, multi-scale (Kingma & Dhariwal 2018)
    cnf             a denoiser network; dx/du = x - D(x, e^u) is the flow, trained through its ODE
                    (models/cnf.py)

Discrete data (spec.data.levels = L) is dequantized with the one convention of likelihood.py:
the flow sees y = x + (u - 1/2) delta, delta = 2 / (L - 1), and the loss is the bound

    bits/dim = (-log p(y) [+ log q(u | x)] - dim log delta) / (dim log 2)

with u ~ U[0, 1)^dim ("uniform"), or u ~ q(u | x) from a learned conditional flow
("variational", Ho et al. 2019, Flow++), whose log q enters the bound. Continuous data (toys)
is scored as -log p(x) / (dim log 2). Sampling is one inverse pass from z ~ N(0, T^2 I) at
temperature T; its starting noise depends on the seed alone, like every family's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import likelihood, networks
from ..networks.invertible import VariationalDequantizer
from .base import Model, seed_noise
from .options import option
from .spec import ModelSpec

DEQUANTIZATIONS = ("uniform", "variational")
LOG_2PI = math.log(2 * math.pi)


def dequantization(spec: ModelSpec) -> str:
    """'uniform' | 'variational' for discrete data, 'none' for continuous data."""
    if spec.data.get("levels") is None:
        return "none"
    return (spec.training or {}).get("dequantization", "uniform")


def check_dequantization(spec: ModelSpec) -> None:
    kind = (spec.training or {}).get("dequantization", "uniform")
    if kind not in DEQUANTIZATIONS:
        raise ValueError(f"dequantization {kind!r} is unknown; choose one of {list(DEQUANTIZATIONS)}")
    if kind == "variational" and spec.data.get("levels") is None:
        raise ValueError("variational dequantization needs discrete data (images on 17 or 256 levels); this data "
                         "is continuous: use --dequantization uniform (continuous data is not dequantized)")


def dequantize_batch(x0: Tensor, levels: int, u: Tensor) -> tuple[Tensor, float]:
    """(x0 + (u - 1/2) delta, -dim log delta): the point the density is evaluated at and the term
    that turns its -log p into the bound on -log P(x0) (likelihood.py's convention). The level
    check reads values, so it runs in eager code only (see conditioning.ClassConditioning.labels)."""
    if not torch.compiler.is_compiling():
        likelihood.check_levels(x0, levels, where="the batch")
    dim = x0[0].numel()
    return likelihood.dequantize(x0, levels, u=u.to(x0)), -dim * math.log(likelihood.bin_width(levels))


def to_bits(nll_nats: Tensor, dim: int) -> Tensor:
    return nll_nats / (dim * math.log(2))


@dataclass
class FlowOptions:
    dequantization: str = option("uniform", "discrete data: uniform | variational (a learned conditional flow "
                                            "q(u | x), Flow++)", choices=DEQUANTIZATIONS)


class CouplingFlowModel(Model):
    """A coupling flow family (module docstring); `architecture` names its network class."""

    family = "flow"
    architecture = ""
    one_pass = True
    options = FlowOptions

    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.network != "auto":
            raise ValueError(f"--network picks a denoiser preset; --family {cls.family} has its own invertible "
                             f"network ({cls.architecture}): set its arguments with --network.NAME VALUE (e.g. "
                             "--network.hidden 64)")
        if cfg.reflow:
            raise ValueError(f"--reflow trains a rectified flow (a denoiser) on couplings; --family {cls.family} is a "
                             "coupling flow trained by maximum likelihood on data: drop --reflow, or train --family "
                             "diffusion --process flow --parametrization velocity")

    @classmethod
    def upgrade_stored(cls, values: dict) -> dict:
        if values.get("network") == "unet-digits":  # the flat config's default, never used by a coupling flow
            values["network"] = "auto"
        return values

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        training = {"dequantization": cfg.options.dequantization, **({"made_from": made} if made else {})}
        return ModelSpec(family=cls.family, network=networks.describe_flow(cls.architecture, source.shape,
                                                                           **cfg.network_args),
                         process=None, parametrization=None, grid=None, data=data, training=training).validate()

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.net = networks.from_description(spec.network)
        self.deq_kind = dequantization(spec)
        self.dequantizer = (VariationalDequantizer(spec.shape, **(spec.training or {}).get("dequantizer", {}))
                            if self.deq_kind == "variational" else None)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        spec.network = networks.check_description(spec.network)
        if spec.network["class"] != cls.architecture:
            raise ValueError(f"the {spec.family} family takes a {cls.architecture} network, got "
                             f"{spec.network['class']}")
        if list(spec.network["kwargs"].get("shape", [])) != list(spec.shape):
            raise ValueError(f"the network is built for shape {spec.network['kwargs'].get('shape')} but the data "
                             f"has shape {list(spec.shape)}")
        if spec.conditioning.get("kind") != "none":
            raise ValueError(f"the {spec.family} family is unconditional: train it with --class-conditional false")
        for name in ("process", "parametrization", "grid"):
            if getattr(spec, name) is not None:
                raise ValueError(f"a {spec.family} model has no {name} (it is not a denoiser); set it to null")
        if spec.calibrated:
            raise ValueError(f"a {spec.family} model samples in one pass: it has no calibrated grids")
        check_dequantization(spec)

    # ------------------------------------------------------------------ density
    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats per example, exactly: log N(f(x); 0, I) + log|det df/dx|."""
        z, logdet = self.net(x)
        return -0.5 * (z.pow(2).sum(1) + z.shape[1] * LOG_2PI) + logdet

    # ------------------------------------------------------------------ training
    def random(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The dequantization draws: u ~ U[0, 1) (uniform) or eps ~ N(0, I) (variational)."""
        shape = (n,) + self.spec.shape
        if self.deq_kind == "uniform":
            return {"u": torch.rand(shape, generator=generator)}
        if self.deq_kind == "variational":
            return {"eps": torch.randn(shape, generator=generator)}
        return {}

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """The negative log-likelihood bound of the batch in bits/dim, per example (B,); labels in
        the batch are ignored (the family is unconditional)."""
        x0 = batch["x0"]
        need = {"uniform": "u", "variational": "eps"}.get(self.deq_kind)
        draws = self.random(len(x0), generator) if need and need not in batch else {}
        dim = x0[0].numel()
        if self.deq_kind == "none":
            return to_bits(-self.log_prob(x0), dim)
        if self.deq_kind == "uniform":
            u, log_q = batch.get("u", draws.get("u")), 0.0
        else:
            u, log_q = self.dequantizer(x0, batch.get("eps", draws.get("eps")).to(x0))
        y, offset = dequantize_batch(x0, self.spec.data["levels"], u)
        return to_bits(-self.log_prob(y) + log_q + offset, dim)

    @torch.no_grad()
    def initialize(self, batch: dict) -> None:
        """Glow's data-dependent ActNorm initialisation: one forward pass on the first batch (the
        data at its levels, no dequantization noise, so every rank count gives the same result)."""
        self.net(batch["x0"].to(self.device))

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int | None = None, seeds=None, noise: Tensor | None = None, temperature: float = 1.0,
               cond: dict | None = None, cfg: float = 1.0, batch_size: int = 256, progress: bool = False,
               return_cond: bool = False, sampler: str | None = None, nfe: int | None = None, **ignored):
        """Samples x = f^{-1}(T z), z ~ N(0, I) from each seed's own generator (or the rows of
        `noise`): one inverse pass, whatever `sampler` / `nfe` say (they are accepted so that
        code written for denoisers runs unchanged; nfe is always 1)."""
        from .diffusion import DiffusionModel, decode_samples
        seeds = DiffusionModel._seeds(n, seeds, noise)
        if cond or cfg != 1:
            raise ValueError(f"the {self.spec.family} family is unconditional: sample it without --label / --cfg")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        dim = math.prod(self.spec.shape)
        outs = []
        chunks = range(0, len(seeds), batch_size)
        for start in tqdm(chunks, desc="sample", unit="batch", disable=not progress or len(chunks) < 2):
            chunk = seeds[start:start + batch_size]
            z = (noise[start:start + len(chunk)] if noise is not None else seed_noise((dim,), chunk))
            z = z.reshape(len(chunk), dim).float()
            with torch.no_grad():
                x = self.net.inverse(z.to(self.device) * temperature)
            outs.append(decode_samples(self, x).cpu())  # pixel data: clipped; latent data: decoded
        x = torch.cat(outs)
        return (x, None) if return_cond else x

    # ------------------------------------------------------------------ likelihood
    def log_likelihood(self, x: Tensor, return_nfe: bool = False, **ignored):
        """log p(x) in nats per example, exact (one forward pass; PF-ODE options are ignored)."""
        with torch.no_grad():
            lp = self.log_prob(x.to(self.device, next(self.parameters()).dtype)).to(x.dtype)
        return (lp, 1) if return_nfe else lp


class NICEModel(CouplingFlowModel):
    family, architecture = "flow-nice", "NICE"


class RealNVPModel(CouplingFlowModel):
    family, architecture = "flow-realnvp", "RealNVP"


class GlowModel(CouplingFlowModel):
    family, architecture = "flow-glow", "Glow"


COUPLING_FAMILIES = {m.family: m for m in (NICEModel, RealNVPModel, GlowModel)}
