"""Packed training and any-size sampling for the denoiser family's transformers (DiT, MM-DiT).

The seam is the batch: a packed batch (data/packing.py) is the loop's ordinary dict of fixed-shape slots,

    {"x0": (B, C, H_max, W_max) zero-padded images, "size": (B, 2) (h, w) each (0, 0: an empty slot),
     "weight": (B,) = B / images in the global step (0 when empty), "cond": ...}

with the ordinary per-slot draws ("sigma", "noise" of the carrier's shape, "drop"). So the loop, DDP, gradient
accumulation, the (seed, step) draws and checkpoints are unchanged: DiffusionModel.forward sees "size" and
hands the batch to `packed_loss`, which packs the real slots' patch tokens into one sequence (networks.packing),
runs the network once on it (each image with its own noise level, condition, positions and modulation;
attention inside each image) and returns per slot

    weight_i * lambda(sigma_i) * mean over image i's pixels of (D - x_0)^2

i.e. each image's own loss, exactly the loss of that image alone at its size (tests/test_packing.py); the
weights make the loop's mean over slots and ranks the mean over the step's images. Images are weighted
equally, not by their token count: packing does not change the objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses, parametrizations
from ..networks.packing import pack_images
from .options import option

SIZE_SAMPLE = 10_000  # items whose sizes a spec records (the distinct sizes, most frequent first)


@dataclass
class PackingOptions:
    pack_tokens: int = option(0, "packed variable-size batches (DiT / MM-DiT): the patch-token budget of a global "
                                 "step; --batch-size is then the most images a step holds (0 = off: fixed-size "
                                 "batches)", minimum=0)


def pack_tokens(cfg) -> int:
    return int(getattr(cfg.options, "pack_tokens", 0) or 0)


def check_options(cfg) -> None:
    if pack_tokens(cfg) and getattr(cfg.options, "objective", "denoise") != "denoise":
        raise ValueError(f"--pack-tokens trains the denoiser family (--objective denoise), not --objective "
                         f"{cfg.options.objective}")


def patch_of(network: dict) -> int | None:
    """The patch size of a transformer description (None: a network that cannot take packed tokens)."""
    from .. import networks
    cls = networks.NETWORKS.get(network["class"])
    return int(network["kwargs"]["patch_size"]) if hasattr(cls, "forward_packed") else None


def with_packing(spec, cfg, source):
    """The spec with the run's packing (spec.training["packing"] = {"tokens"}) and, for data of several sizes,
    their table (spec.data["sizes"], most frequent first: the default sampling size); the checks of both."""
    from ..data.packing import item_sizes, size_table
    tokens = pack_tokens(cfg)
    variable = bool(getattr(source, "variable_size", False))
    if variable and not tokens:
        raise ValueError(f"--data {cfg.data} holds images of several sizes: train them packed with --pack-tokens N "
                         "(a DiT or MM-DiT network), or resize them to one size (--image-size)")
    if not tokens:
        return spec
    if patch_of(spec.network) is None:
        raise ValueError(f"--pack-tokens needs a transformer that takes packed tokens (a dit-* or mmdit-* preset); "
                         f"--network {cfg.network} is a {spec.network['class']}")
    if len(spec.shape) != 3:
        raise ValueError(f"--pack-tokens packs images; --data {cfg.data} holds vectors of shape {spec.shape}")
    spec.training = {**spec.training, "packing": {"tokens": tokens}}
    if variable:
        spec.data = {**spec.data, "sizes": size_table(item_sizes(source, SIZE_SAMPLE))}
    return spec


def unit(model) -> int:
    """A token's side in data pixels: the patch size, times the autoencoder's factor for latent models."""
    p = getattr(model.net, "patch_size", 1)
    ae = model.spec.data.get("autoencoder") if model.spec.data.get("kind") == "latent" else None
    return int(p) * (int(ae["factor"]) if ae else 1)


def packed_source(model, source):
    """The training source of a packed model: data.packing.PackedSource at the network's patch."""
    from ..data.packing import PackedSource
    return PackedSource(source, int(model.net.patch_size), int(model.spec.training["packing"]["tokens"]))


def _rows(cond: dict, idx: Tensor, keep: list[int]) -> dict:
    return {k: (v[idx] if isinstance(v, Tensor) else [v[i] for i in keep]) for k, v in cond.items()}


def denoise_packed(model, x: Tensor, sigma: Tensor, pack, **cond) -> Tensor:
    """D on packed tokens: sigma per token (T,), cond per image (pack.n rows)."""
    return parametrizations.denoise(model.net, model.process, model.param, x, sigma, pack=pack,
                                    **model.cond.net_kwargs(cond, pack.n))


def packed_loss(model, batch: dict, sigma: Tensor, noise: Tensor, cond: dict) -> Tensor:
    """(B,) per-slot losses of a packed batch (module docstring)."""
    x0, sizes = batch["x0"], batch["size"].to(torch.long)
    if not hasattr(model.net, "forward_packed"):
        raise ValueError(f"packed batches (items with 'size') need a DiT or MM-DiT network, not "
                         f"{type(model.net).__name__}")
    if sizes.shape != (len(x0), 2):
        raise ValueError(f"batch['size'] must be (B, 2) (h, w) per slot, got {tuple(sizes.shape)}")
    real = (sizes > 0).all(1)
    keep = real.nonzero()[:, 0].tolist()  # the one host read of a packed step: its layout is data
    n_slots = len(x0)
    weight = batch.get("weight")
    weight = (real.to(x0.dtype) * (n_slots / max(1, len(keep))) if weight is None else weight.to(x0.dtype))
    if not keep:  # a rank without images this step: a zero loss still reaching every weight (DDP reduces them)
        return sum(p.sum() for p in model.parameters()) * 0 + x0.new_zeros(n_slots)
    idx = torch.tensor(keep, device=x0.device)
    p = int(model.net.patch_size)
    tokens, pack = pack_images(x0[idx], sizes[idx], p)  # (T, p*p*C)
    noise_tokens, _ = pack_images(noise[idx], sizes[idx], p)
    cond = _rows(cond, idx, keep) if cond else {}

    def den(x, s, **c):
        return denoise_packed(model, x, s, pack, **c)

    per_token = losses.denoising_loss(den, tokens, sigma[idx][pack.image], model.weight, noise=noise_tokens, **cond)
    per_image = pack.segment_mean(per_token)  # (n,): the mean over each image's pixels (every token has p*p*C)
    return per_image.new_zeros(n_slots).index_copy(0, idx, per_image) * weight


def sample_shape(model, size) -> tuple[int, ...]:
    """The shape a sample of data-space `size` (h, w) has in the model's own space (latents: / the
    autoencoder's factor); None: the spec's default (for data of several sizes, the most frequent)."""
    spec = model.spec
    if size is None:
        sizes = spec.data.get("sizes")
        if not sizes:
            return spec.shape
        size = tuple(sizes[0])
        latent = spec.data.get("kind") == "latent"
        f = int(spec.data["autoencoder"]["factor"]) if latent else 1
        size = (size[0] * f, size[1] * f) if latent else size
    h, w = (int(v) for v in size)
    if len(spec.shape) != 3:
        raise ValueError(f"--size applies to images; this model's data has shape {spec.shape}")
    u = unit(model)
    if h < 1 or w < 1 or h % u or w % u:
        what = "the patch size" if u == getattr(model.net, "patch_size", 1) else "the patch size x the autoencoder factor"
        raise ValueError(f"--size {w}x{h} (width x height): both must be positive multiples of {u} ({what}) to give "
                         f"whole tokens")
    if not hasattr(model.net, "forward_packed") and (h, w) != tuple(_image_shape(spec)[1:]):
        raise ValueError(f"--size {w}x{h}: this model's network ({spec.network['class']}) samples only at its trained "
                         f"size {_image_shape(spec)[2]}x{_image_shape(spec)[1]}; sizes need a DiT or MM-DiT")
    if spec.data.get("kind") == "latent":
        f = int(spec.data["autoencoder"]["factor"])
        return (spec.shape[0], h // f, w // f)
    return (spec.shape[0], h, w)


def _image_shape(spec) -> tuple[int, ...]:
    return tuple(spec.data.get("image_shape") or spec.shape) if spec.data.get("kind") == "latent" else spec.shape


def parse_size(text: str) -> tuple[int, int]:
    """'48x32' (width x height, as image tools write it) -> (h, w) = (32, 48)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: write WIDTHxHEIGHT in pixels, e.g. 48x32") from None
    return h, w
