"""The KL autoencoder of latent diffusion (Rombach et al. 2022, LDM), small, and its patch discriminator.

    x (N, C, H, W) --Encoder--> [mean | logvar] (N, 2c, H/f, W/f)      f = 2 ** (len(ch_mult) - 1)
    z (N, c, H/f, W/f) --Decoder--> x_rec (N, C, H, W)

Encoder: conv_in, then per level `num_res_blocks` ResNet blocks (GroupNorm + SiLU + 3x3 conv,
twice, with a residual) and a stride-2 convolution between levels; a middle (res, optional
single-head attention, res); GroupNorm, SiLU, conv to 2c channels: the posterior's mean and
log-variance, the latter clamped to [-30, 20] as LDM does (exp of it stays finite). The Decoder
mirrors it (LDM's decoder has one more block per level than the encoder; so does this one) with
nearest-neighbour upsampling + conv. LDM's 1x1 quant / post-quant convolutions are left out:
they are linear maps next to the encoder's and decoder's own end convolutions.

PatchDiscriminator: pix2pix's NLayerDiscriminator (Isola et al. 2017) as LDM uses it: a map of
logits, one per receptive-field patch, trained with the hinge loss (models/autoencoder.py).
GroupNorm instead of BatchNorm, so a discriminator's output depends on its own example only
(K data-parallel ranks then equal one rank, and there are no running statistics to resume).

These are not denoisers: no c_noise, no emb. They live in networks.NETWORKS so that a spec can
describe them ({"class", "kwargs"}: every constructor argument).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import group_norm

LOGVAR_RANGE = (-30.0, 20.0)


class ResBlock(nn.Module):
    """skip(x) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(x)))))))."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """x + single-head self-attention over the H*W positions (LDM's mid-block attention)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # each (B, H*W, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, H*W, C)
        return x + self.proj(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """3x3 convolution with stride 2 after padding right and bottom by one (LDM): H -> H/2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution: H -> 2H."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(ch: int, attention: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch, dropout), AttnBlock(ch) if attention else nn.Identity(),
                         ResBlock(ch, ch, dropout))


class Encoder(nn.Module):
    """(N, C, H, W) -> (N, 2c, H/f, W/f): the posterior's [mean | logvar]."""

    def __init__(self, in_channels: int, widths: list[int], num_res_blocks: int, latent_channels: int,
                 mid_attention: bool, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(prev, w, dropout))
                prev = w
            if i < len(widths) - 1:
                blocks.append(Downsample(w))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = _middle(prev, mid_attention, dropout)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (N, w0, H, W)
        for level in self.levels:  # each halves H, W except the last
            h = level(h)
        h = self.mid(h)  # (N, w_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2c, H/f, W/f)


class Decoder(nn.Module):
    """(N, c, h, w) -> (N, C, h*f, w*f), unclamped."""

    def __init__(self, out_channels: int, widths: list[int], num_res_blocks: int, latent_channels: int,
                 mid_attention: bool, dropout: float = 0.0):
        super().__init__()
        prev = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, prev, 3, padding=1)
        self.mid = _middle(prev, mid_attention, dropout)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(prev, widths[i], dropout))
                prev = widths[i]
            if i > 0:
                blocks.append(Upsample(prev))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (N, w_last, h, w)
        for level in self.levels:  # each doubles h, w except the last
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C, h*f, w*f)


class KLAutoencoder(nn.Module):
    """Encoder + decoder of a KL-regularised autoencoder; widths base_channels * ch_mult per level."""

    def __init__(self, image_channels: int = 3, base_channels: int = 32, ch_mult=(1, 2, 2), num_res_blocks: int = 1,
                 latent_channels: int = 4, mid_attention: bool = True, dropout: float = 0.0):
        super().__init__()
        if image_channels < 1 or base_channels < 1 or latent_channels < 1 or num_res_blocks < 1 or not ch_mult:
            raise ValueError("image_channels, base_channels, latent_channels, num_res_blocks must be >= 1 and "
                             "ch_mult non-empty")
        widths = [base_channels * int(m) for m in ch_mult]
        self.image_channels, self.latent_channels = image_channels, latent_channels
        self.factor = 2 ** (len(widths) - 1)
        self.encoder = Encoder(image_channels, widths, num_res_blocks, latent_channels, mid_attention, dropout)
        self.decoder = Decoder(image_channels, widths, num_res_blocks, latent_channels, mid_attention, dropout)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z | x), each (N, c, H/f, W/f); logvar clamped to [-30, 20]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction from the posterior mean."""
        return self.decode(self.encode(x)[0])


class PatchDiscriminator(nn.Module):
    """(N, C, H, W) -> (N, 1, h, w) real/fake logits per patch: n_layers stride-2 4x4 convolutions
    (widths base_channels * 2^i, at most 8x), one stride-1 4x4 convolution, a 4x4 convolution to
    one channel. h = H / 2^n_layers - 2, so H must be at least 3 * 2^n_layers."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        prev = base_channels
        for n in range(1, n_layers + 1):
            w = base_channels * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(prev, w, 4, stride, 1, bias=False), group_norm(w), nn.LeakyReLU(0.2)]
            prev = w
        layers.append(nn.Conv2d(prev, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.n_layers = n_layers

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def discriminator_layers(size: int, most: int = 3) -> int:
    """The most stride-2 layers (up to `most`) that leave a patch map of at least 1x1 at this size."""
    n = 1
    while n < most and size >= 3 * 2 ** (n + 1):
        n += 1
    return n


AUTOENCODER_NETWORKS = {"KLAutoencoder": KLAutoencoder}
DISCRIMINATORS = {"PatchDiscriminator": PatchDiscriminator}

