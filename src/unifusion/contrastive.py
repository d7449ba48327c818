"""Contrastive image-text losses, per example and chunked: CLIP's symmetric InfoNCE (Radford et al.
2021) and SigLIP's pairwise sigmoid loss (Zhai et al. 2023), as open_clip `loss.py` computes them.

Features are L2-normalised already. Under data parallelism a rank holds its B_local rows and the
gathered (B, D) matrices of every rank (`gather_features`, with gradient); `offset` is the global
index of its first row, so its positive pairs are (offset + i, offset + i). A rank computes only its
own rows' losses, and with `chunk` it forms the similarities in column blocks of at most
B_local x chunk (recomputed in backward, not stored), so no rank ever builds the B x B matrix.

The mean of the rows over all ranks is the full-batch loss; averaging the ranks' gradients (DDP)
gives the full-batch gradient, because all_gather's backward sums every rank's gradient into the
rank that owns the rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP: temperature 0.07
LOGIT_SCALE_MAX = math.log(100)  # CLIP clamps the inverse temperature at 100
SIGLIP_LOGIT_SCALE_INIT = math.log(10)  # SigLIP / open_clip: t' = log 10
SIGLIP_LOGIT_BIAS_INIT = -10.0  # SigLIP / open_clip: b = -10


def _blocks(n: int, chunk: int | None):
    """Column ranges [start, stop) of width <= chunk covering 0..n (one range when chunk is None)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of columns or None, got {chunk}")
    step = n if chunk is None else chunk
    return [(s, min(s + step, n)) for s in range(0, n, max(step, 1))]


def _recompute(chunk: int | None, fn, *args):
    """fn(*args); with a chunk, without keeping its (B_local, chunk) intermediates for backward:
    they are rebuilt there one block at a time, which is what bounds the memory to one block."""
    if chunk is not None and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _lse_block(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    return torch.logsumexp(t * (a @ b.T), dim=1)  # (B_local, chunk) -> (B_local,)


def _chunked_logsumexp(a: Tensor, b_all: Tensor, t: Tensor, chunk: int | None) -> Tensor:
    """logsumexp_j (t a_i . b_j) over all B columns, streamed over column blocks: (B_local,)."""
    parts = [_recompute(chunk, _lse_block, a, b_all[s:e], t) for s, e in _blocks(b_all.shape[0], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1)  # combine the blocks' logsumexps


def clip_loss_rows(img_local: Tensor, txt_local: Tensor, img_all: Tensor, txt_all: Tensor, offset: int,
                   logit_scale: Tensor, chunk: int | None = None) -> Tensor:
    """CLIP's loss of this rank's rows, (B_local,): per example i (global index offset + i)

        0.5 * [ -t x_i.y_i + logsumexp_j t x_i.y_j ]   (image -> text)
      + 0.5 * [ -t y_i.x_i + logsumexp_j t y_i.x_j ]   (text -> image)

    with t = exp(min(logit_scale, log 100)); the mean over every rank's rows is CLIP's loss.
    img_local / txt_local: (B_local, D); img_all / txt_all: (B, D), this rank's rows at offset.
    """
    B_local, B = img_local.shape[0], img_all.shape[0]
    if txt_local.shape[0] != B_local or txt_all.shape[0] != B or not 0 <= offset <= B - B_local:
        raise ValueError(f"rows {offset}..{offset + B_local} do not fit in a global batch of {B} "
                         f"(img_local {tuple(img_local.shape)}, txt_local {tuple(txt_local.shape)}, "
                         f"txt_all {tuple(txt_all.shape)})")
    t = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    positive = t * (img_local * txt_local).sum(dim=1)  # (B_local,) t x_i . y_i
    i2t = _chunked_logsumexp(img_local, txt_all, t, chunk) - positive
    t2i = _chunked_logsumexp(txt_local, img_all, t, chunk) - positive
    return 0.5 * (i2t + t2i)  # (B_local,)


def _siglip_block(x: Tensor, y: Tensor, t: Tensor, b: Tensor, first: int) -> Tensor:
    """sum over the block's columns of -log sigmoid(z (t x.y + b)); `first` is the block's first
    global column minus this rank's offset, so row i's positive sits at column i - first."""
    logits = t * (x @ y.T) + b  # (B_local, chunk)
    cols = torch.arange(y.shape[0], device=x.device) + first  # (chunk,) columns relative to offset
    z = torch.where(cols[None, :] == torch.arange(x.shape[0], device=x.device)[:, None], 1.0, -1.0)
    return -F.logsigmoid(z.to(logits.dtype) * logits).sum(dim=1)  # (B_local,)


def siglip_loss_rows(img_local: Tensor, txt_all: Tensor, offset: int, logit_scale: Tensor, logit_bias: Tensor,
                     chunk: int | None = None) -> Tensor:
    """SigLIP's loss of this rank's image rows, (B_local,): row i (global offset + i) is

        -sum_j log sigmoid(z_ij (t x_i.y_j + b)),   z_ij = +1 if j = offset + i else -1,

    t = exp(logit_scale) (not clamped), b = logit_bias; the mean over every rank's rows is
    SigLIP's loss (open_clip SigLipLoss: the sum over the B x B pairs divided by B)."""
    B_local, B = img_local.shape[0], txt_all.shape[0]
    if not 0 <= offset <= B - B_local:
        raise ValueError(f"rows {offset}..{offset + B_local} do not fit in a global batch of {B}")
    t = logit_scale.exp()
    parts = [_recompute(chunk, _siglip_block, img_local, txt_all[s:e], t, logit_bias, s - offset)  # int: no copy
             for s, e in _blocks(B, chunk)]
    return torch.stack(parts, dim=0).sum(dim=0)  # (B_local,)


def clip_loss_naive(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """The reference: CLIP's loss from the full (B, B) logit matrix, a scalar."""
    t = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    logits = t * img @ txt.T  # (B, B): image i against text j
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def siglip_loss_naive(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """The reference: SigLIP's loss from the full (B, B) logit matrix, a scalar."""
    logits = logit_scale.exp() * img @ txt.T + logit_bias  # (B, B)
    z = 2 * torch.eye(img.shape[0], dtype=logits.dtype, device=img.device) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """all_gather with gradient: forward stacks every rank's rows; backward sums the ranks'
    gradients of the whole matrix and keeps this rank's rows (what torch.distributed.nn's
    deprecated all_gather did), with collectives every backend has (gloo included)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], x.shape[0])
        return torch.cat(parts, dim=0)  # (world * B_local, D)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks: every rank's loss depends on these rows
        start, n = ctx.rows
        return grad[start:start + n]


def gather_features(x: Tensor) -> Tensor:
    """(B_local, D) -> (B, D): every rank's rows in rank order, differentiable (the backward sums
    the ranks' gradients into the owner); the identity with one process. Every rank must hold the
    same B_local (all_gather's requirement)."""
    if not _distributed():
        return x
    return _AllGather.apply(x)


def rank_offset(b_local: int) -> int:
    """The global index of this rank's first row when every rank holds b_local rows (0 alone)."""
    return torch.distributed.get_rank() * b_local if _distributed() else 0


__all__ = ["clip_loss_rows", "siglip_loss_rows", "clip_loss_naive", "siglip_loss_naive", "gather_features",
           "rank_offset", "CLIP_LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX", "SIGLIP_LOGIT_SCALE_INIT",
           "SIGLIP_LOGIT_BIAS_INIT"]
