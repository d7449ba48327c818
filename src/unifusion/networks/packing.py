"""Packed variable-size batches for the transformers (NaViT, "Patch n' Pack", Dehghani et al. 2023):
several images' patch tokens laid end to end in one sequence, each image keeping its own size, its own
2-D positions and its own conditioning, with attention kept inside each image (block-diagonal).

    tokens, pack = pack_images(x, sizes, p)     # x (n, C, H, W) zero-padded carrier, sizes (n, 2) = (h, w)
    out = net(tokens, c_noise, emb, pack=pack)  # DiT / MMDiT: (T, p*p*C) -> (T, p*p*C), T = sum of h*w / p^2
    x = unpack_images(out, pack)                # (n, C, H, W), zeros outside each image

A token's features are its patch in (row-in-patch, column-in-patch, channel) order, the order of the
networks' final linear, so an input token and an output token correspond element by element (the
parametrization's c_skip x + c_out F works on tokens). Nothing here knows sigma or labels.

Block-diagonal attention is written once, `attend(q, k, v, seg, backend)`, over a token set described
by `Segments` (which segment every query and key belongs to). The backends (chosen by measurement,
BENCHMARKS.md "Packed batches"; `auto` takes the measured best for the device):

    dense    a boolean (Tq, Tk) mask into scaled_dot_product_attention: the reference. O(T^2) memory, and a
             mask knocks SDPA off its flash kernel.
    grouped  segments of equal length gathered into one (G, L) batch each and attended with plain SDPA
             (no mask): few calls when sizes repeat (resolution buckets inside the pack).
    nested   a jagged nested tensor (torch.nested, layout=torch.jagged) through SDPA.
    flex     FlexAttention with a document block mask (attention-gym's document masking); compiled on CUDA.
             On CPU torch runs it eagerly (the full score matrix) and has no backward: inference only.
    varlen   torch.nn.attention.varlen.varlen_attn (flash varlen; CUDA only).
"""
from __future__ import annotations

import warnings
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "dense", "grouped", "nested", "flex", "varlen")
# the measured best per device type (BENCHMARKS.md "Packed batches", benchmarks/packing.py): on the 2-core CPU,
# training a DiT on 16..256-token images, grouped ran at 3.7x the nested tensor and 4.1x the dense mask (and
# 2.5x padding to the largest size); flex has no CPU backward. CUDA is not measured yet (benchmarks/gpu_packing.sh
# writes its table): until then flex, after the published H200 numbers of FlexAttention document masking
# (KempnerForge #207: 1.31x a dense packing mask at 2k tokens, 2.34x at 8k)
AUTO = {"cpu": "grouped", "cuda": "flex"}
_default_backend = "auto"


def set_backend(name: str) -> None:
    """The block-diagonal attention backend packed forwards use (a runtime choice: no weights change)."""
    global _default_backend
    _default_backend = check_backend(name)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {name!r}; choose one of {list(BACKENDS)}")
    return name


def resolve_backend(name: str | None, device: torch.device, grad: bool) -> str:
    name = check_backend(name or _default_backend)
    if name == "auto":
        name = AUTO.get(device.type, "grouped")
        if name == "flex" and device.type == "cpu" and grad:
            name = "grouped"
    return name


# ---------------------------------------------------------------------------------------------- layout
class Pack:
    """Where n images' tokens sit in one packed sequence of T tokens (image-major, row-major inside).

    grids (n, 2): each image's token grid (gh, gw); lengths (n,) = gh * gw; offsets (n + 1,);
    image (T,): the image of every token; pos (T, 2): its (row, column) on its own grid;
    first (n,): the index of each image's first token. `sizes` (n, 2) are the pixel sizes (h, w).
    """

    def __init__(self, sizes: Tensor, patch_size: int, device=None):
        sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1, 2).cpu()
        p = int(patch_size)
        if len(sizes) == 0:
            raise ValueError("a pack needs at least one image")
        bad = ((sizes % p) != 0).any(1) | (sizes <= 0).any(1)
        if bad.any():
            i = int(bad.nonzero()[0])
            h, w = sizes[i].tolist()
            raise ValueError(f"image {i} of the pack is {w}x{h} (width x height), not a positive multiple of the "
                             f"patch size {p}")
        self.patch_size, self.sizes = p, sizes
        self.grids = sizes // p  # (n, 2)
        self.lengths = self.grids.prod(1)  # (n,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.n, self.T = len(sizes), int(self.offsets[-1])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        image = torch.repeat_interleave(torch.arange(self.n), self.lengths)  # (T,)
        local = torch.arange(self.T) - self.offsets[:-1][image]  # (T,) index inside the image
        gw = self.grids[image, 1]
        self.image = image.to(self.device)
        self.local = local.to(self.device)
        self.pos = torch.stack([local // gw, local % gw], 1).to(self.device)  # (T, 2) (row, col)
        self.first = self.offsets[:-1].to(self.device)

    def to(self, device) -> Pack:
        return self if torch.device(device) == self.device else Pack(self.sizes, self.patch_size, device)

    @cached_property
    def segments(self) -> Segments:
        """Self-attention of every image's tokens among themselves."""
        return Segments(self.image, self.local, self.n)

    def segment_mean(self, values: Tensor) -> Tensor:
        """(T,) per-token values -> (n,) their mean over each image's tokens."""
        out = values.new_zeros(self.n).index_add_(0, self.image, values)
        return out / self.lengths.to(out)


def pack_images(x: Tensor, sizes: Tensor, patch_size: int) -> tuple[Tensor, Pack]:
    """(n, C, H, W) images, image i in the top-left sizes[i] = (h, w) corner (the rest ignored), ->
    tokens (T, p*p*C) of every image laid end to end, and their Pack."""
    n, C, H, W = x.shape
    pack = Pack(sizes, patch_size, x.device)
    p = pack.patch_size
    if (pack.sizes[:, 0] > H).any() or (pack.sizes[:, 1] > W).any():
        raise ValueError(f"pack sizes exceed the carrier's {W}x{H} (width x height)")
    if H % p or W % p:  # the carrier's own grid must be whole: pad it (the padding is never read)
        x = F.pad(x, (0, -W % p, 0, -H % p))
        H, W = x.shape[2:]
    patches = x.reshape(n, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (n, gh, gw, p, p, C)
    keep = _valid(pack, H // p, W // p)  # (n, GH, GW) bool, row-major inside each image
    return patches[keep].reshape(pack.T, p * p * C), pack


def unpack_images(tokens: Tensor, pack: Pack, shape: tuple[int, int] | None = None) -> Tensor:
    """tokens (T, p*p*C) -> (n, C, H, W) with zeros outside each image; (H, W) defaults to the largest image's."""
    p, n = pack.patch_size, pack.n
    C = tokens.shape[1] // (p * p)
    H, W = shape if shape is not None else tuple(int(v) for v in pack.sizes.max(0).values)
    GH, GW = -(-H // p), -(-W // p)
    grid = tokens.new_zeros(n, GH, GW, p, p, C)
    grid[_valid(pack, GH, GW)] = tokens.reshape(-1, p, p, C)
    x = grid.permute(0, 5, 1, 3, 2, 4).reshape(n, C, GH * p, GW * p)
    return x[:, :, :H, :W]


def _valid(pack: Pack, GH: int, GW: int) -> Tensor:
    g = pack.grids.to(pack.device)
    rows = torch.arange(GH, device=pack.device)[None, :, None] < g[:, 0, None, None]
    cols = torch.arange(GW, device=pack.device)[None, None, :] < g[:, 1, None, None]
    return rows & cols  # (n, GH, GW)


def pack_list(images: list[Tensor], patch_size: int) -> tuple[Tensor, Pack]:
    """A list of (C, h_i, w_i) images -> (tokens, Pack) (through a zero-padded carrier)."""
    sizes = torch.tensor([tuple(im.shape[1:]) for im in images])
    H, W = (int(v) for v in sizes.max(0).values)
    x = images[0].new_zeros(len(images), images[0].shape[0], H, W)
    for i, im in enumerate(images):
        x[i, :, :im.shape[1], :im.shape[2]] = im
    return pack_images(x, sizes, patch_size)


# ------------------------------------------------------------------------------------------- segments
class Segments:
    """Which of n segments every query and key of an attention belongs to.

    q_ids (Tq,), kv_ids (Tk,): segment indices (a key with id -1 belongs to none: a masked key);
    q_local, kv_local: each token's place inside its segment (the order GAU's chunks follow).
    self_attention: the queries are the keys (then kv_* are the q_* tensors).
    """

    def __init__(self, q_ids: Tensor, q_local: Tensor, n: int, kv_ids: Tensor | None = None,
                 kv_local: Tensor | None = None):
        self.q_ids, self.q_local, self.n = q_ids, q_local, int(n)
        self.self_attention = kv_ids is None
        self.kv_ids = q_ids if kv_ids is None else kv_ids
        self.kv_local = q_local if kv_local is None else kv_local

    @staticmethod
    def from_batch(B: int, N: int, key_mask: Tensor | None, device, M: int | None = None) -> Segments:
        """B sequences of N queries and M (default N) keys each, flattened row by row; key_mask (B, M)
        bool marks the real keys (their place inside a segment counts real keys only)."""
        M = N if M is None else M
        ids = torch.arange(B, device=device)
        q_ids, q_local = ids.repeat_interleave(N), torch.arange(N, device=device).repeat(B)
        if key_mask is None and M == N:
            return Segments(q_ids, q_local, B)
        kv_ids, kv_local = ids.repeat_interleave(M), torch.arange(M, device=device).repeat(B)
        if key_mask is not None:
            m = key_mask.reshape(-1)
            kv_ids = torch.where(m, kv_ids, -1)
            kv_local = (key_mask.long().cumsum(1) - 1).clamp_min(0).reshape(-1)
        return Segments(q_ids, q_local, B, kv_ids, kv_local)

    def queries_prefix(self, Tq: int) -> Segments:
        """The same keys, with only the first Tq queries (MM-DiT's last block queries image tokens only)."""
        return Segments(self.q_ids[:Tq], self.q_local[:Tq], self.n, self.kv_ids, self.kv_local)

    # -- what the backends need, computed once per segments object (shared by every layer)
    @cached_property
    def dense_mask(self) -> Tensor:
        return (self.q_ids[:, None] == self.kv_ids[None, :]) & (self.kv_ids >= 0)[None, :]  # (Tq, Tk)

    def _order(self, ids: Tensor, local: Tensor) -> tuple[Tensor, Tensor]:
        """(token indices sorted by (segment, place), counts per segment); tokens with id -1 dropped."""
        valid = ids >= 0
        span = int(local.max()) + 1 if len(local) else 1
        key = torch.where(valid, ids * span + local, self.n * span)  # masked keys sort last
        order = torch.argsort(key, stable=True)[:int(valid.sum())]
        return order, torch.bincount(ids[valid], minlength=self.n)

    @cached_property
    def jagged(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q order, q offsets (n + 1,), kv order, kv offsets): segment-contiguous layouts (an order is
        None where it is the identity: the tokens already lie segment by segment)."""
        qo, qc = self._order(self.q_ids, self.q_local)
        if self.self_attention:
            ko, kc = qo, qc
        else:
            ko, kc = self._order(self.kv_ids, self.kv_local)
        z = qc.new_zeros(1)
        qo_, ko_ = (None if _is_identity(o, len(ids)) else o for o, ids in ((qo, self.q_ids), (ko, self.kv_ids)))
        self.__dict__["_orders"] = (qo, ko)
        return qo_, torch.cat([z, qc.cumsum(0)]), ko_, torch.cat([z, kc.cumsum(0)])

    @cached_property
    def groups(self) -> list[tuple[Tensor, Tensor]]:
        """[(q index (G, Lq), kv index (G, Lk))]: segments of equal (Lq, Lk) batched together."""
        _, qoff, _, koff = self.jagged
        qo, ko = self.__dict__["_orders"]
        lq, lk = (qoff[1:] - qoff[:-1]).cpu(), (koff[1:] - koff[:-1]).cpu()
        out = []
        pairs = torch.stack([lq, lk], 1)
        for pair in torch.unique(pairs, dim=0).tolist():
            segs = ((pairs[:, 0] == pair[0]) & (pairs[:, 1] == pair[1])).nonzero()[:, 0].to(qo.device)
            if pair[0] == 0:
                continue
            ar_q, ar_k = torch.arange(pair[0], device=qo.device), torch.arange(pair[1], device=qo.device)
            out.append((qo[qoff[segs][:, None] + ar_q], ko[koff[segs][:, None] + ar_k]))
        return out

    @cached_property
    def inverse_groups(self) -> Tensor:
        """The permutation putting the grouped outputs (concatenated) back in query order."""
        flat = torch.cat([gq.reshape(-1) for gq, _ in self.groups])
        return torch.empty_like(flat).scatter_(0, flat, torch.arange(len(flat), device=flat.device))

    def block_mask(self, device):
        key = ("_block_mask", str(device))
        if key not in self.__dict__:
            from torch.nn.attention.flex_attention import create_block_mask
            q_ids, kv_ids = self.q_ids.to(device), self.kv_ids.to(device)

            def same_segment(b, h, qi, ki):
                return q_ids[qi] == kv_ids[ki]
            self.__dict__[key] = create_block_mask(same_segment, None, None, len(q_ids), len(kv_ids),
                                                   device=str(device))
        return self.__dict__[key]


# ------------------------------------------------------------------------------------------ attention
_compiled_flex = None


def attend(q: Tensor, k: Tensor, v: Tensor, seg: Segments, backend: str | None = None,
           scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with every query attending only to the keys of its segment.
    q (Tq, heads, d), k and v (Tk, heads, d) -> (Tq, heads, d)."""
    name = resolve_backend(backend, q.device, torch.is_grad_enabled() and q.requires_grad)
    if name == "dense":
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=seg.dense_mask.to(q.device), scale=scale)
        return o[0].transpose(0, 1)
    if name == "grouped":
        outs = []
        for gq, gk in seg.groups:
            qq, kk, vv = q[gq].transpose(1, 2), k[gk].transpose(1, 2), v[gk].transpose(1, 2)  # (G, h, L, d)
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, scale=scale).transpose(1, 2).flatten(0, 1))
        return torch.cat(outs)[seg.inverse_groups]
    if name == "nested":
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype")
        qo, qoff, ko, koff = seg.jagged
        nq = torch.nested.nested_tensor_from_jagged(_take(q, qo), qoff).transpose(1, 2)  # (n, h, j, d)
        nk = torch.nested.nested_tensor_from_jagged(_take(k, ko), koff).transpose(1, 2)
        nv = torch.nested.nested_tensor_from_jagged(_take(v, ko), koff).transpose(1, 2)
        o = F.scaled_dot_product_attention(nq, nk, nv, scale=scale).transpose(1, 2).values()  # (Tq, h, d) sorted
        return o if qo is None else torch.empty_like(o).index_copy(0, qo, o)
    if name == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError("the flex backend has no backward pass on CPU in this torch (FlexAttention is CUDA-only "
                             "for training); train with the grouped or nested backend, use flex for inference")
        from torch.nn.attention.flex_attention import flex_attention
        fn = flex_attention
        if q.device.type == "cuda":
            global _compiled_flex
            if _compiled_flex is None:
                _compiled_flex = torch.compile(flex_attention, dynamic=True)
            fn = _compiled_flex
        else:
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
               block_mask=seg.block_mask(q.device), scale=scale)
        return o[0].transpose(0, 1)
    if name == "varlen":
        if q.device.type != "cuda":
            raise ValueError("the varlen backend (flash varlen attention) needs a CUDA device; on CPU use grouped")
        from torch.nn.attention.varlen import varlen_attn
        qo, qoff, ko, koff = seg.jagged
        lq, lk = qoff[1:] - qoff[:-1], koff[1:] - koff[:-1]
        o = varlen_attn(_take(q, qo), _take(k, ko), _take(v, ko), qoff.int(), koff.int(), int(lq.max()),
                        int(lk.max()), scale=scale)
        return o if qo is None else torch.empty_like(o).index_copy(0, qo, o)
    raise AssertionError(name)


def _is_identity(order: Tensor, total: int) -> bool:
    return len(order) == total and bool((order == torch.arange(total, device=order.device)).all())


def _take(x: Tensor, order: Tensor | None) -> Tensor:
    return x.contiguous() if order is None else x[order]


def segment_sum(values: Tensor, ids: Tensor, n: int) -> Tensor:
    """(T, ...) -> (n, ...): the sum of each segment's rows; rows with id -1 are dropped."""
    keep = ids >= 0
    if not bool(keep.all()):
        values, ids = values[keep], ids[keep]
    return values.new_zeros((n,) + values.shape[1:]).index_add_(0, ids, values)
