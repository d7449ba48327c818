"""ADM / DDPM++-style U-Net (Ho et al. 2020; Song et al. 2021; Dhariwal & Nichol 2021).

Encoder levels of residual blocks (optionally followed by self-attention) with a 2x down-sample
between levels, a middle (res, attn, res), and a mirrored decoder that consumes one encoder
skip per residual block. The noise/class embedding enters every residual block as the
scale/shift of its second GroupNorm (ADM's adaptive group norm).

With context_dim > 0 every attention block also cross-attends to a token sequence (text
encoder states, B x L x context_dim, with a key-padding mask), as SD 1.x's UNet does (Rombach et
al. 2022): self-attention, then cross-attention whose output projection starts at zero. With
context_dim = 0 (the default) the module, its state_dict and its outputs are those of the plain
UNet, so models saved before cross-attention existed load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, NoiseEmbedding, group_norm, maybe_checkpoint, modulate, zero_
from .text import masked_attention

UPSAMPLE_MODES = ("nearest", "pixelshuffle", "transposed")
DOWNSAMPLE_MODES = ("conv", "avgpool")


class ResBlock(nn.Module):
    """skip(x) + conv2(dropout(SiLU(AdaGN(conv1(SiLU(GN(x))), emb)))); conv2 starts at zero."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.ada = nn.Linear(emb_dim, 2 * out_ch)  # emb -> (shift, scale) of norm2
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        shift, scale = self.ada(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # each (B, out_ch, 1, 1)
        h = F.silu(modulate(self.norm2(h), shift, scale))
        return self.skip(x) + self.conv2(self.dropout(h))


class AttnBlock(nn.Module):
    """x + attention over the H*W positions; the output projection starts at zero."""

    def __init__(self, ch: int, num_heads: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.attn = Attention(ch, num_heads)
        zero_(self.attn.proj)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return x + self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)


class CrossAttnBlock(nn.Module):
    """x + attention from the H*W positions (queries) to the context tokens (keys, values), padding
    tokens masked out; the output projection starts at zero (SD 1.x's attn2 with a LayerNorm)."""

    def __init__(self, ch: int, context_dim: int, num_heads: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"cross-attention width {ch} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, ch // num_heads
        self.norm = nn.LayerNorm(ch)
        self.q = nn.Linear(ch, ch, bias=False)
        self.kv = nn.Linear(context_dim, 2 * ch, bias=False)
        self.proj = zero_(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        L, h, d = context.shape[1], self.num_heads, self.head_dim
        q = self.q(self.norm(x.flatten(2).transpose(1, 2))).reshape(B, H * W, h, d).transpose(1, 2)  # (B, h, HW, d)
        k, v = self.kv(context).reshape(B, L, 2, h, d).permute(2, 0, 3, 1, 4)  # (B, h, L, d) each
        out = masked_attention(q, k.to(q.dtype), v.to(q.dtype), mask).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class UNetBlock(nn.Module):
    """One residual block, followed by self-attention (and cross-attention to the context when
    context_dim > 0) at the resolutions that ask for it."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool, num_heads: int,
                 context_dim: int = 0):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = AttnBlock(out_ch, num_heads) if attn else None
        # no attribute in the state_dict without context: keys stay those of the plain UNet
        self.cross = CrossAttnBlock(out_ch, context_dim, num_heads) if attn and context_dim else None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        h = self.res(x, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.cross is not None and context is not None:
            h = self.cross(h, context, context_mask)
        return h


class Downsample(nn.Module):
    """2x down: strided 3x3 conv (DDPM/ADM) or parameter-free 2x2 average pool."""

    def __init__(self, ch: int, mode: str = "conv"):
        super().__init__()
        if mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if mode == "conv" else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """2x up: "nearest" (nearest + 3x3 conv), "pixelshuffle" (3x3 conv to 4C + PixelShuffle),
    or "transposed" (4x4 stride-2 ConvTranspose2d)."""

    def __init__(self, ch: int, mode: str = "nearest"):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.mode = mode
        if mode == "nearest":
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        elif mode == "pixelshuffle":
            self.conv = nn.Conv2d(ch, 4 * ch, 3, padding=1)
            self.shuffle = nn.PixelShuffle(2)
            # ICNR init (Aitken et al. 2017): the 4 sub-pixel filters of each output channel start
            # equal, so at init this is exactly nearest + conv and has no checkerboard artefact
            with torch.no_grad():
                w = self.conv.weight[::4].clone()  # (C, C, 3, 3)
                self.conv.weight.copy_(w.repeat_interleave(4, dim=0))
                self.conv.bias.copy_(self.conv.bias[::4].repeat_interleave(4))
        else:
            self.conv = nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "nearest":
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)
        if self.mode == "pixelshuffle":
            return self.shuffle(self.conv(x))  # (B, 4C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)  # (B, C, 2H, 2W)


class UNet(nn.Module):
    """F(x, c_noise, emb) for images x of shape (B, in_channels, H, W); returns (B, out_channels, H, W).

    resolution is the training image size: it decides at which levels attn_resolutions puts
    attention. Other sizes divisible by 2**(len(channel_mult) - 1) also run (the net is
    convolutional), with attention then at the same levels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        resolution: int = 32,
        dropout: float = 0.0,
        upsample: str = "nearest",
        num_heads: int = 4,
        gradient_checkpointing: bool = False,
        downsample: str = "conv",
        context_dim: int = 0,
    ):
        super().__init__()
        levels = len(channel_mult)
        reachable = [resolution // 2**i for i in range(levels)]
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2**{levels - 1} for channel_mult={channel_mult}")
        missing = [r for r in attn_resolutions if r not in reachable]
        if missing:
            raise ValueError(f"attn_resolutions {missing} are never reached; this net's resolutions are {reachable}")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.levels, self.resolution, self.emb_dim = levels, resolution, 4 * model_channels
        self.gradient_checkpointing, self.context_dim = gradient_checkpointing, context_dim
        emb_dim = 4 * model_channels  # ADM/DDPM: embedding width 4x the base width

        self.embed = NoiseEmbedding(emb_dim, freq_dim=model_channels)
        self.inp = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        def block(cin, cout, res):
            return UNetBlock(cin, cout, emb_dim, dropout, res in attn_resolutions, num_heads, context_dim)

        # encoder; skip_ch records the width of every activation the decoder will concatenate
        ch, res, skip_ch = model_channels, resolution, [model_channels]
        self.enc = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.enc.append(block(ch, model_channels * mult, res))
                ch = model_channels * mult
                skip_ch.append(ch)
            if level < levels - 1:
                self.enc.append(Downsample(ch, downsample))
                res //= 2
                skip_ch.append(ch)

        # middle: res + attn, res (attention always, as in DDPM/ADM: it is cheapest here)
        self.mid = nn.ModuleList([
            UNetBlock(ch, ch, emb_dim, dropout, True, num_heads, context_dim),
            UNetBlock(ch, ch, emb_dim, dropout, False, num_heads, context_dim),
        ])

        # decoder: one more block per level than the encoder, to consume the down-sample skips
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.dec.append(block(ch + skip_ch.pop(), model_channels * mult, res))
                ch = model_channels * mult
            if level > 0:
                self.dec.append(Upsample(ch, upsample))
                res *= 2
        assert not skip_ch

        # zero output conv: F = 0 at init, i.e. the denoiser starts at its c_skip * x baseline
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def _block(self, block: UNetBlock, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        return maybe_checkpoint(self.gradient_checkpointing and self.training, block, h, emb, context, mask)

    def forward(self, x: Tensor, c_noise: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """context: (B, L, context_dim) tokens, context_mask: (B, L) bool, True on real tokens
        (None: all real); context=None skips the cross-attention (unconditional)."""
        B, _, H, W = x.shape
        f = 2 ** (self.levels - 1)
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must be divisible by {f} ({self.levels} levels)")
        if context is not None:
            if not self.context_dim:
                raise ValueError("this UNet has no cross-attention (context_dim=0) and takes no context")
            if context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
                raise ValueError(f"context must have shape ({B}, L, {self.context_dim}), got {tuple(context.shape)}")
            if context_mask is not None and (context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool):
                raise ValueError(f"context_mask must be bool of shape {tuple(context.shape[:2])}, "
                                 f"got {context_mask.dtype} {tuple(context_mask.shape)}")
        else:
            context_mask = None
        emb = self.embed(c_noise, emb, B)  # (B, emb_dim)
        h = self.inp(x)  # (B, model_channels, H, W)
        skips = [h]
        for m in self.enc:
            h = m(h) if isinstance(m, Downsample) else self._block(m, h, emb, context, context_mask)
            skips.append(h)
        for m in self.mid:
            h = self._block(m, h, emb, context, context_mask)  # (B, C_last, H/f, W/f)
        for m in self.dec:
            if isinstance(m, Upsample):
                h = m(h)
            else:
                h = self._block(m, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)
