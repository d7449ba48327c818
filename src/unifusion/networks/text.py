"""The two towers of a small CLIP / SigLIP encoder (Radford et al. 2021): a text transformer and an
image CNN, each ending in a projection to the shared contrastive space.

TextTransformer: token + learned position embeddings -> layers x pre-LN block (bidirectional
self-attention with a key-padding mask, MLP) -> final LayerNorm. It returns the token sequence
(the context of a cross-attention / MM-DiT denoiser) and the pooled vector, the final state at the
EOS token (the last real one; CLIP pools at EOS too). Padding positions are never attended to and
their outputs are zero, so nothing about padding reaches the outputs.

ImageEncoder: coordinate channels + stride-2 conv stages down to a 4x4 map, flattened (not averaged)
into the embedding: "left", "above", "small" need where things are, which global average pooling
throws away.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import group_norm


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the keys where key_mask is True.
    q: (B, heads, N, d); k, v: (B, heads, M, d); key_mask: (B, M) bool or None (all keys)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M): broadcast over heads, queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention on (B, L, C) tokens whose padding keys are masked out."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        out = masked_attention(q, k, v, mask)  # (B, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class TextBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MaskedSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)  # (B, L, width)
        return x + self.mlp(self.norm2(x))  # (B, L, width)


class TextTransformer(nn.Module):
    """forward(ids (B, L) long, mask (B, L) bool) -> (tokens (B, L, width), pooled (B, width));
    project(pooled) -> (B, embed_dim), the contrastive embedding. mask is True on real tokens
    (BOS ... EOS, as unifusion.data.tokenizer encodes them) and may be None (no padding)."""

    def __init__(self, vocab_size: int, context_length: int = 32, width: int = 128, layers: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, embed_dim: int = 128):
        super().__init__()
        self.vocab_size, self.context_length, self.width, self.embed_dim = vocab_size, context_length, width, embed_dim
        self.token = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)  # CLIP's text_projection
        # CLIP's init scales: small token / position tables, projections ~ width^-1/2
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, L = ids.shape
        if L > self.context_length:
            raise ValueError(f"{L} tokens exceed the text encoder's context length {self.context_length}")
        if mask is not None and (mask.shape != ids.shape or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor shaped like ids {tuple(ids.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        h = self.token(ids) + self.pos[:L]  # (B, L, width)
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)  # (B, L, width)
        if mask is None:
            last = torch.full((B,), L - 1, device=ids.device)
        else:
            h = h * mask[..., None].to(h.dtype)  # padding outputs are exactly zero
            last = (mask * torch.arange(L, device=ids.device)).argmax(dim=1)  # (B,) the last real token: EOS
        pooled = h[torch.arange(B, device=ids.device), last]  # (B, width)
        return h, pooled

    def project(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)  # (B, embed_dim)


def coordinate_channels(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C + 2, H, W): append x and y in [-1, 1] (CoordConv, Liu et al. 2018)."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)[None, None, :, None].expand(B, 1, H, W)
    xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)[None, None, None, :].expand(B, 1, H, W)
    return torch.cat([x, xs, ys], dim=1)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), group_norm(cout), nn.SiLU())


class ImageEncoder(nn.Module):
    """forward(images (B, in_channels, resolution, resolution)) -> (B, embed_dim).

    stem conv (with coordinate channels) -> one stage per halving down to 4x4 (stride-2 conv, conv;
    channels base * 1, 2, 4, 4, ...) -> flatten the 4x4 map -> LayerNorm -> linear."""

    FINAL = 4  # side of the last feature map

    def __init__(self, in_channels: int = 3, resolution: int = 32, base_channels: int = 32, embed_dim: int = 128):
        super().__init__()
        stages = round(math.log2(resolution / self.FINAL))
        if resolution != self.FINAL * 2 ** stages or stages < 1:
            raise ValueError(f"resolution must be 4 * 2^k with k >= 1 (8, 16, 32, 64, ...), got {resolution}")
        self.in_channels, self.resolution, self.embed_dim = in_channels, resolution, embed_dim
        layers, ch = [_conv(in_channels + 2, base_channels)], base_channels
        for s in range(stages):
            out = base_channels * min(2 ** s, 4)
            layers += [_conv(ch, out, stride=2), _conv(out, out)]  # halve, then mix
            ch = out
        self.features = nn.Sequential(*layers)
        flat = ch * self.FINAL * self.FINAL
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(flat), nn.Linear(flat, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        if (C, H, W) != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(f"ImageEncoder expects images (B, {self.in_channels}, {self.resolution}, "
                             f"{self.resolution}), got {tuple(x.shape)}")
        h = self.features(coordinate_channels(x))  # (B, ch, 4, 4)
        return self.head(h)  # (B, embed_dim)


# name -> (class, kwargs) of the encoder towers; TextTransformer also needs vocab_size (the tokenizer's).
# Params: text-s 0.81M + 128 x vocab (0.82M on the shapes captions' 25 ids), imgenc-32 0.56M, imgenc-64 0.86M;
# text-s + imgenc-32 = 1.4M.
TEXT_PRESETS: dict[str, tuple[type[nn.Module], dict]] = {
    "text-s": (TextTransformer, dict(context_length=32, width=128, layers=4, heads=4, mlp_ratio=4.0, embed_dim=128)),
    "imgenc-32": (ImageEncoder, dict(in_channels=3, resolution=32, base_channels=32, embed_dim=128)),
    "imgenc-64": (ImageEncoder, dict(in_channels=3, resolution=64, base_channels=32, embed_dim=128)),
}

__all__ = ["TextTransformer", "ImageEncoder", "TEXT_PRESETS", "masked_attention", "coordinate_channels"]
