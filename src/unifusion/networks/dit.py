"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

patchify (p x p conv) + fixed 2-D sin-cos positions -> depth x DiTBlock -> adaLN final layer ->
linear to p*p*C per token -> unpatchify. Every block's residual branches are gated by a
modulation that starts at zero, and so does the final linear: the net outputs 0 at init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, NoiseEmbedding, maybe_checkpoint, modulate, zero_


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """(grid*grid, dim) fixed position codes: half the channels encode the row, half the column,
    each as sin/cos at dim/4 geometric frequencies (MAE / DiT). Tokens are in row-major order."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")  # (G, G) each

    def encode(pos: Tensor) -> Tensor:
        a = pos.flatten()[:, None] * omega[None, :]  # (G*G, D/4)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)  # (G*G, D/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (G*G, D)


class DiTBlock(nn.Module):
    """x + gate * attn(adaLN(x)), then x + gate * mlp(adaLN(x)); shift/scale/gate come from emb."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | bool | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)  # emb -> shift, scale, gate for attn and mlp

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(F.silu(emb))[:, None].chunk(6, dim=2)  # (B, 1, D)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (B, N, D)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its p*p*C patch values."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = self.ada(F.silu(emb))[:, None].chunk(2, dim=2)  # (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class DiT(nn.Module):
    """F(x, c_noise, emb) for x of shape (B, in_channels, input_size, input_size), e.g. 32x32x4 latents."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qk_norm: str | bool | None = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.gradient_checkpointing, self.emb_dim = gradient_checkpointing, hidden_size
        self.grid = input_size // patch_size

        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # fixed, so a buffer recomputed from the config rather than stored in checkpoints
        self.register_buffer("pos", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)  # (1, N, D)
        self.embed = NoiseEmbedding(hidden_size, freq_dim=256)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, patch_size, in_channels)
        self._init_weights()

    def _init_weights(self):
        """DiT's init: xavier-uniform linears and patchify, then adaLN-Zero (all modulation and
        the final linear at zero), so every block is the identity and the output is 0."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))  # as a linear map
        nn.init.zeros_(self.patch.bias)
        for block in self.blocks:
            zero_(block.ada)
        zero_(self.final.ada)
        zero_(self.final.linear)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, G*p, G*p), with token n = row * G + col."""
        B, G, p, C = x.shape[0], self.grid, self.patch_size, self.in_channels
        x = x.reshape(B, G, G, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, G * p, G * p)

    def forward(self, x: Tensor, c_noise: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        if (C, H, W) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"DiT expects inputs (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        emb = self.embed(c_noise, emb, B)  # (B, D)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D), N = G*G
        for block in self.blocks:
            h = maybe_checkpoint(self.gradient_checkpointing and self.training, block, h, emb)
        return self.unpatchify(self.final(h, emb))  # (B, C, H, W)
