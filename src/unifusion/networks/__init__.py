"""Denoiser networks F(x, c_noise, emb=None) -> Tensor shaped like x: plain nn.Modules.

c_noise is a (B,) float noise label (a process time t, a DDPM step, EDM's ln(sigma)/4: the
network does not know which); emb is an optional (B, net.emb_dim) conditioning vector from the
model's conditioning module (models/conditioning.py), added to the noise embedding. Networks
never see labels, sigma or the process.

A network is described by {"class": name in NETWORKS, "kwargs": every constructor argument};
a preset only fills the kwargs in, so a saved model never depends on PRESETS:

    desc = describe("unet-digits", model_channels=32)   # {"class": "UNet", "kwargs": {...}}
    net = from_description(desc)
    F = net(x, c_noise, emb)
"""
from __future__ import annotations

import inspect

from torch import nn

from .autoencoder import AUTOENCODER_NETWORKS, DISCRIMINATORS, KLAutoencoder
from .dit import DiT
from .invertible import FLOW_NETWORKS
from .mlp import MLP
from .mmdit import MMDiT
from .text import ImageEncoder, TextTransformer
from .unet import UNet

# name -> (class, kwargs). Step times: batch 128, forward + backward + Adam step, torch 2.13 CPU
# build, 2 threads on a 2-core AMD EPYC VM: best on an idle machine / typical while another
# process shares the cores.
PRESETS: dict[str, tuple[type[nn.Module], dict]] = {
    # 2-D toy data: 0.83M params, ~16-20 ms per step
    "mlp-2d": (MLP, dict(dim=2, hidden=256, depth=4, emb_dim=128)),
    # sklearn 8x8 digits: 0.19M params, ~70 ms idle / ~95-115 ms shared per step. The time is
    # almost all convolution (60% in conv forward/backward, 10% attention); model_channels=32
    # (0.76M) costs ~150 / ~175-240 ms, so width 16 is the one that gets near the ~60 ms target.
    "unet-digits": (UNet, dict(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attn_resolutions=(4,), resolution=8, num_heads=4)),
    # CIFAR-10 32x32x3, DDPM's layout (Ho et al. 2020, 35.7M params) with adaptive group norm: 38.3M params
    # small RGB images (32x32, e.g. an image folder with --image-size 32): 1.2M params, levels 32/16/8
    "unet-32": (UNet, dict(in_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                           attn_resolutions=(8,), resolution=32, num_heads=4)),
    "unet-cifar": (UNet, dict(in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                              attn_resolutions=(16,), resolution=32, dropout=0.1, num_heads=1)),
    # DiT on 32x32x4 latents (256x256 images through the SD VAE), Peebles & Xie 2023 Table 1;
    # 32.5M / 129.5M params (the paper's 33M / 130M also count the learned-sigma output channels)
    "dit-s2": (DiT, dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6)),
    "dit-b2": (DiT, dict(input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12)),
    # DiT-L/2 (Table 1: 458M); 456.8M params here, for benchmarks/gpu.py
    "dit-l2": (DiT, dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1024, depth=24, num_heads=16)),
    # SD3's MM-DiT on 8x8x4 latents (32x32 images through ae-f4) with a text-s encoder (context and pooled
    # width 128): 2.28M params, 16 image tokens; ~0.3 s per step at batch 128 with 24 text tokens (2 threads)
    "mmdit-s": (MMDiT, dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
                            context_dim=128, emb_dim=128)),
}

# KL autoencoders (networks/autoencoder.py) for the autoencoder family, small enough to train at 32x32 on 2
# CPU cores in minutes: f = 4 (32x32x3 -> 8x8x4, 0.95M params) and f = 8 (-> 4x4x4, 1.25M); image_channels
# follows the data. Kept apart from the denoiser PRESETS (they take no c_noise); describe() reads both.
AUTOENCODER_PRESETS: dict[str, tuple[type[nn.Module], dict]] = {
    "ae-f4": (KLAutoencoder, dict(image_channels=3, base_channels=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                  latent_channels=4, mid_attention=True)),
    "ae-f8": (KLAutoencoder, dict(image_channels=3, base_channels=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                                  latent_channels=4, mid_attention=True)),
}


# denoisers, the invertible networks of the coupling-flow families (forward(x) -> (z, logdet)), and the
# autoencoder family's encoder/decoder and discriminator (networks/autoencoder.py)
NETWORKS: dict[str, type[nn.Module]] = {"MLP": MLP, "UNet": UNet, "DiT": DiT, **FLOW_NETWORKS,
                                        **AUTOENCODER_NETWORKS, **DISCRIMINATORS,
                                        "MMDiT": MMDiT, "TextTransformer": TextTransformer, "ImageEncoder": ImageEncoder}


def _signature_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def _jsonable(v):
    return [_jsonable(e) for e in v] if isinstance(v, (tuple, list)) else v


def describe_flow(cls_name: str, shape, **overrides) -> dict:
    """{"class", "kwargs"} of an invertible network for data of this shape: every constructor
    argument at its default unless overridden."""
    cls = NETWORKS[cls_name]
    return check_description({"class": cls_name, "kwargs": {**_signature_defaults(cls), **overrides,
                                                              "shape": list(shape)}})


def describe(preset: str, **overrides) -> dict:
    """{"class", "kwargs"}: the preset's class and every constructor argument (the preset's
    values, then `overrides`, the rest at the class defaults)."""
    every = {**PRESETS, **AUTOENCODER_PRESETS}
    if preset not in every:
        raise ValueError(f"unknown network preset {preset!r}; valid presets: {', '.join(sorted(every))}")
    cls, kwargs = every[preset]
    name = next(k for k, c in NETWORKS.items() if c is cls)
    return check_description({"class": name, "kwargs": {**_signature_defaults(cls), **kwargs, **overrides}})


def check_description(desc: dict) -> dict:
    """Validate {"class", "kwargs"}: a known class and only arguments it takes (JSON-able copy)."""
    if not isinstance(desc, dict) or set(desc) != {"class", "kwargs"}:
        raise ValueError(f"a network is described as {{'class': ..., 'kwargs': {{...}}}}, got {desc!r}")
    if desc["class"] not in NETWORKS:
        raise ValueError(f"unknown network class {desc['class']!r}; choose one of {sorted(NETWORKS)}")
    valid = _signature_defaults(NETWORKS[desc["class"]])
    unknown = sorted(set(desc["kwargs"]) - set(valid))
    if unknown:
        raise ValueError(f"network {desc['class']} has no argument(s) {unknown}; its arguments are {sorted(valid)}")
    missing = sorted(k for k, v in valid.items() if v is inspect.Parameter.empty and k not in desc["kwargs"])
    if missing:
        raise ValueError(f"network {desc['class']} needs argument(s) {missing}")
    return {"class": desc["class"], "kwargs": {k: _jsonable(v) for k, v in desc["kwargs"].items()}}


def from_description(desc: dict, **runtime) -> nn.Module:
    """Instantiate a description; `runtime` switches that do not change the weights
    (gradient_checkpointing) may be added."""
    desc = check_description(desc)
    kwargs = {**desc["kwargs"], **runtime}
    try:
        return NETWORKS[desc["class"]](**kwargs)
    except (TypeError, ValueError) as e:  # e.g. hidden="wide": name the arguments, not the traceback
        raise ValueError(f"network {desc['class']} cannot be built from {kwargs}: {e}") from None


def build(name: str, **overrides) -> nn.Module:
    """Instantiate a preset; overrides replace its keyword arguments (e.g. model_channels=32)."""
    return from_description(describe(name, **overrides))


def default_preset(shape) -> tuple[str, dict]:
    """The denoiser preset that follows the data (`--network auto`), with its arguments fitted to
    the shape: vectors (D,) -> mlp-2d (dim D); images and latents (C, H, W) up to 8x8 -> unet-digits,
    larger -> unet-32 (in_channels C, resolution H, attention at the preset's level)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 1:
        return "mlp-2d", {"dim": shape[0]}
    if len(shape) != 3:
        raise ValueError(f"no default network for data of shape {shape}; pick one with --network")
    preset = "unet-digits" if max(shape[1:]) <= 8 else "unet-32"
    return preset, fitted_args(preset, shape, resolution=True)


def fitted_args(preset: str, shape, resolution: bool = False) -> dict:
    """A preset's arguments that follow data of `shape` (C, H, W): in_channels = C (UNet, DiT) and
    input_size = H (DiT's patch grid); with `resolution`, also a UNet's resolution = H with its
    attention kept at the same levels (attn_resolutions scaled by H / the preset's resolution)."""
    if preset not in PRESETS or len(shape) != 3:
        return {}
    cls, kwargs = PRESETS[preset]
    takes = {**_signature_defaults(cls), **kwargs}
    out = {k: v for k, v in (("in_channels", int(shape[0])), ("input_size", int(shape[-1]))) if k in takes}
    if resolution and "resolution" in takes and int(shape[-1]) != takes["resolution"]:
        h, r = int(shape[-1]), int(takes["resolution"])
        out["resolution"] = h
        if "attn_resolutions" in takes:
            out["attn_resolutions"] = [a * h // r for a in takes["attn_resolutions"] if a * h % r == 0]
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers such as DiT's fixed position codes are not counted)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["MLP", "UNet", "DiT", "KLAutoencoder", "PRESETS", "AUTOENCODER_PRESETS", "NETWORKS", "build", "describe", "from_description",
           "check_description", "count_parameters"]
