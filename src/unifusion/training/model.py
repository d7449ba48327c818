"""Build a denoiser from a config, load one from a checkpoint, and generate samples by seed."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import config as C
from .. import networks
from ..guidance import classifier_free
from ..parametrizations import Denoiser
from ..samplers import sample
from . import checkpoint


def build(cfg: C.TrainConfig, num_classes: int) -> Denoiser:
    """The network preset wrapped with the config's process and parametrization."""
    overrides = {"num_classes": num_classes}
    if cfg.grad_checkpointing:
        overrides["gradient_checkpointing"] = True
    net = networks.build(cfg.network, **overrides)
    return Denoiser(net, C.make_process(cfg), C.make_parametrization(cfg))


def load(path: str | Path, use_ema: bool = True, device: str = "cpu") -> tuple[Denoiser, C.TrainConfig, dict]:
    """Denoiser (EMA weights by default), its config and the checkpoint state from a checkpoint
    folder or a run folder (its latest complete checkpoint)."""
    tensors, state = checkpoint.load(path)
    cfg = C.from_dict(state["config"])
    model = build(cfg, state["num_classes"])
    weights = tensors["ema"] if use_ema and "ema" in tensors else tensors["model"]
    # the EMA stores its bookkeeping under "__"-prefixed keys next to the weights
    model.net.load_state_dict({k: v for k, v in weights.items() if not k.startswith("__")}, strict=True)
    return model.to(device).eval(), cfg, state


def generate(denoiser, shape: tuple, seeds: list[int], sampler: str = "dpmpp_2m", nfe: int = 20,
             num_classes: int = 0, labels: torch.Tensor | None = None, cfg_scale: float = 1.0,
             sigma_max: float = 80.0, sigma_min: float = 0.002, batch_size: int = 256,
             device: str = "cpu", generator_seed: int = 0, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples in [-1, 1], one per seed: the starting noise of sample i is drawn from its own
    generator seeded with seeds[i], so with a deterministic sampler a sample depends only on its
    seed (and label), not on the batch it was drawn in. Labels default to seed % num_classes."""
    if num_classes and labels is None:
        labels = torch.tensor([s % num_classes for s in seeds])
    outs = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in chunk])
        noise = noise.to(device) * sigma_max
        cond, den = {}, denoiser
        if num_classes:
            y = labels[start:start + batch_size].to(device)
            cond = {"y": y}
            den = classifier_free(denoiser, cfg_scale, {"y": torch.full_like(y, num_classes)})
        gen = torch.Generator(device=device).manual_seed(generator_seed + start)
        x = sample(den, noise, sampler, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, generator=gen,
                   cond=cond, **options)
        outs.append(x.clamp(-1, 1).cpu())
    return torch.cat(outs), labels
