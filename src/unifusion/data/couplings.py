"""Noise-data couplings drawn from a teacher, on disk: what reflow and distillation train on.

A couplings folder holds safetensors shards and an index:

    index.json               {"format": "unifusion-couplings", "version": 1, "teacher": {...},
                              "sampler": {"name", "nfe", "options"}, "shape", "num_classes",
                              "class_names", "kind", "per_shard", "shards": [{"file", "count",
                              "first_seed"}], "count"}
    couplings-000000.safetensors   "noise" (n, *shape) float32: the unit noise the sample started from
                                   "x0" (n, *shape) float32: the teacher's sample from it
                                   "seed" (n,) int64; "y" (n,) int64 when the teacher is class-conditional

Shard k holds seeds [k * per_shard, (k + 1) * per_shard). Shards are written atomically and the
index after each one, so a killed `unifusion couple` resumes at the first missing shard without
duplicating or skipping a seed; a shard the index lists is complete. `CouplingSource` reads them
memory-mapped, one row at a time (items {"x0", "noise", "cond"?}), so it streams like the other
sources and keeps the (seed, step) training order exact.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..safeio import atomic_write, save_safetensors

INDEX = "index.json"
FORMAT = "unifusion-couplings"


def is_couplings(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / INDEX).is_file()


def read_index(folder) -> dict:
    p = Path(folder) / INDEX
    try:
        index = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not a readable couplings index ({e}); rerun `unifusion couple` into that "
                         "folder to rebuild it") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"{p} is not a couplings index (format {index.get('format')!r})")
    return index


def write_couplings(folder, count: int, per_shard: int, draw: Callable[[list[int]], dict[str, Tensor]],
                    header: dict, progress: bool = True) -> dict:
    """Write (or resume writing) `count` couplings in shards of `per_shard`; `draw(seeds)` returns
    {"noise", "x0", "y"?} for those seeds. `header` (teacher, sampler, shape, ...) must match the
    folder's index when resuming. Returns the index."""
    from tqdm.auto import tqdm
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if count < 1 or per_shard < 1:
        raise ValueError(f"--n and the shard size must be >= 1, got {count} and {per_shard}")
    index = {"format": FORMAT, "version": 1, **header, "per_shard": per_shard, "shards": [], "count": count}
    if (out / INDEX).is_file():
        old = read_index(out)
        mismatch = [k for k in (*header, "per_shard") if old.get(k) != index.get(k)]
        if mismatch:
            raise ValueError(f"{out} holds couplings made with another {', '.join(mismatch)}; continue with the "
                             "same teacher and options, or choose another --out")
        index["shards"] = [s for s in old["shards"] if (out / s["file"]).is_file()]
    elif any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no couplings index; choose an empty or new --out")
    done = {s["first_seed"] for s in index["shards"]}
    todo = [k for k in range(math.ceil(count / per_shard)) if k * per_shard not in done]
    for k in tqdm(todo, desc="couple", unit="shard", disable=not progress):
        seeds = list(range(k * per_shard, min(count, (k + 1) * per_shard)))
        arrays = draw(seeds)
        arrays["seed"] = torch.tensor(seeds, dtype=torch.int64)
        name = f"couplings-{k:06d}.safetensors"
        save_safetensors(arrays, out / name)
        index["shards"] = sorted(index["shards"] + [{"file": name, "count": len(seeds), "first_seed": seeds[0]}],
                                 key=lambda s: s["first_seed"])
        atomic_write(out / INDEX, json.dumps(index, indent=1))
    atomic_write(out / INDEX, json.dumps(index, indent=1))
    return index


class CouplingSource(torch.utils.data.Dataset):
    """The couplings in a folder as a source: items {"x0", "noise", "cond": {"y"}?}, read
    memory-mapped one row at a time (see the module docstring)."""

    def __init__(self, folder):
        self.root = Path(folder)
        index = read_index(self.root)
        self.index, self.source = index, str(self.root)
        self.shape = tuple(index["shape"])
        self.kind = index.get("kind", "image")
        self.num_classes = int(index.get("num_classes") or 0)
        self.class_names = index.get("class_names")
        # what a model trained on these couplings is scored against: the teacher's own data
        self.reference = (index.get("data_source"), index.get("data_options") or {})
        shards = sorted(index["shards"], key=lambda s: s["first_seed"])
        missing = [s["file"] for s in shards if not (self.root / s["file"]).is_file()]
        if missing:
            raise ValueError(f"{self.root}: {len(missing)} shard(s) listed in {INDEX} are missing (e.g. "
                             f"{missing[0]}); rerun `unifusion couple` with the same options to write them")
        total = sum(s["count"] for s in shards)
        if total < index["count"]:
            raise ValueError(f"{self.root} holds {total} of {index['count']} couplings (an interrupted `unifusion "
                             "couple`); rerun it with the same options to finish")
        self._shards = shards
        self._starts = [sum(s["count"] for s in shards[:i]) for i in range(len(shards))]
        self._open: dict[int, object] = {}
        for i in range(len(shards)):  # every shard is complete and of the index's shape: fail now, not mid-run
            self._check(i)

    def _handle(self, i: int):
        if i not in self._open:
            from safetensors import safe_open
            self._open[i] = safe_open(str(self.root / self._shards[i]["file"]), framework="pt")
        return self._open[i]

    def _check(self, i: int) -> None:
        name = self._shards[i]["file"]
        try:
            f = self._handle(i)
            keys = set(f.keys())
            for key in ("noise", "x0"):
                shape = tuple(f.get_slice(key).get_shape())
                if shape != (self._shards[i]["count"], *self.shape):
                    raise ValueError(f"{key} has shape {shape}, the index says ({self._shards[i]['count']}, "
                                     f"{', '.join(map(str, self.shape))})")
        except Exception as e:  # truncated or foreign files: safetensors raises its own types
            raise ValueError(f"{self.root / name} is damaged or not a couplings shard ({e}); delete it and rerun "
                             "`unifusion couple` with the same options to write it again") from None
        if self.num_classes and "y" not in keys:
            raise ValueError(f"{self.root / name} has no labels 'y' but the index says the teacher is conditional")

    def __getstate__(self):  # DataLoader workers reopen the shards
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __len__(self) -> int:
        return self.index["count"]

    def _locate(self, i: int) -> tuple[int, int]:
        import bisect
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} couplings")
        i %= len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i) -> dict:
        k, r = self._locate(int(i))
        f = self._handle(k)
        item = {"x0": f.get_slice("x0")[r:r + 1][0].float(), "noise": f.get_slice("noise")[r:r + 1][0].float()}
        if self.num_classes:
            item["cond"] = {"y": f.get_slice("y")[r:r + 1][0].long()}
        return item

    def arrays(self, limit: int | None = None):
        n = len(self) if limit is None else min(limit, len(self))
        items = [self[i] for i in range(n)]
        x = torch.stack([it["x0"] for it in items])
        y = torch.stack([it["cond"]["y"] for it in items]) if self.num_classes else None
        return x, y

    def __repr__(self) -> str:
        return f"CouplingSource({self.root}, n={len(self)}, shape={self.shape}, teacher={self.index.get('teacher')})"
