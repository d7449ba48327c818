"""The training order, written once: which examples rank r uses at step k, as a pure function
of (seed, k), and the batches of a source in that order, decoded in the main process or by
DataLoader workers with identical results.

Order (the trainer's since the start): a `DistributedSampler(n, world, rank, shuffle=True,
seed, drop_last=True)`; `per_epoch = len(sampler) // (B // world)`; step k is epoch, pos =
divmod(k, per_epoch), and the rank's indices are list(sampler at that epoch)[pos b:(pos + 1) b]
with b = B // world. The rank-r batch of a step is the r::world interleave of the one-rank
batch, so K ranks see exactly the examples of one rank with the same global batch B, and a run
resumed at step k sees what an uninterrupted one would.
"""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader, DistributedSampler

from .source import collate


class StepOrder:
    """step -> this rank's example indices (a list of B // world ints); see the module docstring."""

    def __init__(self, n: int, seed: int, batch_size: int, world_size: int = 1, rank: int = 0):
        _check_sizes(n, batch_size, world_size, rank)
        self.local = batch_size // world_size
        self._sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=True)
        self.per_epoch = len(self._sampler) // self.local
        self._epoch: tuple[int, list[int]] | None = None

    def indices(self, step: int) -> list[int]:
        """The rank's indices at `step` (>= 0); the epoch's permutation is cached."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = divmod(int(step), self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._sampler.set_epoch(epoch)
            self._epoch = (epoch, list(self._sampler))
        return self._epoch[1][pos * self.local:(pos + 1) * self.local]


def _check_sizes(n: int, batch_size: int, world_size: int, rank: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {world_size} rank(s)")
    if n < batch_size:
        raise ValueError(f"the data set has {n} examples, fewer than one global batch of {batch_size}; "
                         f"lower batch_size or use more data")


class _StepSampler:
    """A DataLoader batch_sampler yielding the index lists of steps start, start + 1, ... (< end)."""

    def __init__(self, order: StepOrder, start: int, end: int | None):
        self.order, self.start, self.end = order, start, end

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.end is None or step < self.end:
            yield self.order.indices(step)
            step += 1


class StepBatches:
    """This rank's batches for steps start_step, start_step + 1, ... (up to end_step, or forever).

    Each batch is a dict as the source's items, collated ({"x0": (b, ...), "cond": {"y": (b,)}?,
    "noise": (b, ...)?}, b = batch_size // world_size), on the CPU. num_workers == 0 reads in
    this process (with `source.batch(indices)` when the source has it); num_workers > 0 uses a
    DataLoader whose batch_sampler yields the same index lists (persistent workers, each keeping
    `prefetch_factor` batches in flight), so the batches do not depend on num_workers. Sources
    must be deterministic per index. A source with `step_order(seed, batch_size, world, rank)` (the
    packed source of data/packing.py) supplies its own order (an object with `indices(step)`). Use as an iterator (`next(batches)`); `close()` (or `with`)
    stops the workers, and a later `next` starts them again at `.step`, the next batch's step.
    """

    def __init__(self, source, seed: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 start_step: int = 0, num_workers: int = 0, *, end_step: int | None = None,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        if start_step < 0 or num_workers < 0:
            raise ValueError(f"start_step and num_workers must be >= 0, got {start_step} and {num_workers}")
        self.source, self.num_workers = source, int(num_workers)
        own = getattr(source, "step_order", None)  # a source with its own order (data/packing.py: token budgets)
        self.order = (own(seed, batch_size, world_size, rank) if callable(own)
                      else StepOrder(len(source), seed, batch_size, world_size, rank))
        self.step, self.end_step = int(start_step), end_step
        self._loader_args = dict(prefetch_factor=prefetch_factor, pin_memory=pin_memory)
        self._it: Iterator[dict] | None = None

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> dict:
        if self.end_step is not None and self.step >= self.end_step:
            raise StopIteration
        if self._it is None:
            self._it = self._batches() if self.num_workers == 0 else iter(self._loader())
        batch = next(self._it)
        self.step += 1
        return batch

    def _batches(self) -> Iterator[dict]:
        """In-process reading: the source's batch() fast path, else its items collated."""
        fast = getattr(self.source, "batch", None)
        for idx in _StepSampler(self.order, self.step, self.end_step):
            yield fast(idx) if fast is not None else collate([self.source[i] for i in idx])

    def _loader(self) -> DataLoader:
        return DataLoader(self.source, batch_sampler=_StepSampler(self.order, self.step, self.end_step),
                          num_workers=self.num_workers, collate_fn=collate, persistent_workers=True,
                          **self._loader_args)

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        it, self._it = getattr(self, "_it", None), None
        shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's multiprocessing iterator
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "StepBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
