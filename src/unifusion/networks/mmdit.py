"""SD3's multimodal diffusion transformer, MM-DiT (Esser et al. 2024, §4 and Fig. 2).

Image patches and text tokens are two streams, each with its own weights (adaLN modulation,
QKV, QK RMSNorm, output projection, MLP), that meet in one attention over the concatenated
sequence [image tokens, text tokens]; padding text tokens are masked out as keys. Both streams
are modulated by one vector, the timestep embedding plus the projected pooled text embedding.
The last block computes only the text keys and values (the text stream's output would never be
used), as SD3 does (context_pre_only). adaLN-Zero gates and a zero final linear: F = 0 at init.

    patchify + 2-D sin-cos positions -> depth x JointBlock -> adaLN final layer -> unpatchify

The joint attention is the token mixer `attention` (networks.attention: softmax, linear or gau) over
both streams' tokens. Packed (networks.packing), each image attends to its own tokens and its own
caption's real tokens only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import GAUProjections, check_attention, mix
from .dit import (FinalLayer, grid_positions, modulation, patch_tokens, per_image_noise, sincos_2d,
                  sincos_pos_embed_2d)
from .layers import NoiseEmbedding, maybe_checkpoint, modulated_layer_norm, qk_norm_layer, zero_
from .packing import Pack, Segments
from .text import masked_attention


class Stream(nn.Module):
    """One stream's weights in a joint block. `output=False` (the text stream of the last block)
    keeps only what the image tokens need from it: the modulated norm, keys and values.
    attention "gau": the stream's gated-attention-unit projections (attention.GAUProjections) instead of
    qkv / norms / proj (softmax and linear attention share those)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qk_norm, output: bool = True,
                 attention: str = "softmax"):
        super().__init__()
        self.output, self.num_heads, self.head_dim = output, num_heads, hidden // num_heads
        self.gau_mixer = attention == "gau"
        self.ada = nn.Linear(hidden, (6 if output else 2) * hidden)  # (shift, scale[, gate]) for attn [and mlp]
        if self.gau_mixer:
            self.gau = GAUProjections(hidden, queries=output, output=output)
        else:
            self.qkv = nn.Linear(hidden, (3 if output else 2) * hidden)  # q, k, v (or k, v)
            self.q_norm = qk_norm_layer(qk_norm, self.head_dim) if output else None
            self.k_norm = qk_norm_layer(qk_norm, self.head_dim)
            if output:
                self.proj = nn.Linear(hidden, hidden)
        if output:
            width = int(hidden * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))

    def pre(self, x: Tensor, emb: Tensor, index: Tensor | None = None
            ) -> tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, ...]]:
        """(q or None, k, v) and the mlp-side modulation for post(). Batched x (B, N, C): each (B, heads, N, d).
        Packed x (T, C) with index (T,) (each token's image): each (T, heads, d). GAU: heads are GAU's
        [quad, lin] parts for q and k, 1 for v; its gate u rides at the end of the modulation."""
        packed = index is not None
        mods = modulation(self.ada, emb, 6 if self.output else 2, index)  # each (B, 1, C) | (T, C)
        h = modulated_layer_norm(x, mods[0], mods[1])  # adaLN (LayerNorm eps 1e-6, no affine)
        if self.gau_mixer:
            q, k, v, u = self.gau(h)  # (..., N, 2 | 1, width)
            if not packed:
                q, k, v = (None if t is None else t.transpose(1, 2) for t in (q, k, v))
            return q, k, v, (*mods[2:], u)
        lead = x.shape[:-1]
        parts = self.qkv(h).reshape(*lead, -1, self.num_heads, self.head_dim)
        parts = parts.unbind(-3) if packed else parts.permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = parts if self.output else (None, *parts)
        # norms may run in float32 under autocast; SDPA wants q, k, v in one dtype
        k = self.k_norm(k).to(v.dtype)
        q = None if q is None else self.q_norm(q).to(v.dtype)
        return q, k, v, mods[2:]

    def post(self, x: Tensor, out: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """x + gate * proj(attention output), then x + gate * mlp(adaLN(x)); out is (B, heads, N, d), or
        (T, heads, d) for packed x (T, C)."""
        gate_a, shift_m, scale_m, gate_m = mods[:4]
        if x.ndim == 3:
            out = out.transpose(1, 2)  # (B, N, heads, d)
        if self.gau_mixer:
            a = self.gau.proj(mods[4] * out[..., 0, :])
        else:
            a = self.proj(out.reshape(x.shape))
        x = x + gate_a * a  # (B, N, C)
        return x + gate_m * self.mlp(modulated_layer_norm(x, shift_m, scale_m))  # (B, N, C)


class JointBlock(nn.Module):
    """An image stream and (when the net has text) a text stream, one attention over both.
    context_out=False: the text stream is key/value-only and the block returns context None."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qk_norm, has_context: bool, context_out: bool,
                 attention: str = "softmax", feature_map: str = "relu", chunk_size: int = 64):
        super().__init__()
        self.attention, self.mix_args = attention, {"feature_map": feature_map, "chunk_size": chunk_size}
        self.x = Stream(hidden, num_heads, mlp_ratio, qk_norm, attention=attention)
        self.c = (Stream(hidden, num_heads, mlp_ratio, qk_norm, output=context_out, attention=attention)
                  if has_context else None)

    def _mix(self, q, k, v, key_mask):
        """Batched (B, h, N, d) in and out."""
        if self.attention == "softmax":
            return masked_attention(q, k, v, key_mask)
        out = mix(self.attention, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask=key_mask,
                  **self.mix_args)
        return out.transpose(1, 2)

    def forward(self, x: Tensor, c: Tensor | None, emb: Tensor, c_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        qx, kx, vx, mods_x = self.x.pre(x, emb)  # (B, h, N, d) each
        if c is None:  # unconditional: the image tokens attend to themselves
            return self.x.post(x, self._mix(qx, kx, vx, None), mods_x), None
        N = x.shape[1]
        qc, kc, vc, mods_c = self.c.pre(c, emb)  # (B, h, L, d) each; qc None in the last block
        q = qx if qc is None else torch.cat([qx, qc], dim=2)  # (B, h, N [+ L], d)
        k, v = torch.cat([kx, kc], dim=2), torch.cat([vx, vc], dim=2)  # (B, h, N + L, d)
        key_mask = None
        if c_mask is not None:  # image keys always count, padding text keys never
            key_mask = torch.cat([c_mask.new_ones(c_mask.shape[0], N), c_mask], dim=1)  # (B, N + L)
        out = self._mix(q, k, v, key_mask)  # (B, h, N [+ L], d)
        x = self.x.post(x, out[:, :, :N], mods_x)
        c = self.c.post(c, out[:, :, N:], mods_c) if self.c.output else None
        return x, c

    def forward_packed(self, x: Tensor, c: Tensor | None, emb: Tensor, index_x: Tensor, index_c: Tensor | None,
                       seg: Segments, backend: str | None = None) -> tuple[Tensor, Tensor | None]:
        """Packed: x (T, D) image tokens, c (Tc, D) the real caption tokens, index_* each token's image; seg
        the joint segments of [image tokens, caption tokens]."""
        qx, kx, vx, mods_x = self.x.pre(x, emb, index_x)  # (T, h, d) each
        T = x.shape[0]
        if c is None:
            return self.x.post(x, mix(self.attention, qx, kx, vx, seg, backend=backend, **self.mix_args), mods_x), None
        qc, kc, vc, mods_c = self.c.pre(c, emb, index_c)
        q = qx if qc is None else torch.cat([qx, qc])
        k, v = torch.cat([kx, kc]), torch.cat([vx, vc])
        out = mix(self.attention, q, k, v, seg if qc is not None else seg.queries_prefix(T), backend=backend,
                  **self.mix_args)
        x = self.x.post(x, out[:T], mods_x)
        c = self.c.post(c, out[T:], mods_c) if self.c.output else None
        return x, c


class MMDiT(nn.Module):
    """F(x, c_noise, emb=None, context=None, context_mask=None) for x (B, in_channels, H, W).

    emb: (B, emb_dim) pooled text vector; context: (B, L, context_dim) text tokens with
    context_mask (B, L) bool, True on real tokens (None: all real). H and W need only be
    multiples of patch_size: positions are computed from the actual grid (input_size is the
    size the net is built for). context_dim = 0 builds an image-only net (no text stream).

    Packed: F(tokens, c_noise, emb, context, context_mask, pack=pack) for tokens (T, p*p*C) of pack.n
    images (networks.packing), c_noise per image or per token, emb (n, emb_dim), context (n, L, context_dim)
    -> (T, p*p*C), each image as its own forward. attention / feature_map / chunk_size: as DiT's.
    """

    def __init__(
        self,
        input_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 256,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        context_dim: int = 128,
        emb_dim: int = 128,
        qk_norm: str | bool | None = True,
        gradient_checkpointing: bool = False,
        attention: str = "softmax",
        feature_map: str = "relu",
        chunk_size: int = 64,
    ):
        super().__init__()
        check_attention(attention, feature_map, chunk_size)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads={num_heads}")
        if emb_dim < 1 or context_dim < 0:
            raise ValueError(f"emb_dim must be >= 1 and context_dim >= 0, got {emb_dim}, {context_dim}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.emb_dim, self.context_dim = hidden_size, emb_dim, context_dim
        self.gradient_checkpointing = gradient_checkpointing
        grid = input_size // patch_size

        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # fixed positions of the built size as a buffer (moves with .to()); other sizes are computed
        self.register_buffer("pos", sincos_pos_embed_2d(hidden_size, grid)[None], persistent=False)  # (1, N, D)
        self.embed = NoiseEmbedding(hidden_size, freq_dim=256)  # sinusoid(c_noise) -> MLP
        # SD3: the pooled text vector through its own MLP, added to the timestep embedding
        self.pooled = nn.Sequential(nn.Linear(emb_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.context_in = nn.Linear(context_dim, hidden_size) if context_dim else None  # SD3's context_embedder
        self.blocks = nn.ModuleList([
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, has_context=context_dim > 0,
                       context_out=i < depth - 1, attention=attention, feature_map=feature_map, chunk_size=chunk_size)
            for i in range(depth)])
        self.final = FinalLayer(hidden_size, patch_size, in_channels)
        self._init_weights()

    def _init_weights(self):
        """DiT's init: xavier-uniform linears and patchify, then adaLN-Zero (every stream's
        modulation and the final layer at zero): each block is the identity and F = 0."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        for m in self.blocks.modules():
            if isinstance(m, Stream):
                zero_(m.ada)
        zero_(self.final.ada)
        zero_(self.final.linear)

    def positions(self, gh: int, gw: int) -> Tensor:
        """(1, gh*gw, D) row-major sin-cos codes: token (r, c) gets the same code on any grid."""
        if self.pos.shape[1] == gh * gw and gh == gw == self.input_size // self.patch_size:
            return self.pos
        return grid_positions(self.hidden_size, gh, gw)[None].to(self.pos)  # device and dtype of the buffer

    def unpatchify(self, x: Tensor, gh: int, gw: int) -> Tensor:
        """(B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p), with token n = row * gw + col."""
        B, p, C = x.shape[0], self.patch_size, self.in_channels
        x = x.reshape(B, gh, gw, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, gh * p, gw * p)

    def forward(self, x: Tensor, c_noise: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, pack: Pack | None = None, backend: str | None = None) -> Tensor:
        if pack is not None:
            return self.forward_packed(x, c_noise, emb, context, context_mask, pack, backend)
        B, C, H, W = x.shape
        p = self.patch_size
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"MMDiT expects inputs (B, {self.in_channels}, H, W) with H, W multiples of {p}, "
                             f"got {tuple(x.shape)}")
        if emb is not None and emb.shape != (B, self.emb_dim):
            raise ValueError(f"emb must have shape ({B}, {self.emb_dim}), got {tuple(emb.shape)}")
        if context is not None:
            if not self.context_dim or context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
                raise ValueError(f"context must have shape ({B}, L, {self.context_dim}) "
                                 f"{'(this net has no text stream: context_dim=0)' if not self.context_dim else ''}"
                                 f", got {tuple(context.shape)}")
            if context_mask is not None and (context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool):
                raise ValueError(f"context_mask must be bool of shape {tuple(context.shape[:2])}, "
                                 f"got {context_mask.dtype} {tuple(context_mask.shape)}")
        gh, gw = H // p, W // p
        e = self.embed(c_noise, None if emb is None else self.pooled(emb), B)  # (B, D)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.positions(gh, gw).to(x.dtype)  # (B, N, D)
        c = None if context is None else self.context_in(context)  # (B, L, D)
        mask = None if context is None else context_mask
        for block in self.blocks:
            h, c = maybe_checkpoint(self.gradient_checkpointing and self.training, block, h, c, e, mask)
        return self.unpatchify(self.final(h, e), gh, gw)  # (B, C, H, W)

    def forward_packed(self, tokens: Tensor, c_noise: Tensor, emb: Tensor | None, context: Tensor | None,
                       context_mask: Tensor | None, pack: Pack, backend: str | None = None) -> Tensor:
        """tokens (T, p*p*C) of the images of `pack` -> (T, p*p*C) (class docstring)."""
        p, C, n = self.patch_size, self.in_channels, pack.n
        if pack.patch_size != p or tokens.shape != (pack.T, p * p * C):
            raise ValueError(f"packed MMDiT input must be (T={pack.T}, {p * p * C}) tokens of patch size {p}, got "
                             f"{tuple(tokens.shape)} at patch size {pack.patch_size}")
        if emb is not None and emb.shape != (n, self.emb_dim):
            raise ValueError(f"emb must have shape ({n}, {self.emb_dim}), got {tuple(emb.shape)}")
        pack = pack.to(tokens.device)
        e = self.embed(per_image_noise(c_noise, pack), None if emb is None else self.pooled(emb), n)  # (n, D)
        h = patch_tokens(self.patch, tokens) + sincos_2d(self.hidden_size, pack.pos[:, 0], pack.pos[:, 1]).to(tokens)
        c, index_c, seg = None, None, pack.segments
        if context is not None:
            if not self.context_dim or context.ndim != 3 or context.shape[0] != n or context.shape[2] != self.context_dim:
                raise ValueError(f"context must have shape ({n}, L, {self.context_dim}), got {tuple(context.shape)}")
            mask = (context_mask if context_mask is not None
                    else torch.ones(context.shape[:2], dtype=torch.bool, device=context.device))
            c = self.context_in(context[mask])  # (Tc, D): only the real caption tokens travel in the pack
            index_c = torch.arange(n, device=tokens.device).repeat_interleave(mask.sum(1))
            local_c = (mask.long().cumsum(1) - 1)[mask] + pack.lengths.to(tokens.device)[index_c]
            seg = Segments(torch.cat([pack.image, index_c]), torch.cat([pack.local, local_c]), n)
        for block in self.blocks:
            h, c = maybe_checkpoint(self.gradient_checkpointing and self.training, block.forward_packed, h, c, e,
                                    pack.image, index_c, seg, backend)
        return self.final(h, e, pack.image)  # (T, p*p*C)
