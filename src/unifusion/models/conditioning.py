"""Conditioning: turns a batch's `cond` dict into the network's conditioning inputs.

A conditioning module is an nn.Module (its weights are saved with the model) with

    net_kwargs(cond, batch) -> dict   the keyword arguments for the network, e.g. {"emb": (B, D)}
    null(batch, device) -> dict       the "no condition" cond, for classifier-free guidance
    drop(cond, mask) -> dict          cond with the rows where mask is True set to null (CFG training)
    default(seeds) -> dict | None     the cond used when sampling without one (class: seed % K)

    prepare(cond, device) -> dict     cond made ready for many calls (text: captions encoded once)

The null entry and the dropout live here and nowhere else. Text (TextConditioning) holds
captions, cond = {"caption": [str] * B}: a frozen text encoder (models/text_encoders.py, never in
state_dict) turns each caption into tokens (B, L, width), their mask and a pooled vector, cached
per caption so a caption is encoded once per process, not once per step; the network gets
{"emb": MLP(pooled), "context": tokens, "context_mask": mask}; the null caption is "" (BOS EOS).
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

    def prepare(self, cond: dict | None, device=None) -> dict:
        return cond or {}


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
        # the range check reads values (a device sync, and a graph break under torch.compile), so it runs on
        # the host once: at this module's first eager call (the trainer's check of its first batch, before any
        # compile) and in prepare (every sampling call's labels); net_kwargs handles the rest on the device
        if not self.__dict__.get("_checked") and not torch.compiler.is_compiling():
            self.check(y)
            self.__dict__["_checked"] = True
        return y.long()

    def check(self, y: Tensor) -> None:
        """ValueError unless every label lies in 0..K (K the null label): one host read."""
        if y.numel():
            lo, hi = torch.stack(torch.aminmax(y.long())).tolist()
            if lo < 0 or hi > self.num_classes:
                raise ValueError(f"class labels must lie in 0..{self.num_classes - 1} ({self.num_classes} is the "
                                 f"null label), got {lo}..{hi}")

    def net_kwargs(self, cond: dict | None, batch: int) -> dict:
        y = self.labels(cond, batch, self.table.weight.device)
        # no host read per call: a label outside 0..K (not the one checked) looks up a clamped row that is
        # then set to NaN, so it shows as a non-finite loss (a skipped, counted bad step) or sample, and never
        # indexes out of the table (a device-side assert on CUDA)
        idx = y.clamp(0, self.num_classes)
        return {"emb": torch.where((idx == y)[:, None], self.table(idx), float("nan"))}

    def null(self, batch: int, device=None) -> dict:
        return {"y": torch.full((batch,), self.num_classes, dtype=torch.long, device=device)}

    def drop(self, cond: dict, mask: Tensor) -> dict:
        y = cond["y"]
        return {**cond, "y": torch.where(mask.to(y.device), torch.full_like(y, self.num_classes), y)}

    def default(self, seeds: list[int]) -> dict:
        return {"y": torch.tensor([s % self.num_classes for s in seeds], dtype=torch.long)}

    def prepare(self, cond: dict | None, device=None) -> dict:
        """cond on the device, its labels range-checked (one host read before many denoiser calls)."""
        cond = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in (cond or {}).items()}
        if cond.get("y") is not None:
            self.check(torch.as_tensor(cond["y"]))
        return cond


class TextConditioning(nn.Module):
    """Captions through a frozen text encoder (module docstring). `record` is the encoder's
    describe() stored in the spec; it is loaded on first use and checked by digest."""

    kind = "text"
    ENCODED = ("context", "context_mask", "pooled")  # the keys of a prepared (encoded) cond
    CACHE_LIMIT = 200_000  # captions kept encoded in memory (the cache is cleared when full)

    def __init__(self, record: dict, dim: int, drop: float = 0.1, pooled: bool = True):
        super().__init__()
        if not 0 <= drop <= 1:
            raise ValueError(f"caption dropout must be in [0, 1], got {drop}")
        self.record, self.p_drop, self.num_classes = dict(record), drop, 0
        d = int(record["pooled_dim"])
        # pooled text -> the network's embedding, added to the noise embedding (SD3 / SDXL's pooled path);
        # without it (SD 1.x) the network sees the caption only through attention to its tokens
        self.pooled = nn.Sequential(nn.Linear(d, dim), nn.SiLU(), nn.Linear(dim, dim)) if pooled else None
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the model's device
        self.__dict__["_encoder"] = None  # not a submodule: frozen, outside state_dict / optimizer / DDP
        self.__dict__["_cache"] = {}

    def encoder(self):
        enc = self.__dict__["_encoder"]
        if enc is None:
            from .text_encoders import check_text_encoder, load_text_encoder
            enc = load_text_encoder(self.record["path"], device=self.anchor.device)
            check_text_encoder(enc, self.record)
            self.__dict__["_encoder"] = enc
        return enc

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, width), mask (B, L), pooled (B, pooled_dim)) of captions, each encoded once."""
        cache = self.__dict__["_cache"]
        new = sorted({c for c in captions if c not in cache})
        if new:
            if len(cache) + len(new) > self.CACHE_LIMIT:
                cache.clear()
            enc = self.encoder()
            for s in range(0, len(new), 512):
                part = new[s:s + 512]
                tokens, mask, pooled = enc.encode(part)
                for i, c in enumerate(part):
                    cache[c] = (tokens[i], mask[i], pooled[i])
        rows = [cache[c] for c in captions]
        device = self.anchor.device
        return tuple(torch.stack([r[j] for r in rows]).to(device) for j in range(3))

    def _captions(self, cond: dict | None, batch: int) -> list[str]:
        captions = (cond or {}).get("caption")
        if captions is None:
            raise ValueError("this model is text-conditional: give captions (cond={'caption': [...]}, "
                             "prompts=[...], or --prompt)")
        if isinstance(captions, str) or len(captions) != batch or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"cond['caption'] must be a list of {batch} strings, got {type(captions).__name__} "
                             f"of {len(captions) if hasattr(captions, '__len__') else '?'}")
        return list(captions)

    def prepare(self, cond: dict | None, device=None) -> dict:
        """cond with its captions encoded: {"context", "context_mask", "pooled"} tensors, so that many
        denoiser calls (a sampler) encode nothing and guidance can batch them."""
        if cond and "context" in cond:
            return cond
        captions = self._captions(cond, len((cond or {}).get("caption") or []))
        tokens, mask, pooled = self.encode(captions)
        return {"context": tokens, "context_mask": mask, "pooled": pooled}

    def net_kwargs(self, cond: dict | None, batch: int) -> dict:
        if cond and "context" in cond:
            tokens, mask, pooled = (cond[k] for k in self.ENCODED)
        else:
            tokens, mask, pooled = self.encode(self._captions(cond, batch))
        out = {"context": tokens, "context_mask": mask}
        if self.pooled is not None:
            out["emb"] = self.pooled(pooled.to(self.pooled[0].weight.dtype))
        return out

    def null(self, batch: int, device=None) -> dict:
        return {"caption": [""] * batch}

    def drop(self, cond: dict, mask: Tensor) -> dict:
        captions = self._captions(cond, len(mask))
        return {**cond, "caption": ["" if m else c for c, m in zip(captions, mask.tolist())]}

    def default(self, seeds: list[int]) -> dict:
        raise ValueError("this model is text-conditional: sample it with prompts (prompts=[...] in Python, "
                         "--prompt TEXT or --prompts FILE on the command line); an empty prompt is unconditional")


def build(spec_conditioning: dict, dim: int) -> nn.Module:
    kind = spec_conditioning.get("kind", "none")
    if kind == "none":
        return NoConditioning()
    if kind == "class":
        return ClassConditioning(spec_conditioning["num_classes"], dim, spec_conditioning.get("drop", 0.0))
    if kind == "text":
        return TextConditioning(spec_conditioning["encoder"], dim, spec_conditioning.get("drop", 0.0),
                                spec_conditioning.get("pooled", True))
    raise ValueError(f"unknown conditioning kind {kind!r}; choose 'none', 'class' or 'text'")
