"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

patchify (p x p conv) + fixed 2-D sin-cos positions -> depth x DiTBlock -> adaLN final layer ->
linear to p*p*C per token -> unpatchify. Every block's residual branches are gated by a
modulation that starts at zero, and so does the final linear: the net outputs 0 at init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import TokenMixer, check_attention
from .layers import NoiseEmbedding, maybe_checkpoint, modulated_layer_norm, zero_
from .packing import Pack, Segments


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """(grid*grid, dim) fixed position codes: half the channels encode the row, half the column,
    each as sin/cos at dim/4 geometric frequencies (MAE / DiT). Tokens are in row-major order."""
    return grid_positions(dim, grid, grid)


def grid_positions(dim: int, gh: int, gw: int) -> Tensor:
    """(gh*gw, dim) the codes of a gh x gw token grid, row-major: token (r, c) gets the same code on any grid."""
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")  # (gh, gw) each
    return sincos_2d(dim, rows, cols)


def sincos_2d(dim: int, rows: Tensor, cols: Tensor) -> Tensor:
    """float32 (len, dim) codes of tokens at (rows[i], cols[i]) (any shape, flattened); computed in float64."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    omega = omega.to(rows.device)

    def encode(pos: Tensor) -> Tensor:
        a = pos.to(torch.float64).flatten()[:, None] * omega[None, :]  # (len, D/4)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)  # (len, D/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (len, D)


def patch_tokens(conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    """The patchify convolution applied to packed tokens (T, p*p*C) laid out (row, column, channel)
    in each patch (networks.packing): the conv's weights as a linear map -> (T, D)."""
    w = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)  # (D, p*p*C)
    return F.linear(tokens, w.to(tokens.dtype), conv.bias.to(tokens.dtype))


def per_image_noise(c_noise: Tensor, pack: Pack) -> Tensor:
    """c_noise per packed token (T,) (what parametrizations.denoise hands a net on tokens) or per image
    (n,) -> per image."""
    c_noise = c_noise.reshape(-1) if c_noise.ndim else c_noise.expand(pack.n)
    if len(c_noise) == pack.n:
        return c_noise
    if len(c_noise) != pack.T:
        raise ValueError(f"c_noise must hold one value per image ({pack.n}) or per token ({pack.T}), "
                         f"got {len(c_noise)}")
    return c_noise[pack.first]


def modulation(ada: nn.Linear, emb: Tensor, parts: int, index: Tensor | None = None) -> tuple[Tensor, ...]:
    """adaLN's shift/scale/gate from emb (B, D): each (B, 1, D) for a batch, or (T, D) per packed token
    (index (T,): each token's image) -- every image keeps its own modulation in a pack."""
    m = ada(F.silu(emb))
    return m[:, None].chunk(parts, dim=2) if index is None else m[index].chunk(parts, dim=1)


class DiTBlock(nn.Module):
    """x + gate * attn(adaLN(x)), then x + gate * mlp(adaLN(x)); shift/scale/gate come from emb.
    adaLN = LayerNorm without affine (eps 1e-6) modulated by (shift, scale): layers.modulated_layer_norm.
    attn is the token mixer (attention.py: softmax, linear or gau)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | bool | None = None,
                 attention: str = "softmax", feature_map: str = "relu", chunk_size: int = 64):
        super().__init__()
        self.attn = TokenMixer(hidden, num_heads, qk_norm, attention, feature_map, chunk_size)  # one fused qkv linear
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)  # emb -> shift, scale, gate for attn and mlp

    def forward(self, x: Tensor, emb: Tensor, seg: Segments | None = None, index: Tensor | None = None,
                backend: str | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x (B, N, D) (key_mask (B, N): the real tokens of padded images), or packed (T, D) with seg (attention
        inside each image) and index (T,) (each token's image)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation(self.ada, emb, 6, index)  # (B, 1, D) | (T, D)
        x = x + gate_a * self.attn(modulated_layer_norm(x, shift_a, scale_a), seg, backend, key_mask)  # (B, N, D)
        return x + gate_m * self.mlp(modulated_layer_norm(x, shift_m, scale_m))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its p*p*C patch values."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.ada = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, emb: Tensor, index: Tensor | None = None) -> Tensor:
        shift, scale = modulation(self.ada, emb, 2, index)  # (B, 1, D) | (T, D)
        return self.linear(modulated_layer_norm(x, shift, scale))  # (B, N, p*p*C) | (T, p*p*C)


class DiT(nn.Module):
    """F(x, c_noise, emb) for x of shape (B, in_channels, H, W), e.g. 32x32x4 latents: input_size is the size
    it is built for (its stored position codes); any H and W that are multiples of patch_size work, with the
    codes of their own grid (token (r, c) gets the same code on every grid).

    Packed (networks.packing): F(tokens, c_noise, emb, pack=pack) for tokens (T, p*p*C) of pack.n images of
    their own sizes, c_noise per image (n,) or per token (T,), emb (n, D): returns (T, p*p*C), each image
    exactly as its own forward would (attention stays inside each image; positions, noise level and
    modulation are the image's own).

    attention: the token mixer, softmax | linear | gau (networks.attention); feature_map: linear
    attention's relu | elu (+1); chunk_size: GAU's chunk length in tokens.
    """

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
        attention: str = "softmax",
        feature_map: str = "relu",
        chunk_size: int = 64,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        check_attention(attention, feature_map, chunk_size)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.gradient_checkpointing, self.emb_dim = gradient_checkpointing, hidden_size
        self.hidden_size, self.attention = hidden_size, attention
        self.grid = input_size // patch_size

        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # fixed, so a buffer recomputed from the config rather than stored in checkpoints
        self.register_buffer("pos", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)  # (1, N, D)
        self.embed = NoiseEmbedding(hidden_size, freq_dim=256)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, attention, feature_map,
                                              chunk_size) for _ in range(depth)])
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

    def positions(self, gh: int, gw: int) -> Tensor:
        """(1, gh*gw, D) row-major sin-cos codes of a gh x gw grid (the buffer for the built size)."""
        if gh == gw == self.grid:
            return self.pos
        return grid_positions(self.hidden_size, gh, gw)[None].to(self.pos)

    def unpatchify(self, x: Tensor, gh: int | None = None, gw: int | None = None) -> Tensor:
        """(B, N, p*p*C) -> (B, C, gh*p, gw*p), with token n = row * gw + col (default: the built grid)."""
        B, p, C = x.shape[0], self.patch_size, self.in_channels
        gh = self.grid if gh is None else gh
        gw = self.grid if gw is None else gw
        x = x.reshape(B, gh, gw, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, gh * p, gw * p)

    def forward(self, x: Tensor, c_noise: Tensor, emb: Tensor | None = None, pack: Pack | None = None,
                backend: str | None = None, token_mask: Tensor | None = None) -> Tensor:
        """token_mask (B, gh, gw) bool: padded-to-max batches, the tokens of each image (the others are not
        attended to; their outputs are meaningless). Packing avoids padding instead (pack=...)."""
        if pack is not None:
            return self.forward_packed(x, c_noise, emb, pack, backend)
        B, C, H, W = x.shape
        p = self.patch_size
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"DiT expects inputs (B, {self.in_channels}, H, W) with H and W multiples of the patch "
                             f"size {p} (built for {self.input_size}x{self.input_size}), got {tuple(x.shape)}")
        gh, gw = H // p, W // p
        emb = self.embed(c_noise, emb, B)  # (B, D)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.positions(gh, gw).to(x.dtype)  # (B, N, D), N = gh*gw
        mask = None if token_mask is None else token_mask.reshape(B, gh * gw)
        for block in self.blocks:
            h = maybe_checkpoint(self.gradient_checkpointing and self.training, block, h, emb, None, None, None, mask)
        return self.unpatchify(self.final(h, emb), gh, gw)  # (B, C, H, W)

    def forward_packed(self, tokens: Tensor, c_noise: Tensor, emb: Tensor | None, pack: Pack,
                       backend: str | None = None) -> Tensor:
        """tokens (T, p*p*C) of the images of `pack` -> (T, p*p*C) (class docstring)."""
        p, C = self.patch_size, self.in_channels
        if pack.patch_size != p or tokens.shape != (pack.T, p * p * C):
            raise ValueError(f"packed DiT input must be (T={pack.T}, {p * p * C}) tokens of patch size {p}, got "
                             f"{tuple(tokens.shape)} at patch size {pack.patch_size}")
        pack = pack.to(tokens.device)
        e = self.embed(per_image_noise(c_noise, pack), emb, pack.n)  # (n, D)
        pos = sincos_2d(self.hidden_size, pack.pos[:, 0], pack.pos[:, 1]).to(tokens)  # (T, D)
        h = patch_tokens(self.patch, tokens) + pos  # (T, D)
        for block in self.blocks:
            h = maybe_checkpoint(self.gradient_checkpointing and self.training, block, h, e, pack.segments,
                                 pack.image, backend)
        return self.final(h, e, pack.image)  # (T, p*p*C)
