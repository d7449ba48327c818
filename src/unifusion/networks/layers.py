"""Pieces shared by the MLP, UNet and DiT: noise embedding, attention, norms, init helpers.

A network here sees a noise label c_noise and never what it means: it may be a DDPM step index
(0..999), a continuous time t in [0, 1], or EDM's ln(sigma)/4 (about -1.6..1.2). The sinusoidal
embedding below is therefore built to resolve all of these ranges at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def sinusoidal_embedding(c_noise: Tensor, dim: int, min_freq: float = 1e-4, max_freq: float = 10.0) -> Tensor:
    """(B,) -> (B, dim): [cos(f_k c), sin(f_k c)] with dim/2 frequencies geometric in [min_freq, max_freq].

    Transformer positional encoding (Vaswani et al. 2017) as used by DDPM/ADM, but with the top
    frequency raised from 1 to 10: periods then run from ~0.6 (so t in [0, 1] and ln(sigma)/4
    are resolved finely) to ~63000 (so step indices up to 1000 still map monotonically through
    the slowest components). The learned MLP after it picks whichever components carry signal.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), half, device=c_noise.device))
    # at least float32 whatever the caller's dtype: bf16 would round c_noise = 999 to 1000
    dtype = torch.promote_types(c_noise.dtype, torch.float32)
    args = c_noise.to(dtype)[:, None] * freqs.to(dtype)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class NoiseEmbedding(nn.Module):
    """emb = MLP(sinusoid(c_noise)) (+ a conditioning vector): the one vector every block is
    conditioned on. The conditioning vector (B, emb_dim) comes from the model's conditioning
    module (a class table, a pooled text embedding, ...); the network never sees labels."""

    def __init__(self, emb_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim, self.emb_dim = freq_dim, emb_dim
        self.noise_mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, c_noise: Tensor, emb: Tensor | None, batch: int) -> Tensor:
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise ValueError(f"c_noise must have shape ({batch},), got {tuple(c_noise.shape)}")
        freq = sinusoidal_embedding(c_noise, self.freq_dim)  # (B, freq_dim)
        out = self.noise_mlp(freq.to(self.noise_mlp[0].weight.dtype))  # (B, emb_dim), in the net's dtype
        if emb is None:
            return out
        if emb.shape != (batch, self.emb_dim):
            raise ValueError(f"conditioning embedding must have shape ({batch}, {self.emb_dim}), got {tuple(emb.shape)}")
        return out + emb.to(out.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive normalisation: x * (1 + scale) + shift, so zero modulation is the identity."""
    return x * (1 + scale) + shift


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN (DiT): LayerNorm over the last axis without affine, then x * (1 + scale) + shift, i.e.
    modulate(layer_norm(x), shift, scale). Two kernels in eager (layer_norm, one addcmul; the
    (B, 1, D) 1 + scale is tiny) instead of three full-size ones; one reduction under torch.compile.
    Under autocast the result is float32, as layer_norm's is (addcmul promotes: only the small shift
    and scale are cast). The gated residual x + gate * f(...) stays a multiply and an add: an addcmul
    there would make autocast cast the whole bf16 branch to float32 first."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def group_norm(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with 32 groups where possible, fewer for narrow layers (EDM's rule), so tiny
    nets do not degenerate to instance norm (one channel per group)."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last axis (Zhang & Sennrich 2019); nn.RMSNorm needs torch>=2.4."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # at least float32 (bf16 / fp16 inputs under autocast), float64 kept as float64
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def qk_norm_layer(kind: str | bool | None, head_dim: int) -> nn.Module:
    """The per-head norm applied to q and k (ViT-22B, SD3): keeps attention logits bounded."""
    if kind in (None, False):
        return nn.Identity()
    if kind is True or kind == "rms":
        return RMSNorm(head_dim)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    raise ValueError(f"qk_norm must be False, True, 'rms' or 'layer', got {kind!r}")


class Attention(nn.Module):
    """Multi-head self-attention on tokens (B, N, C) through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | bool | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = qk_norm_layer(qk_norm, self.head_dim)
        self.k_norm = qk_norm_layer(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        # norms may run in float32 under autocast; SDPA wants q, k, v in one dtype
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter: the layer then contributes nothing at init (identity residual path)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(enabled: bool, fn, *args):
    """Run fn(*args), recomputing its activations in the backward pass when enabled and training.

    Trades one extra forward of the block for not storing its activations (Chen et al. 2016);
    a no-op at inference, where nothing is stored anyway.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def use_tf32(device) -> None:
    """On CUDA, float32 matmuls (cuBLAS) and convolutions (cuDNN) in TF32: fp32 accumulation over
    inputs rounded to a 10-bit mantissa, several times the fp32 throughput on Ampere and later (what
    torchtitan, EDM2 and timm train with). The training loop and the GPU benchmark call it for a
    CUDA device; bf16 / fp16 autocast and every CPU computation are unaffected. The legacy flags, not
    the fp32_precision API: torch refuses to read the one after the other was set, and torch's own
    code still reads allow_tf32."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
