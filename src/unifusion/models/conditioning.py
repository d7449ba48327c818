"""Conditioning: turns a batch's `cond` dict into the network's conditioning inputs.

A conditioning module is an nn.Module (its weights are saved with the model) with

    net_kwargs(cond, batch) -> dict   the keyword arguments for the network, e.g. {"emb": (B, D)}
    null(batch, device) -> dict       the "no condition" cond, for classifier-free guidance
    drop(cond, mask) -> dict          cond with the rows where mask is True set to null (CFG training)
    default(seeds) -> dict | None     the cond used when sampling without one (class: seed % K)

The null entry and the dropout live here and nowhere else. A text encoder plugs in as another
kind: net_kwargs returns {"emb": pooled (B, D), "context": tokens (B, L, D)} for networks that
take cross-attention context, and its cond holds token ids or strings.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class NoConditioning(nn.Module):
    kind = "none"
    num_classes = 0

    def net_kwargs(self, cond: dict | None, batch: int) -> dict:
        if cond:
            raise ValueError(f"this model is unconditional, but got conditioning {sorted(cond)}; "
                             "drop --label / --cfg, or train a conditional model")
        return {}

    def null(self, batch: int, device=None) -> dict:
        return {}

    def drop(self, cond: dict, mask: Tensor) -> dict:
        return cond

    def default(self, seeds: list[int]) -> dict | None:
        return None


class ClassConditioning(nn.Module):
    """Class labels 0..K-1 and the null label K, as rows of one table added to the noise
    embedding (ADM's class embedding; the extra row is what CFG drops to)."""

    kind = "class"

    def __init__(self, num_classes: int, dim: int, drop: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"class conditioning needs num_classes >= 1, got {num_classes}")
        if not 0 <= drop <= 1:
            raise ValueError(f"condition dropout must be in [0, 1], got {drop}")
        self.num_classes, self.p_drop = num_classes, drop
        # nn.Embedding's unit-scale random rows (ADM's choice) make classes distinct from step 0
        self.table = nn.Embedding(num_classes + 1, dim)

    def labels(self, cond: dict | None, batch: int, device) -> Tensor:
        y = (cond or {}).get("y")
        if y is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device)
        if y.shape != (batch,) or y.is_floating_point():
            raise ValueError(f"class labels y must be integers of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
        # the range check reads values (a sync, and a graph break under torch.compile): eager code only;
        # the trainer runs it on the first batch before compiling, and sources know their label count
        if y.numel() and not torch.compiler.is_compiling() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1} ({self.num_classes} is the "
                             f"null label), got {int(y.min())}..{int(y.max())}")
        return y.long()

    def net_kwargs(self, cond: dict | None, batch: int) -> dict:
        return {"emb": self.table(self.labels(cond, batch, self.table.weight.device))}

    def null(self, batch: int, device=None) -> dict:
        return {"y": torch.full((batch,), self.num_classes, dtype=torch.long, device=device)}

    def drop(self, cond: dict, mask: Tensor) -> dict:
        y = cond["y"]
        return {**cond, "y": torch.where(mask.to(y.device), torch.full_like(y, self.num_classes), y)}

    def default(self, seeds: list[int]) -> dict:
        return {"y": torch.tensor([s % self.num_classes for s in seeds], dtype=torch.long)}


def build(spec_conditioning: dict, dim: int) -> nn.Module:
    kind = spec_conditioning.get("kind", "none")
    if kind == "none":
        return NoConditioning()
    if kind == "class":
        return ClassConditioning(spec_conditioning["num_classes"], dim, spec_conditioning.get("drop", 0.0))
    raise ValueError(f"unknown conditioning kind {kind!r}; choose 'none' or 'class'")
