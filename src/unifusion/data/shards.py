"""Sharded data folders on disk, written once for every kind: safetensors shards plus index.json,
written resumably and read memory-mapped. `unifusion couple` (data/couplings.py) and `unifusion
encode` (data/latents.py) are its two users.

    folder/index.json               {"format", "version", <the writer's header>, "per_shard", "count",
                                     "shards": [{"file", "count", <start key>, "bytes"?}]}
    folder/<prefix>-000000.safetensors   rows [0, per_shard) of the data, <prefix>-000001 the next ...

Shard k holds items [k * per_shard, min(count, (k + 1) * per_shard)), so its content depends on k
alone and a resumed writer makes exactly the shards an uninterrupted one would. Each shard is
written atomically (a hidden temporary file renamed into place: a partial file is never under a
listed name) and the index is rewritten after each shard, so a shard the index lists is complete.
Resuming keeps the listed shards whose file is there (and, when the index records "bytes", has
that size) and writes the others. Nothing is written before the first shard's arrays are made, so a
refused run (a bad sampler, non-finite samples) leaves the folder as it was; `overwrite` deletes an
earlier folder of the same kind only then, and never a folder of another kind.

`ShardReader` memory-maps the shards (MappedShard: numpy memory maps at the offsets of the
safetensors header) and reads one row at a time, so a folder larger than RAM streams like any
source; `finite_rows` names the shard and item of a NaN instead of letting training skip it.
"""
from __future__ import annotations

import bisect
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..safeio import atomic_write, save_safetensors

INDEX = "index.json"
VERSION = 1
TEMP_PREFIX = ".tmp-"  # safeio's temporary files: never listed, never a reason to call a folder foreign


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class MappedShard:
    """A safetensors file's arrays as read-only numpy memory maps. The header (8 bytes of length,
    then JSON: dtype, shape, data offsets) is read here, not with safetensors' safe_open, whose
    get_slice keeps about 60 bytes per call: over a long run (two reads per item, millions of items)
    that grows the heap without bound (measured: +25 MiB per 200,000 items)."""

    def __init__(self, path):
        path = str(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.arrays: dict[str, np.ndarray] = {}
        for key, h in header.items():
            dtype, shape = np.dtype(_DTYPES[h["dtype"]]), tuple(h["shape"])
            lo, hi = h["data_offsets"]
            if hi - lo != dtype.itemsize * math.prod(shape):
                raise ValueError(f"array {key!r}: {hi - lo} bytes for shape {shape} of {h['dtype']}")
            self.arrays[key] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + lo, shape=shape)
                                if math.prod(shape) else np.zeros(shape, dtype))

    def rows(self, key: str, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of `key`, copied out of the memory map."""
        return torch.from_numpy(np.array(self.arrays[key][lo:hi]))


def index_format(path) -> str | None:
    """The "format" of a folder's index.json, or None when it has no readable one."""
    p = Path(path) / INDEX
    if not (Path(path).is_dir() and p.is_file()):
        return None
    try:
        return json.loads(p.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def read_index(folder, fmt: str, what: str, command: str) -> dict:
    """The folder's index, checked to be of format `fmt`; one-line errors naming the fix."""
    p = Path(folder) / INDEX
    try:
        index = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not a readable {what} index ({e}); rebuild the folder with `{command} ... "
                         "--overwrite` (the same arguments plus --overwrite)") from None
    if not isinstance(index, dict) or index.get("format") != fmt:
        raise ValueError(f"{p} is not a {what} index (format {getattr(index, 'get', lambda k: None)('format')!r})")
    return index


def _expected(k: int, count: int, per_shard: int) -> int:
    return min(count, (k + 1) * per_shard) - k * per_shard


def _ours(folder: Path, fmt: str, prefix: str) -> bool:
    """A folder this writer may delete on --overwrite: its index is of format `fmt`, or (an index
    that cannot be read) it holds nothing but an index, `prefix` shards and temporary files."""
    if index_format(folder) == fmt:
        return True
    if not (folder / INDEX).is_file():
        return False
    shard = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.safetensors")
    return all(e.is_file() and (e.name == INDEX or e.name.startswith(TEMP_PREFIX) or shard.fullmatch(e.name))
               for e in folder.iterdir())


def check_overwrite(folder, fmt: str, prefix: str, what: str, command: str) -> None:
    """--overwrite may delete `folder` only when it is empty, missing or a folder of this kind;
    anything else is refused (so a typo in --out never deletes other files)."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {p} is a file, not a {what} folder; choose another --out")
    if p.is_dir() and any(p.iterdir()) and not _ours(p, fmt, prefix):
        raise ValueError(f"--overwrite: {p} does not hold {what} (no index.json of `{command}`), so it is left "
                         "alone; choose another --out")


def write_shards(folder, *, fmt: str, what: str, command: str, prefix: str, start_key: str, count: int,
                 per_shard: int,
                 header: dict, make: Callable[[list[int], Callable[[int], None]], dict[str, Tensor]],
                 check_resume: Callable[[dict], None], record_bytes: bool = True, progress: bool = True,
                 save: Callable | None = None, overwrite: bool = False) -> tuple[dict, int]:
    """Write (or resume writing) items 0..count-1 in shards of `per_shard`; returns (index, shards written).

    make(indices, tick) returns the shard's arrays (each with len(indices) rows, or any other
    per-shard arrays) and may call tick(n) after every n items for the progress bar; it raises
    (a ValueError naming the items) rather than return data that must not be stored.
    check_resume(old_index) raises when an existing folder was written with another header.
    save(arrays, path) writes a shard atomically (default safeio.save_safetensors).
    overwrite: start anew, deleting an earlier folder of this kind (check_overwrite) once the
    first shard is made. Until then nothing is written: a refusal leaves the folder as it was."""
    from tqdm.auto import tqdm
    save = save or save_safetensors
    out = Path(folder)
    if count < 1 or per_shard < 1:
        raise ValueError(f"--n and the shard size must be >= 1, got {count} and {per_shard}")
    index = {"format": fmt, "version": VERSION, **header, "per_shard": per_shard, "shards": [], "count": count}
    old = None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a {what} folder; choose another --out")
    if overwrite:
        check_overwrite(out, fmt, prefix, what, command)
    elif out.is_dir() and (out / INDEX).is_file():
        old = read_index(out, fmt, what, command)
        check_resume(old)
        n_shards = math.ceil(count / per_shard)
        keep = []
        for s in old.get("shards", []):
            k, f = s[start_key] // per_shard, out / s["file"]
            complete = (s[start_key] == k * per_shard and k < n_shards and s["count"] == _expected(k, count, per_shard)
                        and f.is_file() and ("bytes" not in s or f.stat().st_size == s["bytes"]))
            if complete:  # (a shard of another --n, a missing or truncated file: written again)
                keep.append(s)
        index["shards"] = keep
    elif out.is_dir() and any(not p.name.startswith(TEMP_PREFIX) for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {what} index; choose an empty or new --out")
    done = {s[start_key] for s in index["shards"]}
    todo = [k for k in range(math.ceil(count / per_shard)) if k * per_shard not in done]
    if not todo:
        if old != index:  # (e.g. a smaller --n of a complete folder: the index lists what it keeps)
            atomic_write(out / INDEX, json.dumps(index, indent=1))
        return index, 0

    def items(k: int) -> list[int]:
        return list(range(k * per_shard, k * per_shard + _expected(k, count, per_shard)))

    bar = tqdm(total=count, initial=count - sum(_expected(k, count, per_shard) for k in todo), desc=what,
               unit="item", disable=not progress, dynamic_ncols=True)
    try:
        first = make(items(todo[0]), bar.update)  # everything is checked before anything is written
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / INDEX, json.dumps(index, indent=1))  # a run killed from here on resumes
        for k in todo:
            indices = items(k)
            arrays = first if k == todo[0] else make(indices, bar.update)
            first = None
            name = f"{prefix}-{k:06d}.safetensors"
            save(arrays, out / name)
            entry = {"file": name, "count": len(indices), start_key: indices[0]}
            if record_bytes:
                entry["bytes"] = (out / name).stat().st_size
            index["shards"] = sorted(index["shards"] + [entry], key=lambda s: s[start_key])
            atomic_write(out / INDEX, json.dumps(index, indent=1))
            bar.n = sum(s["count"] for s in index["shards"])
            bar.refresh()
    except BaseException:
        bar.leave = False  # a refusal's one line stays alone on the screen
        raise
    finally:
        bar.close()
    return index, len(todo)


class ShardReader(torch.utils.data.Dataset):
    """Rows of the shards an index lists, read memory-mapped one at a time.

    Opening checks every shard (cheap: sizes and safetensors headers, no data read): a listed
    file that is missing, truncated (its size differs from the index's "bytes") or unreadable,
    an array of the wrong shape, or fewer items than the index's count (an interrupted writer)
    is one ValueError naming the file and `command` as the fix. `arrays` maps the keys every
    shard must hold to the shape of one row."""

    def __init__(self, folder, fmt: str, what: str, command: str, start_key: str, arrays: dict[str, tuple]):
        self.root = Path(folder)
        self.index = read_index(self.root, fmt, what, command)
        self._what, self._command = what, command
        shards = sorted(self.index["shards"], key=lambda s: s[start_key])
        rerun = f"rerun `{command}` with the same arguments to rewrite it"
        for s in shards:
            f = self.root / s["file"]
            if not f.is_file():
                raise ValueError(f"shard {f} is listed in the index but missing; {rerun}")
            if "bytes" in s and f.stat().st_size != s["bytes"]:
                raise ValueError(f"shard {f} is truncated (expected {s['bytes']} bytes, found {f.stat().st_size}); "
                                 f"{rerun}")
        total = sum(s["count"] for s in shards)
        if total < self.index["count"]:
            raise ValueError(f"{self.root} holds {total} of {self.index['count']} {what} (an interrupted "
                             f"`{command}`); rerun it with the same arguments to finish")
        self._shards = shards
        self._starts = [s[start_key] for s in shards]
        self._open: dict[int, object] = {}
        for i in range(len(shards)):  # complete and of the index's shapes: fail now, not mid-run
            self._check(i, arrays)
        self._open = {}  # opened again on first use (and in each DataLoader worker)

    def _handle(self, k: int) -> MappedShard:
        if k not in self._open:
            self._open[k] = MappedShard(self.root / self._shards[k]["file"])
        return self._open[k]

    def _check(self, k: int, arrays: dict[str, tuple]) -> None:
        s = self._shards[k]
        try:
            f = self._handle(k)
            for key, row in arrays.items():
                shape = tuple(f.arrays[key].shape)
                if shape != (s["count"], *row):
                    raise ValueError(f"{key} has shape {shape}, the index says ({s['count']}, "
                                     f"{', '.join(map(str, row))})")
        except Exception as e:  # truncated or foreign files: safetensors raises its own types
            raise ValueError(f"shard {self.root / s['file']} is damaged or not a {self._what} shard ({e}); delete it "
                             f"and rerun `{self._command}` with the same arguments to write it again") from None

    def has(self, key: str) -> bool:
        """Whether the shards hold the array `key` (the first shard answers for all)."""
        if not self._shards:
            return False
        return key in MappedShard(self.root / self._shards[0]["file"]).arrays  # not kept open

    def __getstate__(self):  # DataLoader workers reopen the shards
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __len__(self) -> int:
        return self.index["count"]

    def locate(self, i: int) -> tuple[int, int]:
        """Item i -> (shard, row)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} {self._what}")
        i %= len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def row(self, key: str, i: int) -> Tensor:
        """Row i of the array `key` (a copy: one row read from the memory map)."""
        k, r = self.locate(int(i))
        return self._handle(k).rows(key, r, r + 1)[0]

    def rows(self, key: str, k: int, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of the array `key` in shard k."""
        return self._handle(k).rows(key, lo, hi)

    def finite_rows(self, key: str, k: int, lo: int, hi: int) -> Tensor:
        """rows(), refused when a value is NaN or infinite, naming the shard and the item: a training
        step on such an item would be skipped silently. (One isfinite over rows already read.)"""
        t = self.rows(key, k, lo, hi)
        ok = torch.isfinite(t.reshape(len(t), -1)).all(1)
        if not bool(ok.all()):
            r = lo + int((~ok).nonzero()[0])
            raise ValueError(f"shard {self.root / self._shards[k]['file']} holds non-finite values (NaN or inf) in "
                             f"{key!r} of item {self._starts[k] + r} (row {r}); the folder is damaged or was not "
                             f"written by `{self._command}`, which refuses them: rebuild it with `{self._command} "
                             "... --overwrite`")
        return t
