"""The data-source contract, written once: value checks, the in-memory `ArrayDataset`, collating
items into batches and checking that a batch has the keys a model needs.

An item is a dict {"x0": float32 (*shape), "cond": {"y": 0-dim int64}?, "noise": float32 (*shape)?};
a batch is the same dict with a leading batch axis (what `collate` makes of a list of items).
See the package docstring (`unifusion.data`) for the whole interface.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import default_collate

KINDS = ("image", "vector", "latent")  # pixels in [-1, 1] | low-dim data | unbounded arrays
RANGE_TOL = 1e-6
BATCH_KEYS = ("x0", "cond", "noise")


def check_finite(x: Tensor, where: str) -> None:
    """Raise ValueError if x holds NaN or inf, naming the count and the first index."""
    bad = ~torch.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}: {int(bad.sum())} NaN/inf value(s), the first at index {first}")


def check_values(x: Tensor, where: str) -> None:
    """Raise ValueError if x holds NaN/inf or values outside [-1, 1] (beyond RANGE_TOL): the check
    for kind "image"; vectors and latents only need `check_finite`."""
    check_finite(x, where)
    if x.numel() and (x.min() < -1 - RANGE_TOL or x.max() > 1 + RANGE_TOL):
        first = tuple(int(i) for i in (x.abs() > 1 + RANGE_TOL).nonzero()[0])
        raise ValueError(f"{where}: values must lie in [-1, 1], found [{float(x.min()):.6g}, "
                         f"{float(x.max()):.6g}] (first outside at index {first})")


def caption_list(source, limit: int | None = None, what: str = "the data") -> list[str]:
    """The captions of the first `limit` items of a source that has them (`captions(indices)`:
    shapes, tar shards with .txt, latents encoded from captioned images); a ValueError otherwise."""
    if not callable(getattr(source, "captions", None)) or not getattr(source, "has_captions", True):
        raise ValueError(f"{what} has no captions: text needs captioned data (the shapes data, WebDataset tar "
                         "shards with .txt members, or latents encoded from such data)")
    n = len(source) if limit is None else min(len(source), int(limit))
    return [c or "" for c in source.captions(range(n))]


class Wrapper(torch.utils.data.Dataset):
    """A source around `self.inner`: its length and every attribute it does not define are the inner's."""

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class Captioned(Wrapper):
    """A source whose items also carry their caption, cond["caption"] (a str; batches: a list of
    str), for the text families. Everything else is the wrapped source's."""

    def __init__(self, source):
        caption_list(source, 1, what=getattr(source, "source", "the data"))  # has captions, or one clear error
        self.inner = source


    def __getitem__(self, i) -> dict:
        item = dict(self.inner[i])
        item["cond"] = {**(item.get("cond") or {}), "caption": self.inner.captions([int(i)])[0] or ""}
        return item

    def batch(self, indices) -> dict:
        indices = [int(i) for i in indices]
        fast = getattr(self.inner, "batch", None)
        b = dict(fast(indices) if fast is not None else collate([self.inner[i] for i in indices]))
        b["cond"] = {**(b.get("cond") or {}), "caption": [c or "" for c in self.inner.captions(indices)]}
        return b


def captioned(source) -> Captioned:
    """`source` with captions in its items (see Captioned); a source without captions is an error."""
    return source if isinstance(source, Captioned) else Captioned(source)


def default_kind(x: Tensor) -> str:
    """"image" for (N, C, H, W), "vector" for (N, D), else "latent"."""
    return {4: "image", 2: "vector"}.get(x.ndim, "latent")


def collate(items: list[dict]) -> dict:
    """Items -> one batch dict (tensors stacked along a new first axis, nested dicts alike)."""
    return default_collate(items)


def _keys(batch: dict, prefix: str = "") -> list[str]:
    """Flattened key names: {"x0": ., "cond": {"y": .}} -> ["cond.y", "x0"]."""
    out = []
    for k, v in batch.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return sorted(out)


def check_batch(batch, need_cond: bool) -> None:
    """Raise one ValueError if `batch` lacks what training needs: a dict with a floating "x0",
    and "cond": {"y": ...} when the model is class-conditional (need_cond); an optional "noise"
    must have x0's shape. The message names the keys found and the keys expected."""
    expected = ["x0"] + (["cond.y"] if need_cond else []) + ["(optional) noise"]
    if not isinstance(batch, dict):
        raise ValueError(f"a data source must yield dicts with keys {expected}, got a {type(batch).__name__}; "
                         f"return {{'x0': x, 'cond': {{'y': label}}}} from __getitem__")
    got = _keys(batch)
    missing = [k for k in expected[:-1] if k not in got]
    if missing:
        raise ValueError(f"batch lacks {missing}: it has keys {got}, expected {expected}"
                         + ("; train unconditionally or use a labelled source" if "cond.y" in missing else ""))
    x0 = batch["x0"]
    if not (isinstance(x0, Tensor) and x0.is_floating_point()):
        raise ValueError(f"batch['x0'] must be a floating-point tensor, got {getattr(x0, 'dtype', type(x0))}")
    noise = batch.get("noise")
    if noise is not None and tuple(noise.shape) != tuple(x0.shape):
        raise ValueError(f"batch['noise'] has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; "
                         f"a coupled noise array must match the data")


class ArrayDataset(torch.utils.data.Dataset):
    """An in-memory source. x: float (N, ...); y: integer (N,) in [0, num_classes) or None;
    noise: float like x or None (a fixed noise-data coupling, e.g. for reflow).

    kind: "image" (x must lie in [-1, 1]), "vector" or "latent" (x must be finite); None infers
    "image" for 4-D x, "vector" for 2-D, else "latent". `ds[i]` is the item dict, `ds.batch(idx)`
    the collated batch of those items, `ds.arrays(limit)` the first `limit` examples (x, y).
    """

    def __init__(self, x: Tensor, y: Tensor | None = None, num_classes: int | None = None,
                 class_names: list[str] | None = None, source: str = "", skipped: list[str] | None = None,
                 *, kind: str | None = None, noise: Tensor | None = None):
        where = source or "dataset"
        self.x = _as_examples(x, where)
        self.kind = _kind(kind, self.x)
        (check_values if self.kind == "image" else check_finite)(self.x, where)
        self.y, self.num_classes = _labels(y, len(self.x), num_classes, where)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{where}: {len(class_names)} class names for {self.num_classes} classes")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.noise = None if noise is None else _noise(noise, self.x, where)
        self.source = source
        self.skipped = list(skipped or [])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i) -> dict:
        item = {"x0": self.x[i]}
        if self.y is not None:
            item["cond"] = {"y": self.y[i]}
        if self.noise is not None:
            item["noise"] = self.noise[i]
        return item

    def batch(self, indices) -> dict:
        """The batch of `indices` (a list of ints), equal to collating `[self[i] for i in indices]`."""
        return self[torch.as_tensor(indices, dtype=torch.int64)]

    def arrays(self, limit: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(x, y) of the first `limit` examples (all when None); y is None when unlabelled."""
        n = len(self) if limit is None else max(0, int(limit))
        return self.x[:n], None if self.y is None else self.y[:n]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        """Image-shaped (N, C, H, W) data (latents included; see `kind` for the value range)."""
        return self.x.ndim == 4

    def __repr__(self) -> str:
        return (f"ArrayDataset(n={len(self)}, shape={self.shape}, kind={self.kind!r}, "
                f"num_classes={self.num_classes}, source={self.source!r})")


def _as_examples(x, where: str) -> Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"{where}: x must be floating point, got {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{where}: x must be (N, ...) with N >= 1, got shape {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def _kind(kind: str | None, x: Tensor) -> str:
    kind = default_kind(x) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def _labels(y, n: int, num_classes: int | None, where: str) -> tuple[Tensor | None, int]:
    """Validated int64 labels (or None) and the number of classes (0 when unlabelled)."""
    if y is None:
        return None, 0
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape != (n,):
        raise ValueError(f"{where}: labels must be integers of shape ({n},), got {y.dtype} {tuple(y.shape)}")
    y = y.to(torch.int64)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), found [{int(y.min())}, {int(y.max())}]")
    return y, num_classes


def _noise(noise, x: Tensor, where: str) -> Tensor:
    noise = torch.as_tensor(noise)
    if not noise.is_floating_point() or noise.shape != x.shape:
        raise ValueError(f"{where}: noise must be a float array shaped like x {tuple(x.shape)}, "
                         f"got {noise.dtype} {tuple(noise.shape)}")
    noise = noise.to(torch.float32).contiguous()
    check_finite(noise, f"{where} noise")
    return noise


def levels(source, limit: int = 10_000) -> int | None:
    """The number of discrete levels of an image source's values on [-1, 1] (17 for sklearn's
    digits, 256 for 8-bit images), or None for continuous data (vectors, latents, float images).
    Image folders are 8-bit files: 256. The likelihood families dequantize with it."""
    if getattr(source, "kind", "image") != "image":
        return None
    if not hasattr(source, "x"):  # streamed image files
        return 256
    x = source.x[:limit].double()
    for count in (17, 256):
        k = (x + 1) / 2 * (count - 1)
        if torch.allclose(k, k.round(), atol=1e-4):
            return count
    return None

