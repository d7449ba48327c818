"""Arrays from an .npz file as an in-memory source (`ArrayDataset`): images, vectors, latents,
optionally labels and a coupled noise array."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .source import RANGE_TOL, ArrayDataset, check_finite

FLOAT_RANGES = ((0, 1), (-1, 1))
NOISE_KEY = "noise"


def npz_arrays(path, key: str = "x", label_key: str | None = "y",
               float_range: tuple[float, float] | str | None = None) -> ArrayDataset:
    """Arrays from an .npz file: x under `key`, optional integer labels under `label_key`.

    Shapes: (N, D) vectors; (N, H, W) one-channel images; (N, C, H, W), or (N, H, W, C), which is
    recognized when the last dim is 1, 3 or 4 and the second is not.
    Values and kind:
      * integer data (uint8, or any integer type within 0..255) are 8-bit pixels: v / 255 * 2 - 1.
      * float images (3-D/4-D, kind "image"): with float_range=None, data within [0, 1] is mapped
        to 2 v - 1, data with negative values within [-1, 1] is used as is, anything else is an
        error; float_range=(0, 1) or (-1, 1) states the range instead of inferring it;
        float_range="none" takes the array as it is, unbounded (kind "latent", e.g. autoencoder
        latents), checking only that it is finite.
      * float vectors (N, D) (kind "vector"): data within [0, 1] is mapped to 2 v - 1 as above
        (pass float_range=(-1, 1) or "none" to keep it); anything else is used as is.
    A `class_names` array in the file names the classes. An array named "noise" with x's stored
    shape is a noise-data coupling (e.g. for reflow): it takes x's layout change (channel axis,
    NHWC -> NCHW) but no value mapping, and items carry it as "noise".
    """
    p = Path(path)
    float_range = _float_range(float_range)
    if not p.is_file():
        raise FileNotFoundError(f"npz file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            if not hasattr(f, "files"):  # a bare .npy saved under an .npz name
                raise ValueError("it holds one array, not named arrays")
            if key not in f:
                raise ValueError(f"{p}: no array {key!r}; the file holds {sorted(f.files)}")
            a = f[key]
            y = f[label_key] if label_key and label_key in f else None
            noise = f[NOISE_KEY] if NOISE_KEY in f and key != NOISE_KEY else None
            class_names = [str(s) for s in f["class_names"]] if "class_names" in f else None
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(f"{p}:"):
            raise
        # numpy's own text for a non-zip file suggests allow_pickle=True: never do that to a user file
        raise ValueError(f"{p} is not a readable .npz file ({type(exc).__name__}); write it with "
                         "numpy.savez(path, x=..., y=...)") from None
    where = f"{p}[{key}]"
    if noise is not None and noise.shape != a.shape:
        raise ValueError(f"{p}[{NOISE_KEY}] has shape {noise.shape} but {where} has {a.shape}; a coupled "
                         f"noise array must match the data (rename it if it is something else)")
    layout = _layout(a.shape, where)
    x, kind = _values(layout(a), where, float_range)
    y = _labels(y, f"{p}[{label_key}]")
    num_classes = None if y is None or class_names is None else len(class_names)
    return ArrayDataset(x, y, num_classes, class_names if y is not None else None, source=where, kind=kind,
                        noise=None if noise is None else _noise(layout(noise), f"{p}[{NOISE_KEY}]"))


def _float_range(float_range):
    """None | "none" | (0, 1) | (-1, 1), accepting lists (from JSON configs)."""
    if float_range is None or float_range == "none":
        return float_range
    if isinstance(float_range, (tuple, list)) and tuple(float_range) in FLOAT_RANGES:
        return tuple(float_range)
    raise ValueError(f"float_range must be (0, 1), (-1, 1), 'none' (use as is) or None (infer), got {float_range!r}")


def _layout(shape: tuple, where: str):
    """The function that brings an array of `shape` to (N, D) or (N, C, H, W)."""
    if len(shape) == 3:
        return lambda a: a[:, None]
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return lambda a: a.transpose(0, 3, 1, 2)
    if len(shape) in (2, 4):
        return lambda a: a
    raise ValueError(f"{where}: expected (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {shape}")


def _values(a: np.ndarray, where: str, float_range) -> tuple[Tensor, str]:
    """(x float32, kind) from the laid-out array, by the rules of `npz_arrays`."""
    vector = a.ndim == 2
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{where}: integer data must be 8-bit pixels in 0..255, found "
                             f"[{a.min()}, {a.max()}]; save floats in [-1, 1] or [0, 1] instead")
        return torch.from_numpy(a.astype(np.float32)) / 255 * 2 - 1, "vector" if vector else "image"
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{where}: unsupported dtype {a.dtype}; use uint8 or float")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    check_finite(x, where)
    if float_range == "none":
        return x, "vector" if vector else "latent"
    lo, hi = float(x.min()), float(x.max())
    if float_range is None:
        float_range = _infer_range(lo, hi)
        if float_range is None and vector:
            return x, "vector"
        if float_range is None:
            raise ValueError(f"{where}: float image data must lie in [-1, 1] or [0, 1], found [{lo:.6g}, {hi:.6g}]; "
                             f"rescale it before saving, or pass float_range='none' to use it as is (latents)")
    return (x * 2 - 1 if float_range == (0, 1) else x), "vector" if vector else "image"


def _infer_range(lo: float, hi: float):
    if lo >= -RANGE_TOL and hi <= 1 + RANGE_TOL:
        return (0, 1)
    if lo >= -1 - RANGE_TOL and hi <= 1 + RANGE_TOL:
        return (-1, 1)
    return None


def _labels(y, where: str) -> Tensor | None:
    if y is None:
        return None
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got {y.dtype}")
    return torch.from_numpy(y.astype(np.int64))


def _noise(noise: np.ndarray, where: str) -> Tensor:
    if not np.issubdtype(noise.dtype, np.floating):
        raise ValueError(f"{where}: noise must be a float array, got {noise.dtype}")
    return torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
