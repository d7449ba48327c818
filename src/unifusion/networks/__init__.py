"""Denoiser networks F(x, c_noise, y=None) -> Tensor shaped like x.

c_noise is a (B,) float noise label (a process time t, a DDPM step, EDM's ln(sigma)/4: the
network does not know which); y is a (B,) LongTensor of class labels in 0..num_classes, where
num_classes is the null label for classifier-free guidance, and y=None means all-null.

    net = build("unet-digits", num_classes=10)
    F = net(x, c_noise, y)
"""
from __future__ import annotations

from torch import nn

from .dit import DiT
from .mlp import MLP
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
    "unet-cifar": (UNet, dict(in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                              attn_resolutions=(16,), resolution=32, dropout=0.1, num_heads=1)),
    # DiT on 32x32x4 latents (256x256 images through the SD VAE), Peebles & Xie 2023 Table 1;
    # 32.5M / 129.5M params (the paper's 33M / 130M also count the learned-sigma output channels)
    "dit-s2": (DiT, dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6)),
    "dit-b2": (DiT, dict(input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12)),
}


def build(name: str, **overrides) -> nn.Module:
    """Instantiate a preset; overrides replace its keyword arguments (e.g. num_classes=10)."""
    if name not in PRESETS:
        raise ValueError(f"unknown network preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    cls, kwargs = PRESETS[name]
    return cls(**{**kwargs, **overrides})


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers such as DiT's fixed position codes are not counted)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["MLP", "UNet", "DiT", "PRESETS", "build", "count_parameters"]
