"""WebDataset-format tar shards as a streaming, map-style source, and a writer for them.

Format (WebDataset's): a shard is a plain tar file whose members are grouped into samples by
key, the member name up to the first dot of its base name: `000123.png`, `000123.cls`,
`000123.txt` make one sample with the extensions "png", "cls", "txt" (lower-cased; a name like
`a/b.seg.png` has key `a/b` and extension "seg.png"). Consecutive members with one key form a
sample; non-files, names without an extension and metadata names (`__...__`) are skipped, as
`webdataset` does. A sample needs one image member (png, jpg, jpeg, webp, bmp, gif; the first
of these when several); its label is the integer text of `.cls`, else `{"label": int}` in
`.json`; its caption is the UTF-8 text of `.txt`.

Why map-style, not webdataset's iterable pipeline: the training order (`order.StepOrder`) is a
pure function of (seed, step) over example indices, which is what makes the batches the same
for any number of DataLoader workers, split exactly across ranks, and a run resumed at step k
identical to an uninterrupted one. That needs random access by index. An iterable over shards
can only approximate this (shard-level shuffles, per-worker buffers whose contents depend on
how far each worker got), and resuming it exactly means replaying the stream. So
`TarShardSource` indexes the shards once at construction, reading tar headers only (Python's
`tarfile` over an unbuffered file: one 512-byte header per member, the member data is skipped
by seeking), and `source[i]` then reads just sample i's image member with one positioned read
(`os.pread`, safe to share across forked workers). The price is that shards must be local (or
on a mounted file system) and uncompressed; the gain is that `StepBatches` works unchanged.

Labels are read at index time (the `.cls` / `.json` members are a few bytes, read right after
their header): that gives `num_classes` exactly (max label + 1, or the length of a
`classes.json` list next to the shards, which also gives `class_names`) and finds bad labels
before training starts. Image data is never read at index time except for the first `probe`
samples, decoded to infer the channel count and the image size, as image folders do.

Reading needs only the standard library; the `webdataset` package (the optional extra
`unifusion[webdataset]`) is used by the tests to check this reader against the reference writer
and reader, never at run time.
"""
from __future__ import annotations

import io
import json
import operator
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..safeio import atomic_path, atomic_write
from .folder import PROBE, ImageFolderSource, readable_item
from .images import (IMAGE_EXTENSIONS, UnreadableImage, _read, _resize_crop, _to_uint8, cap_area, capped_size,
                     check_images, check_variable_size, header_size, own_sizes, size_mismatch, sizes_at,
                     to_channels)

IMAGE_EXTS = tuple(e.lstrip(".") for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
                   if e in IMAGE_EXTENSIONS)  # preference order when a sample has several
CLASSES_FILE = "classes.json"
BLOCK = 512  # tar block size
MAX_OPEN = 64  # shard files kept open per process
_META = re.compile(r"__[^/]*__($|/)")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


# ------------------------------------------------------------------------------ shard lists
def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as in shells and webdataset URLs: `a{1..3}b` -> a1b, a2b, a3b (zero-padded
    to the wider bound when a bound has a leading zero, e.g. {000..010}; descending ranges and a
    step `{0..10..5}` work), `{x,y}` -> the alternatives, nested and repeated groups -> their
    product, in order. A brace group that is neither stays literal."""
    start = pattern.find("{")
    while start != -1:
        end, parts = _brace_group(pattern, start)
        if end is None:
            break
        alts = [s for p in parts for s in expand_braces(p)] if len(parts) > 1 else _brace_range(parts[0])
        if alts is not None:
            head, tails = pattern[:start], expand_braces(pattern[end + 1:])
            return [head + a + t for a in alts for t in tails]
        start = pattern.find("{", start + 1)
    return [pattern]


def _brace_group(s: str, start: int) -> tuple[int | None, list[str]]:
    """(index of the '}' closing the '{' at start, the comma-separated parts at depth 1)."""
    depth, parts, last = 0, [], start + 1
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i, parts + [s[last:i]]
        elif s[i] == "," and depth == 1:
            parts.append(s[last:i])
            last = i + 1
    return None, []


def _brace_range(body: str) -> list[str] | None:
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if not m:
        return None
    a, b = int(m[1]), int(m[2])
    step = abs(int(m[3] or 1)) or 1
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (m[1], m[2]))
    width = max(len(m[1]), len(m[2])) if padded else 0
    return [str(v).zfill(width) for v in range(a, b + (1 if b >= a else -1), step if b >= a else -step)]


def shard_paths(paths) -> list[Path]:
    """The shards named by `paths`: one .tar path, a brace pattern (`train-{000000..000009}.tar`),
    a folder (its *.tar files, sorted by name), or a list of these, in order. Every shard must
    exist: a missing one is a ValueError naming it."""
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not specs:
        raise ValueError("no tar shards given")
    out: list[Path] = []
    for spec in specs:
        spec = str(spec)
        expanded = [Path(s).expanduser() for s in expand_braces(spec)]
        if len(expanded) == 1 and expanded[0].is_dir():
            found = sorted(p for p in expanded[0].iterdir()
                           if p.suffix.lower() == ".tar" and p.is_file() and not p.name.startswith("."))
            if not found:
                raise ValueError(f"no .tar shards in folder {spec}")
            out += found
            continue
        missing = [p for p in expanded if not p.is_file()]
        if missing:
            if len(expanded) > 1:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ValueError(f"{len(missing)} of the {len(expanded)} shards of pattern {spec!r} do not exist: "
                                 f"{missing[0]}{more}; fix the path, or narrow the pattern's range to the "
                                 f"shards that exist")
            raise ValueError(f"tar shard {missing[0]} does not exist; check the path")
        out += expanded
    return out


def split_name(name: str) -> tuple[str | None, str | None]:
    """A member name's (key, extension), webdataset's rule: (None, None) when there is no dot
    in the base name. The extension is lower-cased."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (None, None) if not m else (m[1], m[2].lower())


# ---------------------------------------------------------------------------------- indexing
class _Damaged(Exception):
    """A shard that ends early or has an unreadable header (message: where and why)."""


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes at `offset` (fewer only at the end of the file); no shared file position."""
    chunks, got = [], 0
    while got < size:
        b = os.pread(fd, size - got, offset + got) if hasattr(os, "pread") else _seek_read(fd, size - got, offset + got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _seek_read(fd: int, size: int, offset: int) -> bytes:  # platforms without pread
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


def _scan(path: Path) -> tuple[list[tuple[str, str, int, int]], str | None]:
    """The regular, non-metadata members of one shard as (key, ext, data offset, size), in tar
    order, up to the first damage; and a description of the damage (None for an intact shard).
    Reads headers only."""
    members, damage = [], None
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            head = _pread_exact(f.fileno(), 6, 0)
            for magic, kind in _COMPRESSED.items():
                if head.startswith(magic):
                    raise ValueError(f"tar shard {path} is {kind}-compressed; indexing needs random access, "
                                     f"so decompress it to a plain .tar (its images are compressed already)") from None
            if size == 0:
                return [], "the file is empty"
            if size < BLOCK:
                return [], f"it ends after {size} bytes, inside the first header"
            raise ValueError(f"{path} is not a tar file ({e}); a shard must be an uncompressed tar archive") from None
        try:
            while True:
                try:
                    ti = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    damage = f"reading the header at byte {tf.offset} failed ({e})"
                    break
                if ti is None:
                    break
                tf.members = []  # index only what we keep, not every TarInfo
                if ti.offset_data + ti.size > size:
                    damage = f"member {ti.name} needs bytes up to {ti.offset_data + ti.size} but the file has {size}"
                    key, ext = split_name(ti.name)
                    if key is not None:  # marks the sample the cut falls in
                        members.append((key, ext, -1, ti.size))
                    break
                if not ti.isreg() or _META.match(ti.name) or ("/" not in ti.name and ti.name.startswith("__")
                                                              and ti.name.endswith("__")):
                    continue
                key, ext = split_name(ti.name)
                if key is not None:
                    members.append((key, ext, ti.offset_data, ti.size))
            if damage is None:  # the end-of-archive marker (a zero block) must be there
                end = _pread_exact(f.fileno(), BLOCK, tf.offset)
                if len(end) < BLOCK:
                    damage = f"it ends at byte {size} without the end-of-archive block (expected at byte {tf.offset})"
                elif end.count(0) != BLOCK:
                    damage = f"the header at byte {tf.offset} is not a valid tar header"
        finally:
            tf.close()
    return members, damage


def _group(members) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Consecutive members with one key -> (key, {ext: (offset, size)}), webdataset's grouping."""
    samples: list[tuple[str, dict]] = []
    for key, ext, off, size in members:
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        if ext in samples[-1][1]:
            raise ValueError(f"two members named {key}.{ext} in a row; each sample's extensions must be distinct")
        samples[-1][1][ext] = (off, size)
    return samples


def _complete(samples, damaged: bool) -> tuple[list, list]:
    """(intact samples, incomplete ones) of one shard. In a damaged shard the sample holding the
    cut member is incomplete (`_scan` lists the cut member with offset -1, so it is the last
    sample); when the cut falls between members, the last sample may be missing members that
    were lost, so it counts as incomplete too. Either way: the last sample."""
    if not damaged or not samples:
        return samples, []
    return samples[:-1], samples[-1:]


def _label(fd: int, shard: Path, key: str, parts: dict) -> int | None:
    """The sample's label from `.cls` (integer text) or `.json` ({"label": int}); None if neither."""
    if "cls" in parts:
        off, size = parts["cls"]
        text = _pread_exact(fd, size, off).decode("utf-8", "replace").strip()
        if not re.fullmatch(r"\d+", text):
            raise ValueError(f"{shard}: {key}.cls holds {text[:40]!r}, not a non-negative integer label")
        return int(text)
    if "json" in parts:
        off, size = parts["json"]
        try:
            meta = json.loads(_pread_exact(fd, size, off))
        except ValueError as e:
            raise ValueError(f"{shard}: {key}.json is not valid JSON ({e})") from None
        if isinstance(meta, dict) and "label" in meta:
            y = meta["label"]
            if isinstance(y, bool) or not isinstance(y, int) or y < 0:
                raise ValueError(f"{shard}: {key}.json has label {y!r}, not a non-negative integer")
            return y
    return None


def _class_names(shards: list[Path], num_classes: int) -> list[str] | None:
    f = shards[0].parent / CLASSES_FILE
    if not f.is_file():
        return None
    try:
        names = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); it must be a list of class names") from None
    if not isinstance(names, list) or len(names) < num_classes:
        raise ValueError(f"{f} must be a list of at least {num_classes} class names (labels go up to "
                         f"{num_classes - 1}), got {type(names).__name__} of length {len(names)}")
    return [str(n) for n in names]


# ------------------------------------------------------------------------------------ source
def decode_bytes(data: bytes, name: str, image_size: int | None) -> tuple[Tensor, bool]:
    """`images.decode` for an image held in memory: float32 (C, H, W) in [0, 1] (resized and
    center-cropped to image_size when given), and whether it is grayscale. `name` is for errors."""
    try:
        a, is_gray = _read(io.BytesIO(data))
    except Exception as e:  # PIL raises many types
        raise UnreadableImage(f"cannot read image {name}: {e}; pass skip_corrupt=True (CLI: --skip-corrupt) "
                              f"to skip unreadable samples") from e
    t = torch.from_numpy(a).permute(2, 0, 1)
    return (t if image_size is None else _resize_crop(t, int(image_size))), is_gray


class TarShardSource(torch.utils.data.Dataset):
    """WebDataset-format tar shards as a map-style source of images (kind "image"), decoded per
    item to float32 (C, H, W) in [-1, 1]; see the module docstring for the format and why.

    paths: a .tar file, a brace pattern (`shards/train-{000000..000009}.tar`), a folder of
        *.tar files, or a list of these; samples are indexed in shard order, then tar order.
    image_size, channels, probe: as `ImageFolderSource` (resize + center-crop to a square;
        1 or 3 channels, inferred from the first `probe` readable samples; without image_size
        every image must have the first one's size, checked when it is read).
    skip_corrupt: a truncated or damaged shard keeps its intact samples (those before the damage)
        and drops the incomplete ones, with one warning per shard, and a sample without an image
        member is dropped too; an image that fails to decode is replaced by the next readable
        index (cyclically, so deterministically), warned about once. All are listed in
        `.skipped` ("shard:key"). Without it each of these is a ValueError naming the shard.
    Labels: all samples labelled (.cls / .json) or none; `num_classes` is max label + 1, or the
    length of `classes.json` (a list of names) beside the first shard, which gives `class_names`.
    `.shards` (paths), `.keys` (per sample), `.labels` (int64 (N,) or None), `caption(i)` /
    `captions()` (the `.txt` text, None without one; read on demand, not part of the items).
    """

    kind = "image"

    def __init__(self, paths, image_size: int | None = None, channels: int | None = None,
                 skip_corrupt: bool = False, probe: int = PROBE, keep_size: bool = False, max_area: int | None = None):
        self.variable_size = check_variable_size(image_size, keep_size, max_area)
        self.max_area = int(max_area) if max_area else None
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None (infer), 1 or 3, got {channels}")
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        self.shards = shard_paths(paths)
        self.source = str(paths) if isinstance(paths, (str, os.PathLike)) else \
            f"{len(self.shards)} tar shard(s): {self.shards[0]} ... {self.shards[-1]}"
        self.image_size = None if image_size is None else int(image_size)
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped: list[str] = []
        self._warned: set[str] = set()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._index()
        self._first, c = self._probe(max(1, int(probe)))
        self.channels = channels or c
        self.shape = (self.channels, *self._first[1])
        if self.variable_size:  # every sample's header, read once
            self._sizes = own_sizes(len(self), lambda j: capped_size(*header_size(io.BytesIO(self._bytes(j))),
                                                                     self.max_area),
                                    self.skip_corrupt, self._note_unreadable)
            self.shape = (self.channels, *(int(v) for v in self._sizes.max(0)))

    def sizes(self, indices):
        """(len(indices), 2) (h, w) of the samples (every one the same without keep_size / max_area)."""
        return sizes_at(self, indices)

    # ---------------------------------------------------------------- index
    def _index(self) -> None:
        keys, shard, img, ext, txt, labels = [], [], [], [], [], []
        for s, path in enumerate(self.shards):
            members, damage = _scan(path)
            try:
                samples = _group(members)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            samples, lost = _complete(samples, damage is not None)
            if damage is not None:
                if not self.skip_corrupt:
                    raise ValueError(f"tar shard {path} is truncated or damaged: {damage}; re-create or re-copy "
                                     f"it, or pass skip_corrupt=True (CLI: --skip-corrupt) to use its intact samples")
                warnings.warn(f"tar shard {path} is truncated or damaged ({damage}): using its {len(samples)} "
                              f"intact sample(s), skipping {len(lost)} incomplete one(s) (skip_corrupt)")
                self.skipped += [f"{path}:{k}" for k, _ in lost]
            fd = self._fd(s)
            for key, parts in samples:
                e = next((e for e in IMAGE_EXTS if e in parts), None)
                if e is None:
                    if not self.skip_corrupt:
                        raise ValueError(f"tar shard {path}: sample {key} has no image member (its members: "
                                         f"{', '.join(key + '.' + x for x in parts)}); every sample needs one of "
                                         f"{', '.join('.' + x for x in IMAGE_EXTS)}; remove the sample or pass "
                                         f"skip_corrupt=True (CLI: --skip-corrupt) to skip such samples")
                    self._note(f"{path}:{key}", "no image", f"tar shard {path}: sample {key} has no image member "
                               f"and is skipped (skip_corrupt); later ones are skipped silently and listed in .skipped")
                    continue
                keys.append(key)
                shard.append(s)
                img.append(parts[e])
                ext.append(IMAGE_EXTS.index(e))
                txt.append(parts.get("txt", (-1, 0)))
                labels.append(_label(fd, path, key, parts))
        if not keys:
            raise ValueError(f"no samples in the tar shards {self.source}" +
                             (f" ({len(self.skipped)} skipped)" if self.skipped else ""))
        self.keys = keys
        self._shard = np.asarray(shard, np.int32)
        self._img = np.asarray(img, np.int64).reshape(-1, 2)  # (offset, size) of each image member
        self._ext = np.asarray(ext, np.int8)
        self._txt = np.asarray(txt, np.int64).reshape(-1, 2)
        self.has_captions = bool((self._txt[:, 0] >= 0).any())  # some sample has a .txt member
        have = [y is not None for y in labels]
        if any(have) and not all(have):
            j = have.index(not have[0])
            raise ValueError(f"tar shards {self.source}: sample {self._name(j)} is "
                             f"{'un' if have[0] else ''}labelled but {self._name(0)} is "
                             f"{'' if have[0] else 'un'}labelled; label every sample (.cls or .json) or none")
        if have[0]:
            self.labels = torch.tensor(labels, dtype=torch.int64)
            k = int(self.labels.max()) + 1
            self.class_names = _class_names(self.shards, k)
            self.num_classes = k if self.class_names is None else len(self.class_names)
        else:
            self.labels, self.class_names, self.num_classes = None, None, 0

    def _probe(self, k: int) -> tuple[tuple[str, tuple[int, int]], int]:
        """Decode the first k readable samples: (the first one's name and (H, W)), inferred channels."""
        first, gray, j = None, [], 0
        while len(gray) < k and j < len(self):
            try:
                t, is_gray = self._decode(j)
            except UnreadableImage:
                if not self.skip_corrupt:
                    raise
                self._note_unreadable(j)
                j += 1
                continue
            first = first or (self._name(j), tuple(t.shape[1:]))
            if tuple(t.shape[1:]) != first[1] and not self.variable_size:
                raise size_mismatch(first[0], first[1], self._name(j), t.shape[1:])
            gray.append(is_gray)
            j += 1
        if first is None:
            raise ValueError(f"no readable images in the tar shards {self.source} ({len(self)} unreadable)")
        return first, 1 if all(gray) else 3

    # ---------------------------------------------------------------- reading
    def _fd(self, s: int) -> int:
        """An open descriptor of shard s (at most MAX_OPEN kept; positioned reads only, so one
        descriptor inherited by forked DataLoader workers is safe to share)."""
        fd = self._fds.get(s)
        if fd is None:
            fd = os.open(self.shards[s], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._fds[s] = fd
            while len(self._fds) > MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(s)
        return fd

    def _name(self, j: int) -> str:
        ext = IMAGE_EXTS[self._ext[j]]
        return f"{self.shards[self._shard[j]]}:{self.keys[j]}.{ext}"

    def _bytes(self, j: int) -> bytes:
        off, size = (int(v) for v in self._img[j])
        data = _pread_exact(self._fd(int(self._shard[j])), size, off)
        if len(data) != size:
            raise UnreadableImage(f"cannot read image {self._name(j)}: the shard ends after {len(data)} of its "
                                  f"{size} bytes (changed since it was indexed?); pass skip_corrupt=True "
                                  f"(CLI: --skip-corrupt) to skip unreadable samples")
        return data

    def _decode(self, j: int) -> tuple[Tensor, bool]:
        return decode_bytes(self._bytes(j), self._name(j), self.image_size)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i) -> dict:
        return readable_item(self, i, self._item, self._note_unreadable, "samples",
                             f"no readable images in the tar shards {self.source}")

    def _item(self, j: int) -> dict:
        """Sample j decoded: {"x0": (C, H, W) in [-1, 1], "cond": {"y": label}} (no cond if unlabelled)."""
        t, _ = self._decode(j)
        if self.variable_size:
            t = cap_area(t, self.max_area)
        elif tuple(t.shape[1:]) != self._first[1]:
            raise size_mismatch(self._first[0], self._first[1], self._name(j), t.shape[1:])
        item = {"x0": (to_channels(t, self.channels) * 2 - 1).contiguous()}
        if self.labels is not None:
            item["cond"] = {"y": self.labels[j].clone()}
        return item

    def caption(self, i: int) -> str | None:
        """Sample i's `.txt` member as text (None when it has none); read from the shard now."""
        off, size = (int(v) for v in self._txt[operator.index(i)])
        if off < 0:
            return None
        return _pread_exact(self._fd(int(self._shard[i])), size, off).decode("utf-8", "replace")

    def captions(self, indices=None) -> list[str | None]:
        """`caption(i)` for each index (all samples when None)."""
        return [self.caption(i) for i in (range(len(self)) if indices is None else indices)]

    def _note(self, what: str, why: str, message: str) -> None:
        """List `what` in .skipped; warn with `message` the first time (per process) for `why`."""
        if what in self.skipped:
            return
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(message)
        self.skipped.append(what)

    def _note_unreadable(self, j: int) -> None:
        self._note(f"{self.shards[self._shard[j]]}:{self.keys[j]}", "unreadable",
                   f"{self.source}: unreadable image {self._name(j)} is replaced by the next readable one "
                   f"(skip_corrupt); later ones are replaced silently and listed in .skipped")

    # the folder source's arrays() is written against the interface only (len, [i], shape, labels)
    arrays = ImageFolderSource.arrays

    def __getstate__(self) -> dict:  # descriptors do not travel to spawned workers; they reopen
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        return state

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        fds, self._fds = getattr(self, "_fds", {}), OrderedDict()
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        return (f"TarShardSource(n={len(self)}, shards={len(self.shards)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, source={self.source!r})")


# ------------------------------------------------------------------------------------ writer
def write_shards(dataset, out_dir, per_shard: int = 1000, prefix: str = "shard",
                 exist_ok: bool = False) -> list[Path]:
    """Write an image source (an `ArrayDataset` such as `digits()`, or any source whose items
    are {"x0": (1 or 3, H, W) in [-1, 1], "cond": {"y"}?}) as WebDataset shards
    `out_dir/{prefix}-000000.tar`, ... of `per_shard` samples each; returns their paths.

    Sample i is `{key}.png` (8-bit, v -> round((v + 1) * 127.5), as `write_image_folder`),
    when labelled `{key}.cls` (the label as text), and when the source has captions (a
    `captions(indices)` method, e.g. `shapes`) `{key}.txt` (UTF-8); key = i zero-padded to at
    least 6 digits.
    `classes.json` (the class names) is written beside the shards when the source has them.
    Every shard is written atomically (temporary file, fsync, rename) with fixed member
    metadata, so the same data gives byte-identical shards. Needs only the standard library
    and Pillow; webdataset reads the result, and so does `TarShardSource`.
    """
    from PIL import Image

    per_shard = int(per_shard)
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not exist_ok:
        raise FileExistsError(f"{out} is not empty; choose a new folder or pass exist_ok=True")
    n = len(dataset)
    if n == 0:
        raise ValueError("write_shards: the dataset is empty")
    width = max(6, len(str(n - 1)))
    paths = []
    captioned = callable(getattr(dataset, "captions", None))
    for s, lo in enumerate(range(0, n, per_shard)):
        path = out / f"{prefix}-{s:06d}.tar"
        texts = list(dataset.captions(range(lo, min(n, lo + per_shard)))) if captioned else None
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(lo, min(n, lo + per_shard)):
                item = dataset[i]
                x = check_images(item["x0"][None], (1, 3), "write_shards")[0]
                buf = io.BytesIO()
                Image.fromarray(_to_uint8(x)).save(buf, format="PNG")
                members = [("png", buf.getvalue())]
                if "cond" in item and "y" in item["cond"]:
                    members.append(("cls", str(int(item["cond"]["y"])).encode()))
                if texts is not None and texts[i - lo] is not None:
                    members.append(("txt", str(texts[i - lo]).encode("utf-8")))
                key = str(i).zfill(width)
                for ext, blob in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(blob), 0o444, 0
                    tf.addfile(info, io.BytesIO(blob))
        paths.append(path)
    names = getattr(dataset, "class_names", None)
    if names is not None:
        atomic_write(out / CLASSES_FILE, json.dumps([str(c) for c in names]))
    return paths
