"""Data sources: 2-D toys, sklearn's digits, the procedural RGB `shapes` (drawn on demand), image
folders and WebDataset tar shards (both streamed from disk), .npz arrays.

`load(spec, **options)` is the one entry point the CLI and configs use; `StepBatches` turns a
source into the training order's batches. Nothing here adds noise (a source may carry a fixed
noise coupling, below).

The source interface (what the loop, evaluation and every new source file agree on):

  * A torch Dataset; `source[i]` is a dict
        {"x0": float32 Tensor of shape `shape`,
         "cond": {"y": 0-dim int64 Tensor in [0, num_classes)},   # only when labelled
         "noise": float32 Tensor of shape `shape`}                 # only when the source has a
                                                                   # noise-data coupling (reflow)
    and an item depends on i alone (no unseeded randomness), so the order of batches is a pure
    function of (seed, step) whatever the number of DataLoader workers.
  * Attributes: `shape` (tuple, one example), `num_classes` (0 = unlabelled), `class_names`
    (list[str] or None), `kind` ("image": pixels in [-1, 1], checked by `check_values`;
    "vector": low-dim data like the toys; "latent": unbounded arrays; the last two need only
    finite values), `source` (a description string), `__len__`.
  * `arrays(limit=None) -> (x, y | None)`: the first `limit` examples decoded into memory (for
    evaluation's reference statistics).
  * Optional `batch(indices: list[int]) -> dict`: the collated batch, equal to
    `collate([source[i] for i in indices])`, for in-memory sources (no per-item overhead).
  * Optional `reference = (data spec, options)`: the data a model trained on this source is
    scored against, when that is not the source itself (couplings: the teacher's data).

Sources here: `ArrayDataset` (in memory; `.x`, `.y`, `.noise` are its tensors) for toys, digits,
.npz files and `image_folder()`; `ImageFolderSource` (streaming) for `load(<folder>)`;
`TarShardSource` (streaming, map-style over indexed WebDataset shards, see `data.tar`) for
`load(<shard.tar | pattern | folder of shards>)`, and `write_shards` to make such shards;
`CouplingSource` (memory-mapped, see `data.couplings`) for a folder written by `unifusion couple`;
`LatentSource` (memory-mapped autoencoder latents, see `data.latents`) for a folder written by
`unifusion encode`.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from . import couplings, images, latents, shapes, toys
from .folder import ImageFolderSource
from .images import check_images, digits, image_folder, save_grid, write_image_folder
from .npz import npz_arrays
from .order import StepBatches, StepOrder
from .shapes import ShapesSource
from .tar import TarShardSource, write_shards
from .source import KINDS, ArrayDataset, caption_list, captioned, check_batch, check_finite, check_values, collate, levels

__all__ = ["ArrayDataset", "ImageFolderSource", "TarShardSource", "StepBatches", "StepOrder", "KINDS", "load",
           "names", "toys", "levels", "digits", "image_folder", "npz_arrays", "write_image_folder", "write_shards",
           "save_grid", "check_values", "check_finite", "check_images", "check_batch", "collate", "images", "shapes",
           "ShapesSource", "caption_list", "captioned"]


def names() -> list[str]:
    """The named datasets `load` accepts (besides paths to image folders and .npz files)."""
    return toys.names() + ["digits", "digits-train", "digits-test"] + shapes.names()


def _toy(name: str, n: int = 10_000, seed: int = 0) -> ArrayDataset:
    x, y = toys.make(name, n, seed, labels=True)
    k = toys.num_classes(name)
    return ArrayDataset(x, y, k or None, [str(i) for i in range(k)] if k else None,
                        source=f"{name}(n={n}, seed={seed})", kind="vector")


def _call(fn, spec: str, options: dict, *args):
    # unknown options are a ValueError naming the accepted ones, like every other config error
    accepted = [p for p in inspect.signature(fn).parameters][len(args):]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {spec!r} does not take option(s) {unknown}; it accepts {accepted}")
    return fn(*args, **options)


def _shard_folder(p: Path) -> bool:
    """A directory with *.tar files at its top and no image files anywhere (stops at the first)."""
    if not p.is_dir() or not any(q.suffix.lower() == ".tar" and q.is_file() for q in p.iterdir()):
        return False
    return not any(q.suffix.lower() in images.IMAGE_EXTENSIONS and q.is_file() for q in p.rglob("*"))


def load(spec: str, **options):
    """A source from its spec (see the interface above).

    spec: a toy name ("gmm", "moons", "checkerboard", "swissroll", "rings"; options n=10000,
    seed=0), "digits" (option split="all" | "train" | "test"; "digits-train" and "digits-test"
    name the splits), "shapes" (procedural RGB objects, `data.shapes`: shapes-32 / shapes-64,
    -train / -test, an optional count suffix ":N", e.g. shapes-32-train:200000; option seed=0),
    WebDataset tar shards (a streaming `TarShardSource`): a path ending in .tar, a brace
    pattern naming .tar files ("shards/train-{000000..000009}.tar"), or a directory holding
    *.tar files and no images; a directory of images (a streaming `ImageFolderSource`);
    both take options image_size, channels, skip_corrupt, probe; a folder of noise-data couplings
    written by `unifusion couple` (a `CouplingSource`, items with "noise"); a folder of autoencoder
    latents written by `unifusion encode` (a `LatentSource`, kind "latent"); or an existing .npz file
    (an `ArrayDataset`; options key, label_key, float_range). Names win over paths; write "./digits"
    to load a folder called digits.
    """
    spec = str(spec)
    if spec in toys.TOYS:
        return _call(_toy, spec, options, spec)
    if spec == "digits":
        return _call(digits, spec, options)
    if spec in ("digits-train", "digits-test"):
        return _call(digits, spec, options, spec.split("-")[1])
    if shapes.parse(spec) is not None:
        return _call(shapes.load, spec, options, spec)
    p = Path(spec).expanduser()
    if latents.is_latents(p):
        return _call(latents.LatentSource, spec, options, p)
    if couplings.is_couplings(p):
        return _call(couplings.CouplingSource, spec, options, p)
    if spec.lower().endswith(".tar") or ("{" in spec and ".tar" in spec.lower()) or _shard_folder(p):
        return _call(TarShardSource, spec, options, spec)
    if p.is_dir():
        return _call(ImageFolderSource, spec, options, p)
    if p.is_file() and p.suffix.lower() == ".npz":
        return _call(npz_arrays, spec, options, p)
    why = "is not an .npz file" if p.is_file() else "does not exist"
    raise ValueError(f"unknown dataset {spec!r}: not one of {names()}, and as a path it {why}; "
                     f"a path must be an existing image folder, .npz file or .tar shard(s)")
