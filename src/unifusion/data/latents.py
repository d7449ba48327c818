"""Autoencoder latents on disk: what latent diffusion trains on (`unifusion encode` writes them).

A latents folder holds safetensors shards and an index (the write loop and the memory-mapped
reader are data/shards.py's, shared with the couplings of `unifusion couple`):

    index.json    {"format": "unifusion-latents", "version": 1, "autoencoder": ae.describe(),
                   "store": "mean_std", "shape": [c, h, w] (one latent), "image_shape": [C, H, W],
                   "num_classes", "class_names", "kind": "latent", "source": the image data (a name or
                   an absolute path), "source_options": {...}, "per_shard", "count",
                   "shards": [{"file", "count", "first_index", "bytes"}]}
    latents-000000.safetensors
                  "mean" (n, c, h, w) float32: the posterior mean, normalised: (z - shift) * scale
                  "std"  (n, c, h, w) float32: the posterior std in the same units: std * scale
                  "index" (n,) int64: the item's index in the image source
                  "y" (n,) int64 when the source is labelled
                  "caption_bytes" uint8 + "caption_offsets" int64 (n + 1) when the source has captions
                  (caption i is caption_bytes[offsets[i]:offsets[i + 1]], UTF-8)

What is stored, and why: the posterior mean and std of each image, not a sample. Training reads
the mean (`LatentSource` items {"x0": mean, "cond": {"y"}}): a deterministic function of the
index, so the (seed, step) order, exact resume and K ranks == one rank hold as for any other
source, and one encoding serves every run. A sample z = mean + std * n would be a fixed draw per
image (no fresh noise per epoch without breaking determinism). With a KL weight of ~1e-6 nothing
but reconstruction pulls the posterior std down, so it shrinks as the autoencoder trains; how
small it is next to the spread of the normalised means (sigma_data = 0.5 by construction) is
measured, not assumed: benchmarks/latent_memory.py prints the ratio mean(std) / std(means) for
the autoencoder it is given. Measured so far (CPU): 0.54 for a 16-wide ae-f4 after only 150 steps
on shapes-32 (a barely trained autoencoder; the number for the benchmark's autoencoder belongs in
BENCHMARKS.md). Whatever the ratio, the mean is the posterior's most likely code and the input
of the decoder's reconstruction. The std is stored so that a sampled-latent option, or measuring
the ratio, needs no re-encoding.

Shard k holds items [k * per_shard, (k + 1) * per_shard) of the source, so a killed `unifusion
encode` resumes at the first missing shard with identical shards and no item duplicated or
skipped; a shard is written atomically and listed only once complete; shards that are listed but
missing or truncated (their size differs from the index's "bytes") are refused when the folder is
opened, naming the file, and written again by rerunning `unifusion encode`.

Images of several sizes (a source with `variable_size`: image folders / tar shards with --keep-size or
--max-area, shapes-mixed): each image is encoded alone at its own size (center-cropped to a multiple of the
autoencoder's factor), its latent stored zero-padded into the largest latent shape, with "size" (n, 2) int64
its latent (h, w); the index records "variable_size": true and "shape" / "image_shape" are the largest. The
LatentSource then yields each latent at its own size (`sizes(indices)`), for packed training.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from . import shards
from .source import collate

FORMAT = "unifusion-latents"
COMMAND = "unifusion encode"
STORE = "mean_std"


def is_latents(path) -> bool:
    """A folder whose index.json is a latents index."""
    return shards.index_format(path) == FORMAT


def read_index(folder) -> dict:
    return shards.read_index(folder, FORMAT, "latents", COMMAND)


# ------------------------------------------------------------------------------ writing
def image_shape_for(ae, source, data: str) -> tuple[int, int, int]:
    """The (C, H, W) of the source's images, checked against what the autoencoder takes; one
    ValueError naming the sizes and the fix otherwise."""
    shape = tuple(getattr(source, "shape", ()))
    if getattr(source, "kind", "image") != "image" or len(shape) != 3:
        raise ValueError(f"`unifusion encode` takes images (C, H, W) in [-1, 1], but {data} holds "
                         f"{getattr(source, 'kind', '?')} data of shape {shape}")
    c, h, w = shape
    if getattr(source, "variable_size", False):  # each image is cropped to a multiple of the factor when encoded
        h, w = h // ae.factor * ae.factor, w // ae.factor * ae.factor
    if c != ae.image_channels:
        raise ValueError(f"{data} has {c}-channel images but the autoencoder takes {ae.image_channels}-channel ones; "
                         f"pass --channels {ae.image_channels} (image folders) or data with {ae.image_channels} "
                         "channel(s)")
    size = getattr(ae, "image_size", None)
    if size and getattr(source, "variable_size", False):
        raise ValueError(f"{data} holds images of several sizes, but the autoencoder takes only {size}x{size} ones")
    if size and (h, w) != (size, size):
        raise ValueError(f"the autoencoder takes {size}x{size} images but {data} has {w}x{h} images; pass "
                         f"--image-size {size} to resize and center-crop them (image folders and tar shards)")
    if h % ae.factor or w % ae.factor:
        raise ValueError(f"{data} has {w}x{h} images, not divisible by the autoencoder's downsampling factor "
                         f"{ae.factor}; pass --image-size N with N a multiple of {ae.factor}")
    return c, h, w


def size_hint(e: ValueError, ae) -> ValueError:
    """An image folder's "images differ in size" error with the size a fixed-size autoencoder
    takes added to the fix (other errors unchanged)."""
    size = getattr(ae, "image_size", None)
    if size and "differ in size" in str(e):
        return ValueError(f"{e}; this autoencoder takes {size}x{size} images: pass --image-size {size}")
    return e


def _read_images(source, indices: list[int], ae) -> dict:
    try:
        fast = getattr(source, "batch", None)
        return fast(indices) if fast is not None else collate([source[i] for i in indices])
    except ValueError as e:  # e.g. an image folder of mixed sizes, met at its first odd file
        raise size_hint(e, ae) from None


def _captions(texts: list[str | None]) -> dict[str, Tensor]:
    blobs = [(t or "").encode("utf-8") for t in texts]  # an item without a caption (tar: no .txt) stores ""
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blobs], dtype=torch.int64), 0)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offsets[-1] else \
        torch.zeros(0, dtype=torch.uint8)
    return {"caption_bytes": data.clone(), "caption_offsets": offsets}


def latents_header(ae, source, data: str, data_options: dict | None = None) -> dict:
    """The index fields a latents folder of `source` through `ae` records (module docstring)."""
    image_shape = image_shape_for(ae, source, data)
    out = {"autoencoder": ae.describe(), "store": STORE,
           "shape": [int(v) for v in ae.latent_shape(image_shape)], "image_shape": list(image_shape),
           "num_classes": int(getattr(source, "num_classes", 0) or 0), "class_names": source.class_names,
           "kind": "latent", "source": data, "source_options": dict(data_options or {})}
    if getattr(source, "variable_size", False):
        out["variable_size"] = True
    return out


def _encode_own_sizes(ae, source, idx: list[int], latent_shape, encode) -> tuple[Tensor, Tensor, Tensor, list]:
    """Items idx of a variable-size source, each encoded at its own size (images of one size batched):
    (mean, std) zero-padded into latent_shape, their latent sizes (n, 2), and the items' conds."""
    f = ae.factor
    items = [source[i] for i in idx]
    n = len(items)
    mean, std = torch.zeros(n, *latent_shape), torch.zeros(n, *latent_shape)
    sizes = torch.zeros(n, 2, dtype=torch.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for m, it in enumerate(items):
        h, w = (int(v) // f * f for v in it["x0"].shape[1:])
        if not h or not w:
            raise ValueError(f"item {idx[m]} is {it['x0'].shape[2]}x{it['x0'].shape[1]}, smaller than the "
                             f"autoencoder's factor {f}")
        groups.setdefault((h, w), []).append(m)
    for (h, w), members in groups.items():
        crops = []
        for m in members:
            x = items[m]["x0"]
            top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
            crops.append(x[:, top:top + h, left:left + w])
        mu, sd = encode(torch.stack(crops))
        mean[members, :, :h // f, :w // f] = mu
        std[members, :, :h // f, :w // f] = sd
        sizes[members] = torch.tensor([h // f, w // f])
    return mean, std, sizes, [it.get("cond") for it in items]


def encode_latents(ae, source, out, *, data: str, data_options: dict | None = None, count: int | None = None,
                   per_shard: int = 4096, batch_size: int = 64, progress: bool = True,
                   overwrite: bool = False) -> tuple[dict, int]:
    """Encode items 0..count-1 of an image source into a latents folder (or finish one an
    interrupted run left); returns (index, shards written: 0 when it was already complete).

    `data`/`data_options` name the image data as `data.load` takes it (recorded in the index:
    evaluation scores decoded samples against it). Batches of `batch_size` go through
    ae.encode_posterior in fp32 without gradients on the autoencoder's device. Captions are
    stored when the source has them (`captions(indices)`; tar shards: their `.txt` members, "" for
    an item without one). Latents that are not finite are refused, naming the images.
    overwrite: replace an earlier latents folder in `out` (shards.write_shards)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    header = latents_header(ae, source, data, data_options)
    count = len(source) if count is None else int(count)
    if not 1 <= count <= len(source):
        raise ValueError(f"--n must be in 1..{len(source)} (the size of {data}), got {count}")
    described, latent_shape = header["autoencoder"], tuple(header["shape"])
    labelled = bool(header["num_classes"])
    captioned = callable(getattr(source, "captions", None)) and getattr(source, "has_captions", True)
    device = next(iter(ae.parameters()), torch.zeros(())).device if hasattr(ae, "parameters") else "cpu"
    scale = torch.as_tensor(ae.scale, dtype=torch.float32).reshape(1, -1, 1, 1)

    def check_resume(old: dict) -> None:
        was = old.get("autoencoder") or {}
        a, b = str(was.get("digest", "")), str(described.get("digest"))
        if not a or not (a.startswith(b) or b.startswith(a)):  # (a digest may be recorded shortened)
            raise ValueError(f"{out} holds latents encoded with autoencoder {was.get('path')} (digest "
                             f"{was.get('digest')}), not {described.get('path')} (digest {described.get('digest')}); "
                             "pass the original --autoencoder to finish it, or encode into another --out")
        changed = [k for k in ("shift", "scale") if not _same_numbers(was.get(k), described.get(k))]
        if changed:  # the same weights with re-measured statistics: the shards would mix normalisations
            raise ValueError(f"{out} holds latents normalised with the {' and '.join(changed)} "
                             f"{', '.join(str(was.get(k)) for k in changed)} of autoencoder {was.get('path')}, but it "
                             f"now has {', '.join(str(described.get(k)) for k in changed)} (`unifusion autoencoder "
                             "stats` measured them again); encode into another --out, or pass --overwrite to "
                             "encode everything anew")
        differ = [k for k in ("store", "shape", "image_shape", "source", "source_options", "per_shard")
                  if old.get(k) != {**header, "per_shard": per_shard}.get(k)]
        if differ:
            raise ValueError(f"{out} holds latents of other data or options ({', '.join(differ)}: "
                             f"{', '.join(repr(old.get(k)) for k in differ)}); rerun with the same --data and "
                             "options to finish it, or encode into another --out")

    variable = bool(header.get("variable_size"))

    def encode(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            mean, std = ae.encode_posterior(x.to(device, torch.float32))
            return ae.normalize(mean).float().cpu(), std.float().cpu() * scale

    def make(indices: list[int], tick) -> dict[str, Tensor]:
        means, stds, ys, sizes = [], [], [], []
        for b in range(0, len(indices), batch_size):
            idx = indices[b:b + batch_size]
            if variable:  # every image at its own size
                mean, std, size, conds = _encode_own_sizes(ae, source, idx, latent_shape, encode)
                means.append(mean)
                stds.append(std)
                sizes.append(size)
                batch = {"cond": {"y": torch.stack([c["y"] for c in conds])}} if labelled else {}
            else:
                batch = _read_images(source, idx, ae)
                mean, std = encode(batch["x0"])
                means.append(mean)
                stds.append(std)
            bad = ~(torch.isfinite(means[-1]).flatten(1).all(1) & torch.isfinite(stds[-1]).flatten(1).all(1))
            if bool(bad.any()):
                which = [idx[i] for i in bad.nonzero().flatten().tolist()]
                raise ValueError(f"the autoencoder gave non-finite latents (NaN or inf) for item(s) {which[:8]}"
                                 f"{' ...' if len(which) > 8 else ''} of {data}; nothing of this shard is stored: "
                                 "check those images and the autoencoder (its weights or latent statistics)")
            if labelled:
                ys.append(batch["cond"]["y"].long())
            tick(len(idx))
        arrays = {"mean": torch.cat(means), "std": torch.cat(stds), "index": torch.tensor(indices, dtype=torch.int64)}
        if tuple(arrays["mean"].shape[1:]) != latent_shape:
            raise ValueError(f"the autoencoder returned latents of shape {tuple(arrays['mean'].shape[1:])}, but its "
                             f"latent_shape says {latent_shape}")
        if labelled:
            arrays["y"] = torch.cat(ys)
        if variable:
            arrays["size"] = torch.cat(sizes)
        if captioned:
            arrays.update(_captions(list(source.captions(indices))))
        return arrays

    return shards.write_shards(out, fmt=FORMAT, what="latents", command=COMMAND, prefix="latents",
                               start_key="first_index", count=count, per_shard=per_shard, header=header, make=make,
                               check_resume=check_resume, record_bytes=True, progress=progress,
                               overwrite=overwrite)


def _same_numbers(a, b) -> bool:
    """Two recorded lists of statistics are the same (None: nothing recorded to compare)."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-9 + 1e-6 * abs(float(y)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ reading
class LatentSource(shards.ShardReader):
    """A latents folder as a source (kind "latent"): items {"x0": the normalised posterior mean
    (c, h, w), "cond": {"y"}} read memory-mapped one row at a time; nothing but the index is held
    in memory. `autoencoder` (its describe()), `image_shape` and `reference` (the image data the
    latents came from, for evaluation) come from the index."""

    kind = "latent"

    def __init__(self, folder):
        index = read_index(folder)
        shape = tuple(int(v) for v in index["shape"])
        super().__init__(folder, FORMAT, "latents", COMMAND, "first_index", {"mean": shape, "std": shape})
        self.source = str(self.root)
        self.shape = shape
        self.image_shape = tuple(index["image_shape"])
        self.autoencoder = dict(index["autoencoder"])
        self.num_classes = int(index.get("num_classes") or 0)
        self.class_names = index.get("class_names")
        self.reference = (index.get("source"), dict(index.get("source_options") or {}))
        if self.num_classes and not self.has("y"):
            raise ValueError(f"{self.root} has no labels 'y' but its index says the data has "
                             f"{self.num_classes} classes; rerun `{COMMAND}` into a new --out")
        self.has_captions = self.has("caption_offsets")
        self.variable_size = bool(index.get("variable_size"))
        if self.variable_size and not self.has("size"):
            raise ValueError(f"{self.root} says its latents have several sizes but holds no 'size'; rerun "
                             f"`{COMMAND}` into a new --out")

    def sizes(self, indices):
        """(len(indices), 2) int64 latent (h, w) of the items (all `shape[1:]` for latents of one size)."""
        import numpy as np
        idx = [int(i) for i in indices]
        if not self.variable_size:
            return np.tile(np.array([self.shape[1:]], dtype=np.int64), (len(idx), 1))
        return np.stack([self.rows("size", *self.locate(i), self.locate(i)[1] + 1)[0].numpy() for i in idx]
                        ) if idx else np.zeros((0, 2), dtype=np.int64)

    def __getitem__(self, i) -> dict:
        k, r = self.locate(int(i))
        item = {"x0": self.finite_rows("mean", k, r, r + 1)[0].float()}
        if self.variable_size:  # the latent at its own size
            h, w = (int(v) for v in self.rows("size", k, r, r + 1)[0])
            item["x0"] = item["x0"][:, :h, :w].contiguous()
        if self.num_classes:
            item["cond"] = {"y": self.rows("y", k, r, r + 1)[0].long()}
        return item

    def posterior(self, i: int) -> tuple[Tensor, Tensor]:
        """(mean, std) of item i, both normalised."""
        k, r = self.locate(int(i))
        return self.finite_rows("mean", k, r, r + 1)[0].float(), self.finite_rows("std", k, r, r + 1)[0].float()

    def captions(self, indices) -> list[str]:
        """The captions of these items (the source's own, stored at encoding)."""
        if not self.has_captions:
            raise ValueError(f"{self.root} holds no captions: its image data {self.reference[0]!r} has none")
        out = []
        for i in indices:
            k, r = self.locate(int(i))
            lo, hi = (int(v) for v in self.rows("caption_offsets", k, r, r + 2))
            out.append(bytes(self.rows("caption_bytes", k, lo, hi).numpy()).decode("utf-8") if hi > lo else "")
        return out

    def arrays(self, limit: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(mean (n, c, h, w), y or None) of the first `limit` items, read shard by shard."""
        n = len(self) if limit is None else max(0, min(int(limit), len(self)))
        if self.variable_size:
            raise ValueError(f"{self.root} holds latents of several sizes: they do not stack into one array")
        xs, ys = [], []
        for k, s in enumerate(self._shards):
            lo = self._starts[k]
            if lo >= n:
                break
            hi = min(n - lo, s["count"])
            xs.append(self.finite_rows("mean", k, 0, hi).float())
            if self.num_classes:
                ys.append(self.rows("y", k, 0, hi).long())
        x = torch.cat(xs) if xs else torch.empty((0, *self.shape))
        return x, (torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)) if self.num_classes else None

    def __repr__(self) -> str:
        return (f"LatentSource({self.root}, n={len(self)}, shape={self.shape}, image_shape={self.image_shape}, "
                f"autoencoder={self.autoencoder.get('path')})")


def source_name(data: str) -> str:
    """How the index records the image data: a dataset name as given, a path made absolute (so
    evaluation finds it from any working directory)."""
    from . import names
    p = Path(data).expanduser()
    return str(p.resolve()) if data not in names() and p.exists() else data
