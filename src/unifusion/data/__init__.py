"""Datasets in the data range [-1, 1]: 2-D toys, sklearn's digits, image folders, .npz arrays.

`load(spec, **options)` is the one entry point the CLI and configs use. Nothing here adds noise.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from . import images, toys
from .images import (ArrayDataset, check_values, digits, image_folder, npz_arrays, save_grid,
                     write_image_folder)

__all__ = ["ArrayDataset", "load", "names", "toys", "digits", "image_folder", "npz_arrays",
           "write_image_folder", "save_grid", "check_values"]


def names() -> list[str]:
    """The named datasets `load` accepts (besides paths to image folders and .npz files)."""
    return toys.names() + ["digits", "digits-train", "digits-test"]


def _toy(name: str, n: int = 10_000, seed: int = 0) -> ArrayDataset:
    x, y = toys.make(name, n, seed, labels=True)
    k = toys.num_classes(name)
    return ArrayDataset(x, y, k or None, [str(i) for i in range(k)] if k else None,
                        source=f"{name}(n={n}, seed={seed})")


def _call(fn, spec: str, options: dict, *args) -> ArrayDataset:
    # unknown options are a ValueError naming the accepted ones, like every other config error
    accepted = [p for p in inspect.signature(fn).parameters][len(args):]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {spec!r} does not take option(s) {unknown}; it accepts {accepted}")
    return fn(*args, **options)


def load(spec: str, **options) -> ArrayDataset:
    """A dataset from its spec.

    spec: a toy name ("gmm", "moons", "checkerboard", "swissroll", "rings"; options n=10000,
    seed=0), "digits" (option split="all" | "train" | "test"; "digits-train" and "digits-test"
    name the splits), a directory (an image folder;
    options image_size, channels, skip_corrupt) or an existing .npz file (options key, label_key,
    float_range). Names win over paths; write "./digits" to load a folder called digits.
    """
    spec = str(spec)
    if spec in toys.TOYS:
        return _call(_toy, spec, options, spec)
    if spec == "digits":
        return _call(digits, spec, options)
    if spec in ("digits-train", "digits-test"):
        return _call(digits, spec, options, spec.split("-")[1])
    p = Path(spec).expanduser()
    if p.is_dir():
        return _call(image_folder, spec, options, p)
    if p.is_file() and p.suffix.lower() == ".npz":
        return _call(npz_arrays, spec, options, p)
    why = "is not an .npz file" if p.is_file() else "does not exist"
    raise ValueError(f"unknown dataset {spec!r}: not one of {names()}, and as a path it {why}; "
                     f"a path must be an existing image folder or .npz file")
