"""Noise-data couplings drawn from a teacher, on disk: what reflow and distillation train on.

A couplings folder holds safetensors shards and an index:

    index.json               {"format": "unifusion-couplings", "version": 1, "teacher": {..., "digest":
                              sha256 of the weights it sampled with (safeio.tensors_digest)},
                              "sampler": {"name", "nfe", "options"}, "shape", "num_classes",
                              "class_names", "kind", "per_shard", "shards": [{"file", "count",
                              "first_seed"}], "count"}
    couplings-000000.safetensors   "noise" (n, *shape) float32: the unit noise the sample started from
                                   "x0" (n, *shape) float32: the teacher's sample from it
                                   "seed" (n,) int64; "y" (n,) int64 when the teacher is class-conditional

Shard k holds seeds [k * per_shard, (k + 1) * per_shard). Shards are written atomically and the
index after each one, so a killed `unifusion couple` resumes at the first missing shard without
duplicating or skipping a seed; a shard the index lists is complete (the write loop and the
memory-mapped reader are data/shards.py's, shared with latent shards). `CouplingSource` reads them
memory-mapped, one row at a time (items {"x0", "noise", "cond"?}), so it streams like the other
sources and keeps the (seed, step) training order exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..safeio import save_safetensors
from . import shards
from .shards import INDEX

FORMAT = "unifusion-couplings"
COMMAND = "unifusion couple"


def is_couplings(path) -> bool:
    """A folder with an index.json: couplings, or another shard folder (data.load tells them apart
    by the index's format)."""
    p = Path(path)
    return p.is_dir() and (p / INDEX).is_file()


def read_index(folder) -> dict:
    return shards.read_index(folder, FORMAT, "couplings", COMMAND)


def write_couplings(folder, count: int, per_shard: int, draw: Callable[[list[int]], dict[str, Tensor]],
                    header: dict, progress: bool = True, overwrite: bool = False) -> dict:
    """Write (or resume writing) `count` couplings in shards of `per_shard`; `draw(seeds)` returns
    {"noise", "x0", "y"?} for those seeds. `header` (teacher, sampler, shape, ...) must match the
    folder's index when resuming; the teacher is compared by the digest of its weights (not by
    its path, which may hold another model by now, or be spelled differently). Samples that are
    not finite are refused, naming their seeds. overwrite: replace an earlier couplings folder.
    Returns the index."""
    def check_resume(old: dict) -> None:
        new = {**header, "per_shard": per_shard}
        mismatch = [k for k in new if k != "teacher" and old.get(k) != new[k]]
        was, now = old.get("teacher") or {}, header.get("teacher") or {}
        same = was.get("digest") == now.get("digest") if "digest" in was else was.get("where") == now.get("where")
        if not same:  # (an index written before digests were recorded: by path, as it was then)
            raise ValueError(f"{folder} holds couplings of a teacher with other weights (digest "
                             f"{str(was.get('digest'))[:16]}, from {was.get('where')}) than --checkpoint "
                             f"{now.get('where')} (digest {str(now.get('digest'))[:16]}); finish it with the original "
                             "teacher, choose another --out, or pass --overwrite to start anew")
        mismatch += [f"teacher {k}" for k in now if k not in ("where", "step", "digest") and was.get(k) != now[k]]
        if mismatch:
            raise ValueError(f"{folder} holds couplings made with another {', '.join(mismatch)}; continue with the "
                             "same teacher and options, choose another --out, or pass --overwrite to start anew")

    def make(seeds: list[int], tick) -> dict[str, Tensor]:
        arrays = draw(seeds)
        bad = [seeds[i] for i, ok in enumerate(torch.isfinite(arrays["x0"].reshape(len(seeds), -1)).all(1)) if not ok]
        if bad:
            raise ValueError(f"the teacher's samples for seed(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} are not "
                             "finite (NaN or inf), so they are not stored; check the teacher, or try another "
                             "--sampler, --nfe or --cfg")
        arrays["seed"] = torch.tensor(seeds, dtype=torch.int64)
        tick(len(seeds))
        return arrays

    index, _ = shards.write_shards(folder, fmt=FORMAT, what="couplings", command=COMMAND, prefix="couplings",
                                   start_key="first_seed", count=count, per_shard=per_shard, header=header,
                                   make=make, check_resume=check_resume, record_bytes=False, progress=progress,
                                   save=lambda arrays, path: save_safetensors(arrays, path),  # (looked up per call)
                                   overwrite=overwrite)
    return index


class CouplingSource(shards.ShardReader):
    """The couplings in a folder as a source: items {"x0", "noise", "cond": {"y"}?}, read
    memory-mapped one row at a time (see the module docstring)."""

    def __init__(self, folder):
        index = read_index(folder)
        shape = tuple(index["shape"])
        super().__init__(folder, FORMAT, "couplings", COMMAND, "first_seed", {"noise": shape, "x0": shape})
        self.source = str(self.root)
        self.shape = shape
        self.kind = index.get("kind", "image")
        latent = index.get("latent") or {}  # couplings of a latent teacher: its autoencoder decodes the student
        if latent.get("autoencoder"):
            self.autoencoder = dict(latent["autoencoder"])
            self.image_shape = tuple(latent["image_shape"])
        self.num_classes = int(index.get("num_classes") or 0)
        self.class_names = index.get("class_names")
        # what a model trained on these couplings is scored against: the teacher's own data
        self.reference = (index.get("data_source"), index.get("data_options") or {})
        if self.num_classes and not self.has("y"):
            raise ValueError(f"{self.root} has no labels 'y' but the index says the teacher is conditional")

    def __getitem__(self, i) -> dict:
        k, r = self.locate(int(i))
        item = {"x0": self.finite_rows("x0", k, r, r + 1)[0].float(),
                "noise": self.finite_rows("noise", k, r, r + 1)[0].float()}
        if self.num_classes:
            item["cond"] = {"y": self.rows("y", k, r, r + 1)[0].long()}
        return item

    def arrays(self, limit: int | None = None):
        n = len(self) if limit is None else min(limit, len(self))
        items = [self[i] for i in range(n)]
        x = torch.stack([it["x0"] for it in items])
        y = torch.stack([it["cond"]["y"] for it in items]) if self.num_classes else None
        return x, y

    def __repr__(self) -> str:
        return f"CouplingSource({self.root}, n={len(self)}, shape={self.shape}, teacher={self.index.get('teacher')})"
