"""Token-budget batches of variable-size images, in the (seed, step) order.

A packed run's step is a token budget, not an image count: the images of step k are the longest run of
the epoch's permutation (seeded by (seed, epoch)) whose patch tokens fit the budget `tokens`, at most
`batch_size` of them. The global batch of a step is then laid out in batch_size fixed-shape *slots*:

    slot j < m:  image j of the step, zero-padded into the carrier (C, H_max, W_max), "size" = (h, w)
    slot j >= m: empty, "size" = (0, 0)

and rank r holds slots r, r + world, ... (the interleave every order here uses). Every item also carries
"weight" = batch_size / m (0 when empty): the loop's mean over slots and ranks then equals the mean of the
m images' own losses, the objective of an unpacked batch, whatever m, the number of ranks or the images'
sizes (models/packing.py). The model's per-slot draws (model.random(batch_size, (seed, step))) are the
global batch's rows [rank::world], so slot j gets draw j on every layout: (seed, step)-exact under DDP
and resume, like StepOrder.

Each image is center-cropped to multiples of `unit` (the network's patch in data pixels; at most unit - 1
pixels per side): the documented answer to a size the patch does not divide. An image with more tokens
than the budget, or smaller than one patch, is one error naming it, raised before the first step.
"""
from __future__ import annotations

import numpy as np
import torch

from .source import Wrapper, collate


def item_sizes(source, limit: int | None = None) -> np.ndarray:
    """(N, 2) int64 (h, w) of every item (the first `limit`): `source.sizes(indices)` for a variable-size
    source, else its one shape."""
    n = len(source) if limit is None else min(len(source), int(limit))
    sizes = getattr(source, "sizes", None)
    if callable(sizes):
        return np.asarray(sizes(range(n)), dtype=np.int64).reshape(n, 2)
    h, w = source.shape[-2:]
    return np.tile(np.array([[h, w]], dtype=np.int64), (n, 1))


def describe_item(source, i: int) -> str:
    files = getattr(source, "files", None) or getattr(getattr(source, "inner", None), "files", None)
    return f"item {i}" + (f" ({files[i]})" if files is not None and i < len(files) else "")


class TokenBudgetOrder:
    """step -> this rank's slots [(index or -1, m, batch_size)]: see the module docstring."""

    def __init__(self, tokens: np.ndarray, seed: int, batch_size: int, budget: int, world_size: int = 1,
                 rank: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {world_size} rank(s)")
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.seed, self.B, self.budget, self.world, self.rank = int(seed), int(batch_size), int(budget), world_size, rank
        self._epochs: list[int] = []  # steps in each epoch computed so far
        self._cached: tuple[int, np.ndarray, list[int]] | None = None  # (epoch, permutation, step starts)

    def _epoch(self, e: int) -> tuple[np.ndarray, list[int]]:
        if self._cached is None or self._cached[0] != e:
            perm = torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(self.seed + e)).numpy()
            starts, used, count = [0], 0, 0
            for j, t in enumerate(self.tokens[perm].tolist()):
                if count and (used + t > self.budget or count == self.B):
                    starts.append(j)
                    used, count = 0, 0
                used, count = used + t, count + 1
            starts.append(len(perm))
            self._cached = (e, perm, starts)
        return self._cached[1], self._cached[2]

    def global_step(self, step: int) -> list[int]:
        """The data indices of step `step` (>= 0), in slot order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        e, first = 0, 0
        while True:
            if e == len(self._epochs):
                self._epochs.append(len(self._epoch(e)[1]) - 1)
            if step < first + self._epochs[e]:
                break
            first += self._epochs[e]
            e += 1
        perm, starts = self._epoch(e)
        k = step - first
        return perm[starts[k]:starts[k + 1]].tolist()

    def indices(self, step: int) -> list[tuple[int, int, int]]:
        g = self.global_step(step)
        return [(g[j] if j < len(g) else -1, len(g), self.B) for j in range(self.rank, self.B, self.world)]


class PackedSource(Wrapper):
    """`source` (items at their own sizes) as the slots of token-budget batches (module docstring).

    unit: the size every image is cropped to a multiple of (the network's patch in data pixels);
    tokens: the budget per global step, in patch tokens (one token = unit x unit pixels).
    `shape` is the carrier (C, H_max, W_max); items are {"x0" carrier, "size" (2,), "weight", "cond"?}.
    """

    def __init__(self, source, unit: int, tokens: int):
        self.inner, self.unit, self.budget = source, int(unit), int(tokens)
        if self.unit < 1 or self.budget < 1:
            raise ValueError(f"packing needs a unit >= 1 and a token budget >= 1, got {unit} and {tokens}")
        self.shape = tuple(source.shape)
        raw = item_sizes(source)
        self.sizes = raw // self.unit * self.unit
        tok = (self.sizes // self.unit).prod(1)
        small = np.nonzero(tok == 0)[0]
        if len(small):
            i = int(small[0])
            raise ValueError(f"{describe_item(source, i)} is {raw[i, 1]}x{raw[i, 0]} (width x height), smaller than "
                             f"one {self.unit}x{self.unit} patch; drop it or upscale it")
        big = np.nonzero(tok > self.budget)[0]
        if len(big):
            i = int(big[0])
            raise ValueError(f"{describe_item(source, i)} is {raw[i, 1]}x{raw[i, 0]} (width x height): {int(tok[i])} "
                             f"tokens of {self.unit}x{self.unit} pixels, more than the budget --pack-tokens "
                             f"{self.budget} ({len(big)} image(s) do not fit); raise --pack-tokens or cap the image "
                             f"area (--max-area)")
        self.tokens = tok


    def step_order(self, seed: int, batch_size: int, world_size: int = 1, rank: int = 0) -> TokenBudgetOrder:
        """The order StepBatches follows for this source (data/order.py)."""
        return TokenBudgetOrder(self.tokens, seed, batch_size, self.budget, world_size, rank)

    def __getitem__(self, slot) -> dict:
        i, m, B = slot if isinstance(slot, tuple) else (int(slot), 1, 1)
        C, H, W = self.shape
        x = torch.zeros(C, H, W)
        if i < 0:  # an empty slot: no image, no weight
            item = {"x0": x, "size": torch.zeros(2, dtype=torch.long), "weight": torch.zeros(())}
            return self._empty_cond(item)
        item = dict(self.inner[i])
        img = item["x0"]
        h, w = (int(v) for v in self.sizes[i])
        top, left = (img.shape[1] - h) // 2, (img.shape[2] - w) // 2
        x[:, :h, :w] = img[:, top:top + h, left:left + w]
        item.update({"x0": x, "size": torch.tensor([h, w]), "weight": torch.tensor(B / m)})
        if "noise" in item:
            raise ValueError("packed batches carry no coupled noise (reflow couplings are fixed-size); train "
                             "couplings without --pack-tokens")
        return item

    def _empty_cond(self, item: dict) -> dict:
        if "_cond0" not in self.__dict__:
            self.__dict__["_cond0"] = self.inner[0].get("cond")
        first = self.__dict__["_cond0"]
        if first:
            item["cond"] = {k: ("" if isinstance(v, str) else torch.zeros_like(v)) for k, v in first.items()}
        return item

    def batch(self, slots) -> dict:
        return collate([self[s] for s in slots])

    def arrays(self, limit: int | None = None):
        return self.inner.arrays(limit)


def size_table(sizes: np.ndarray, top: int = 16) -> list[list[int]]:
    """The distinct (h, w) of `sizes`, most frequent first (ties: larger first), at most `top`."""
    uniq, counts = np.unique(np.asarray(sizes).reshape(-1, 2), axis=0, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda j: (-counts[j], -int(uniq[j].prod())))
    return [[int(v) for v in uniq[j]] for j in order[:top]]
