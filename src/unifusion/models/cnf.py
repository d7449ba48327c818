"""The cnf family: a continuous normalizing flow trained by maximum likelihood (FFJORD-style).

Its flow is the probability-flow ODE of a denoiser, dx/du = x - D(x, e^u) in u = log sigma,
from the data at sigma_min to N(0, sigma_max^2 I) (likelihood.py), with D built exactly as in the
diffusion family (any network, process and parametrization; flow matching's velocity network
under the flow process makes it the same kind of model that flow matching trains). Only the loss
differs:

    diffusion / flow matching   regress D onto x_0 at random noise levels (simulation-free)
    cnf                         maximise log p(x) = log N(x(sigma_max)) + int (dim - tr dD/dx) du
                                through the solver (Hutchinson's trace with one Rademacher probe
                                per example, backpropagated through the solver's steps)

so it samples with every sampler and is scored by the same PF-ODE likelihood. Training solves
the ODE with adaptive RK45 at spec.training["ode_tol"] (default 1e-3), or with
spec.training["ode_steps"] fixed RK4 steps when that is > 0. Discrete data is dequantized as in
likelihood.py; the loss is in bits/dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import likelihood
from .diffusion import LIKELIHOOD_SIGMA_MAX, DiffusionModel, denoiser_spec, with_sampling
from .flows import check_dequantization, dequantization, dequantize_batch, to_bits
from .options import option
from .spec import ModelSpec


@dataclass
class CNFOptions:
    dequantization: str = option("uniform", "discrete data: uniform dequantization (the cnf's only kind; "
                                            "variational is the coupling flows')")
    ode_tol: float = option(1e-3, "RK45 tolerance of the training solve", positive=True)
    ode_steps: int = option(0, "fixed RK4 steps of the training solve instead (0 = adaptive RK45)", minimum=0)


class CNFModel(DiffusionModel):
    family = "cnf"
    options = CNFOptions

    @classmethod
    def check_options(cls, cfg) -> None:
        super().check_options(cfg)
        if cfg.options.dequantization != "uniform":
            raise ValueError(f"--dequantization {cfg.options.dequantization!r}: the cnf family dequantizes uniformly; "
                             "variational is for the coupling flows (--family flow-nice, flow-realnvp, flow-glow)")

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        o = cfg.options  # unconditional: labels in the data are ignored
        return with_sampling(denoiser_spec(cfg, source, data, made, family=cls.family, conditional=False,
                                           training={"dequantization": o.dequantization, "ode_tol": o.ode_tol,
                                                     "ode_steps": o.ode_steps}), cfg)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        train = spec.training or {}
        self.deq_kind = dequantization(spec)
        self.ode_tol = float(train.get("ode_tol", 1e-3))
        self.ode_steps = int(train.get("ode_steps", 0))

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        spec.check_denoiser_fields()
        check_dequantization(spec)
        if (spec.training or {}).get("dequantization") == "variational":
            raise ValueError("the cnf family dequantizes uniformly; variational dequantization is for the coupling "
                             "flows (--family flow-realnvp etc.)")
        if spec.conditioning.get("kind") != "none":
            raise ValueError("the cnf family is unconditional: train it with --class-conditional false")

    def random(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The dequantization draw u ~ U[0, 1) and one Rademacher probe per example."""
        shape = (n,) + self.spec.shape
        out = {"u": torch.rand(shape, generator=generator)} if self.deq_kind == "uniform" else {}
        out["probe"] = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        return out

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """-log p(x) through the ODE, in bits/dim, per example (B,)."""
        x0 = batch["x0"]
        draws = self.random(len(x0), generator) if "probe" not in batch else {}
        dim = x0[0].numel()
        y, offset = x0, 0.0
        if self.deq_kind == "uniform":
            y, offset = dequantize_batch(x0, self.spec.data["levels"], batch.get("u", draws.get("u")))
        probe = batch.get("probe", draws.get("probe")).to(x0)
        lo, hi = self.spec.sigma_range()
        # the trace's gradient is a double backward, which only the math attention kernel implements
        with sdpa_kernel([SDPBackend.MATH]):
            lp, _ = likelihood.log_likelihood(self.denoise, y, lo, min(hi, LIKELIHOOD_SIGMA_MAX),
                                              divergence="hutchinson", probes=probe[None], rtol=self.ode_tol,
                                              atol=self.ode_tol, create_graph=True, steps=self.ode_steps)
        return to_bits(-lp + offset, dim)
