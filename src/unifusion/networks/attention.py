"""Token mixers of the diffusion transformers, chosen by `attention` (`--network.attention`):

    softmax  multi-head softmax attention (scaled_dot_product_attention): O(N^2) time and memory.
    linear   multi-head linear attention (Katharopoulos et al. 2020; SANA, Xie et al. 2024):
             o_t = phi(q_t)^T S / (phi(q_t)^T z),  S = sum_s phi(k_s) v_s^T,  z = sum_s phi(k_s)
             with phi = ReLU (SANA) or elu + 1 (`feature_map`); O(N d^2), no N x N matrix.
    gau      the gated attention unit of FLASH (Hua et al. 2022, "Transformer Quality in Linear Time") with
             its mixed chunk attention: u = silu(W_u x), v = silu(W_v x), z = silu(W_z x) (width s); per-dim
             scale and offset of z give q_quad, k_quad, q_lin, k_lin; the tokens of an image are cut into
             chunks of `chunk_size` (in their row-major order) and
                 o = u * (relu(q_quad k_quad^T / sqrt(s))^2 / c) v    inside each chunk (quadratic, local)
                   + u * q_lin (sum_s k_lin v^T) / N                  over the whole image (linear, global)
             then W_o. Expansion e = hidden and s = min(128, hidden), so it has softmax attention's 4 D^2
             weights when D <= 128 (3 D^2 + D s). FLASH's relative position bias is left out: the tokens
             carry their 2-D sin-cos positions.

Each works on a batch (B, N, heads, d) and on packed tokens (T, heads, d) whose attention is kept inside
each image (`packing.Segments`); the packed forms of linear attention and GAU batch the segments of equal
length (as the grouped softmax backend does), so nothing is quadratic in the packed length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import qk_norm_layer
from .packing import Segments, attend

ATTENTIONS = ("softmax", "linear", "gau")
FEATURE_MAPS = ("relu", "elu")
LINEAR_EPS = 1e-15  # SANA's: a ReLU query whose features are all zero gets output 0, not NaN


def check_attention(kind: str, feature_map: str = "relu", chunk_size: int = 64) -> None:
    if kind not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {kind!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)} (linear attention), got {feature_map!r}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (GAU's chunks, in tokens), got {chunk_size!r}")


def gau_widths(dim: int) -> tuple[int, int]:
    """(e, s): GAU's value/gate width and its shared q/k width."""
    return dim, min(128, dim)


class GAUProjections(nn.Module):
    """The weights of one stream's gated attention unit: W_{u,v,z} fused (u only with queries), the four
    per-dim scales/offsets of z, and W_o (only with output)."""

    def __init__(self, dim: int, queries: bool = True, output: bool = True):
        super().__init__()
        e, s = gau_widths(dim)
        self.e, self.s, self.queries = e, s, queries
        self.uvz = nn.Linear(dim, (2 * e if queries else e) + s)
        self.gamma = nn.Parameter(torch.randn(4, s) * 0.02)  # FLASH's ScaleOffset init
        self.beta = nn.Parameter(torch.zeros(4, s))
        self.proj = nn.Linear(e, dim) if output else None

    def forward(self, h: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
        """h (..., D) -> q (..., 2, s) [quad, lin] or None, k (..., 2, s), v (..., 1, e), u (..., e) or None."""
        e, s = self.e, self.s
        parts = F.silu(self.uvz(h))
        if self.queries:
            u, v, z = parts.split([e, e, s], dim=-1)
        else:
            u, (v, z) = None, parts.split([e, s], dim=-1)
        qk = z[..., None, :] * self.gamma + self.beta  # (..., 4, s): quad_q, quad_k, lin_q, lin_k
        q = qk[..., 0::2, :] if self.queries else None
        return q, qk[..., 1::2, :], v[..., None, :], u


# ---------------------------------------------------------------------------------------------- kernels
def _phi(x: Tensor, feature_map: str) -> Tensor:
    return F.relu(x) if feature_map == "relu" else F.elu(x) + 1


def _wide(x: Tensor) -> Tensor:
    """At least float32 (bf16 / fp16 under autocast: the sums of linear attention overflow or round)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _linear_core(q: Tensor, k: Tensor, v: Tensor, feature_map: str) -> Tensor:
    """q (G, Lq, h, d), k (G, Lk, h, d), v (G, Lk, h, e) -> (G, Lq, h, e): each of the G rows its own sequence."""
    pq, pk, vv = _phi(_wide(q), feature_map), _phi(_wide(k), feature_map), _wide(v)
    S = torch.einsum("glhd,glhe->ghde", pk, vv)  # (G, h, d, e)
    z = pk.sum(1)  # (G, h, d)
    num = torch.einsum("glhd,ghde->glhe", pq, S)
    den = torch.einsum("glhd,ghd->glh", pq, z)[..., None]
    return (num / (den + LINEAR_EPS)).to(v.dtype)


def _gau_core(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
    """q (G, Lq, 2, s), k (G, Lk, 2, s), v (G, Lk, 1, e), query t and key t at the same place of their sequence
    -> (G, Lq, 1, e): chunked relu^2 attention plus global linear attention (module docstring)."""
    G, Lq, _, s = q.shape
    Lk = k.shape[1]
    ve = v[:, :, 0]  # (G, Lk, e)
    kv = torch.einsum("gls,gle->gse", k[:, :, 1], ve) / Lk  # global linear part
    lin = torch.einsum("gls,gse->gle", q[:, :, 1], kv)
    n = -(-max(Lq, Lk) // chunk)
    pad = n * chunk
    # zero padding needs no mask: a zero key scores 0, and relu(0)^2 = 0
    qc = F.pad(q[:, :, 0], (0, 0, 0, pad - Lq)).reshape(G, n, chunk, s)
    kc = F.pad(k[:, :, 0], (0, 0, 0, pad - Lk)).reshape(G, n, chunk, s)
    vc = F.pad(ve, (0, 0, 0, pad - Lk)).reshape(G, n, chunk, -1)
    a = F.relu(qc @ kc.transpose(-1, -2) / math.sqrt(s)).square() / chunk  # (G, n, c, c)
    quad = (a @ vc).reshape(G, pad, -1)[:, :Lq]
    return (quad + lin)[:, :, None]


def _grouped(core, q: Tensor, k: Tensor, v: Tensor, seg: Segments, **kw) -> Tensor:
    """A per-sequence kernel on packed tokens: segments of equal length batched, outputs back in order."""
    outs = [core(q[gq], k[gk], v[gk], **kw).flatten(0, 1) for gq, gk in seg.groups]
    return torch.cat(outs)[seg.inverse_groups]


def mix(kind: str, q: Tensor, k: Tensor, v: Tensor, seg: Segments | None = None, key_mask: Tensor | None = None,
        *, feature_map: str = "relu", chunk_size: int = 64, backend: str | None = None) -> Tensor:
    """The token-mixing kernel of `kind`.

    Batched (seg None): q (B, N, h, d), k and v (B, M, h, .), key_mask (B, M) bool or None -> (B, N, h, e).
    Packed: q (Tq, h, d), k and v (Tk, h, .) with seg -> (Tq, h, e); `backend` picks softmax's kernel.
    """
    if seg is None:
        B, N, M = q.shape[0], q.shape[1], k.shape[1]
        if kind == "softmax":
            mask = None if key_mask is None else key_mask[:, None, None, :]
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask).transpose(1, 2)
        if key_mask is None and (kind == "linear" or N == M):
            return (_linear_core(q, k, v, feature_map) if kind == "linear" else _gau_core(q, k, v, chunk_size))
        seg = Segments.from_batch(B, N, key_mask, q.device, M)
        out = mix(kind, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), seg, feature_map=feature_map,
                  chunk_size=chunk_size)
        return out.reshape(B, N, *out.shape[1:])
    if kind == "softmax":
        return attend(q, k, v, seg, backend)
    if kind == "linear":
        return _grouped(_linear_core, q, k, v, seg, feature_map=feature_map)
    return _grouped(_gau_core, q, k, v, seg, chunk=chunk_size)


# ----------------------------------------------------------------------------------------- the mixer
class TokenMixer(nn.Module):
    """Self-attention of one token stream (DiT's): projections, the `kind` kernel, output projection.
    softmax and linear share the weights of layers.Attention (qkv, q_norm, k_norm, proj: saved DiTs load);
    gau has its own (uvz, gamma, beta, proj)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | bool | None = None, kind: str = "softmax",
                 feature_map: str = "relu", chunk_size: int = 64):
        super().__init__()
        check_attention(kind, feature_map, chunk_size)
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.kind, self.feature_map, self.chunk_size = kind, feature_map, chunk_size
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if kind == "gau":
            self.gau = GAUProjections(dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.q_norm = qk_norm_layer(qk_norm, self.head_dim)
            self.k_norm = qk_norm_layer(qk_norm, self.head_dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, seg: Segments | None = None, backend: str | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        """x (B, N, C) (seg None; key_mask (B, N) bool: the real tokens, None: all) or packed (T, C) with its
        Segments -> the same shape."""
        kw = {"key_mask": key_mask, "feature_map": self.feature_map, "chunk_size": self.chunk_size, "backend": backend}
        if self.kind == "gau":
            q, k, v, u = self.gau(x)
            return self.gau.proj(u * mix("gau", q, k, v, seg, **kw)[..., 0, :])
        lead, C = x.shape[:-1], x.shape[-1]
        q, k, v = self.qkv(x).reshape(*lead, 3, self.num_heads, self.head_dim).unbind(-3)  # (..., h, d) each
        # norms may run in float32 under autocast; SDPA wants q, k, v in one dtype
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        return self.proj(mix(self.kind, q, k, v, seg, **kw).reshape(*lead, C))
