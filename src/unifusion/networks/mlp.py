"""Residual MLP for low-dimensional toy data (2-D mixtures, moons, spirals)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import NoiseEmbedding, modulate, zero_


class MLPBlock(nn.Module):
    """h + W2 SiLU(W1 adaLN(h, emb)); W2 starts at zero so the block starts as the identity."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ada = nn.Linear(emb_dim, 2 * hidden)  # emb -> (shift, scale)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = zero_(nn.Linear(hidden, hidden))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        shift, scale = self.ada(F.silu(emb)).chunk(2, dim=1)  # each (B, hidden)
        return h + self.fc2(F.silu(self.fc1(modulate(self.norm(h), shift, scale))))


class MLP(nn.Module):
    """F(x, c_noise, emb) for x of shape (B, dim)."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, emb_dim: int = 128):
        super().__init__()
        self.dim, self.emb_dim = dim, emb_dim
        self.embed = NoiseEmbedding(emb_dim, freq_dim=emb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([MLPBlock(hidden, emb_dim) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, c_noise: Tensor, emb: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, emb, x.shape[0])  # (B, emb_dim)
        h = self.inp(x)  # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)  # (B, hidden)
        return self.out(F.silu(self.out_norm(h)))  # (B, dim)
