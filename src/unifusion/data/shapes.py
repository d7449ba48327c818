"""`shapes`: a procedural RGB data set of simple objects on a textured background, drawn on
demand from (seed, index), so any number of images exists without storage.

Every image has one to three objects (circle, square, triangle), each with a colour (8 named
colours), a size (small or large, with jitter), a small rotation and a position, over a low-
contrast background (a tinted gray with a linear gradient, a faint sinusoidal grating and a fine
grain). Object 0 is the *main* object: it is always present, always the largest (by at least
15% in scale) and drawn last, so it is never hidden and a classifier can tell which one it is.

Labels of image i:
  * class y = shape * 8 + colour of the main object (24 classes, names like "red circle");
  * attributes (`ShapesSource.attributes`): per object slot shape, colour, size, position bin
    (3 x 3 grid, row-major), centre and scale, -1 where a slot is empty; the object count; the
    relation of object 0 to object 1;
  * a caption naming the main object first and, with two or more objects, its relation to the
    second: "a large red circle left of a small blue square, and a small green triangle".

Splits are disjoint index ranges of one infinite sequence: train [0, n), test [10**9, 10**9 + n).
An image depends only on (seed, global index), not on the resolution's sampling: shapes-64 item
i is shapes-32 item i drawn at twice the resolution (the grain differs, being per pixel).
Pixels are quantized to 8 bits (256 levels, like PNG files) and mapped to [-1, 1].

Drawing is vectorised numpy with analytic anti-aliasing (coverage = clip(1/2 - signed distance
in pixels, 0, 1)); the random draws come from a counter-based hash (splitmix64 of seed, index
and draw number), so a batch equals its items drawn one by one.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB in [0, 1]; saturated, so they stand out from the gray background
    "red": (0.86, 0.14, 0.14), "green": (0.16, 0.68, 0.20), "blue": (0.16, 0.30, 0.90),
    "yellow": (0.95, 0.86, 0.16), "purple": (0.58, 0.20, 0.80), "cyan": (0.16, 0.80, 0.86),
    "orange": (0.96, 0.54, 0.10), "white": (0.96, 0.96, 0.96),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")  # object 0 relative to object 1
MAX_OBJECTS = 3
RESOLUTIONS = (32, 64)
TEST_OFFSET = 10**9  # the test split's first global index; train uses [0, n)
DEFAULT_N = {"train": 50_000, "test": 10_000}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
CLASS_NAMES = [f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES]  # index shape * 8 + colour

# object scale s as a fraction of the image width (circle radius; the other shapes have the same
# area up to ~10%); the main object is always >= 15% larger than any other object
MAIN_SCALE = {0: (0.105, 0.125), 1: (0.175, 0.205)}
OTHER_SCALE = {0: (0.065, 0.085), 1: (0.135, 0.150)}  # "large" others only beside a large main
EXTENT = np.array([1.0, 0.9 * math.sqrt(2), 1.5])  # circumradius / s: circle, square, triangle
MAX_ANGLE = math.radians(25)  # rotation jitter of squares and triangles
CANDIDATES = 8  # position tries for objects 1 and 2 (the first that does not overlap wins)

# the fixed layout of the uniform draws of one image
_BG = 0            # 14 background draws
_OBJ = 16          # object k uses _OBJ + k * _PER ... (+ _PER)
_PER = 6 + 2 * CANDIDATES
_DRAWS = _OBJ + MAX_OBJECTS * _PER


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, index: np.ndarray, n: int = _DRAWS) -> np.ndarray:
    """(len(index), n) uniforms in [0, 1), a pure function of (seed, global index, draw number)."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, np.uint64)) ^ np.asarray(index, np.uint64)
        key = _mix(key)[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None] * np.uint64(0xD1B54A32D192ED03)
        return (_mix(key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _span(u: np.ndarray, lo, hi) -> np.ndarray:
    return lo + (hi - lo) * u


def scenes(seed: int, index) -> dict[str, np.ndarray]:
    """The drawn content of images `index` (global indices): object and background parameters.

    Objects: "shape", "colour", "size" (B, 3) int64 and "cx", "cy", "scale", "angle", "shade"
    (B, 3) float64 (centres and scale in image widths, y pointing down); empty slots have -1.
    Background: "gray", "tint" (B, 3), "grad", "grad_angle", "freq", "wave_angle", "phase",
    "wave", "grain", "offset" (B, 2) in [0, 1).
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    u = uniforms(seed, index)
    B = len(index)
    count = 1 + (u[:, 0] * MAX_OBJECTS).astype(np.int64)
    s = {"count": count}
    for key in ("shape", "colour", "size"):
        s[key] = np.full((B, MAX_OBJECTS), -1, np.int64)
    for key in ("cx", "cy", "scale", "angle", "shade"):
        s[key] = np.full((B, MAX_OBJECTS), -1.0)
    for k in range(MAX_OBJECTS):
        d = u[:, _OBJ + k * _PER:_OBJ + (k + 1) * _PER]
        present = k < count
        shape = (d[:, 0] * len(SHAPES)).astype(np.int64)
        colour = (d[:, 1] * len(COLOURS)).astype(np.int64)
        if k == 0:
            size = (d[:, 2] < 0.5).astype(np.int64)
            scale = np.where(size == 1, _span(d[:, 3], *MAIN_SCALE[1]), _span(d[:, 3], *MAIN_SCALE[0]))
        else:
            size = ((d[:, 2] < 0.5) & (s["size"][:, 0] == 1)).astype(np.int64)
            scale = np.where(size == 1, _span(d[:, 3], *OTHER_SCALE[1]), _span(d[:, 3], *OTHER_SCALE[0]))
        angle = np.where(shape == 0, 0.0, _span(d[:, 4], -MAX_ANGLE, MAX_ANGLE))
        ext = EXTENT[shape] * scale
        # candidate centres inside the image; the first clear of the earlier objects, else the clearest
        cand = d[:, 6:].reshape(B, CANDIDATES, 2)
        cx = _span(cand[..., 0], ext[:, None] + 0.01, 0.99 - ext[:, None])
        cy = _span(cand[..., 1], ext[:, None] + 0.01, 0.99 - ext[:, None])
        clear = np.full((B, CANDIDATES), np.inf)
        for j in range(k):
            dist = np.hypot(cx - s["cx"][:, j, None], cy - s["cy"][:, j, None])
            ext_j = EXTENT[s["shape"][:, j]] * s["scale"][:, j]
            clear = np.minimum(clear, dist - (ext[:, None] + ext_j[:, None]))
        ok = clear > 0.01
        pick = np.where(ok.any(1), ok.argmax(1), clear.argmax(1))
        rows = np.arange(B)
        for key, v in (("shape", shape), ("colour", colour), ("size", size), ("scale", scale),
                       ("angle", angle), ("shade", _span(d[:, 5], -0.06, 0.06)),
                       ("cx", cx[rows, pick]), ("cy", cy[rows, pick])):
            s[key][:, k] = np.where(present, v, s[key][:, k])
    b = u[:, _BG:_BG + 14]
    s.update(gray=_span(b[:, 0], 0.32, 0.62), tint=_span(b[:, 1:4], -0.05, 0.05), grad=_span(b[:, 4], 0.0, 0.16),
             grad_angle=b[:, 5] * 2 * math.pi, freq=_span(b[:, 6], 1.5, 5.0), wave_angle=b[:, 7] * math.pi,
             phase=b[:, 8] * 2 * math.pi, wave=_span(b[:, 9], 0.0, 0.05), grain=_span(b[:, 10], 0.01, 0.035),
             offset=b[:, 11:13])
    return s


_GRAIN: dict[int, np.ndarray] = {}


def _grain(res: int) -> np.ndarray:
    """A fixed (2 res, 2 res) tile of unit Gaussian grain; each image reads a res x res window."""
    if res not in _GRAIN:
        _GRAIN[res] = np.random.default_rng(12345 + res).standard_normal((2 * res, 2 * res)).astype(np.float32)
    return _GRAIN[res]


def _coverage(s: dict, k: int, sel: np.ndarray, p: np.ndarray, res: int) -> np.ndarray:
    """Anti-aliased coverage (len(sel), res, res) of object k in the images `sel`."""
    dx = (p[None, None, :] - s["cx"][sel, k, None, None]).astype(np.float32)  # (b, 1, res)
    dy = (p[None, :, None] - s["cy"][sel, k, None, None]).astype(np.float32)  # (b, res, 1)
    scale = s["scale"][sel, k, None, None].astype(np.float32)
    shape = s["shape"][sel[0], k]
    if shape == 0:  # circle
        sd = np.sqrt(dx * dx + dy * dy) - scale
    else:
        a = s["angle"][sel, k, None, None].astype(np.float32)
        if shape == 1:  # square of half side 0.9 s: Chebyshev distance in the rotated frame
            c, si = np.cos(a), np.sin(a)
            sd = np.maximum(np.abs(dx * c + dy * si), np.abs(dy * c - dx * si)) - 0.9 * scale
        else:  # equilateral triangle, circumradius 1.5 s, apex up: three half planes, apothem 0.75 s
            sd = None
            for j in range(3):
                t = a + np.float32(math.pi / 2 + 2 * math.pi * j / 3)
                h = dx * np.cos(t) + dy * np.sin(t)
                sd = h if sd is None else np.maximum(sd, h)
            sd = sd - 0.75 * scale
    return np.clip(0.5 - sd * res, 0.0, 1.0)


def render(s: dict, res: int) -> np.ndarray:
    """Images (B, 3, res, res) float32 in [0, 1] (quantized to 8 bits) of the scenes `s`."""
    p = ((np.arange(res) + 0.5) / res).astype(np.float32)  # pixel centres, in image widths

    def f32(v: np.ndarray) -> np.ndarray:  # (B,) -> (B, 1, 1) float32, to broadcast over pixels
        return v.astype(np.float32)[:, None, None]

    # background: gray + tint, linear gradient, a faint grating, fine grain
    X, Y = p[None, None, :] - 0.5, p[None, :, None] - 0.5
    ga, wa = s["grad_angle"], s["wave_angle"]
    base = (f32(s["grad"]) * (X * f32(np.cos(ga)) + Y * f32(np.sin(ga)))
            + f32(s["wave"]) * np.sin(2 * np.pi * f32(s["freq"]) * (X * f32(np.cos(wa)) + Y * f32(np.sin(wa)))
                                      + f32(s["phase"])))
    off = (s["offset"] * res).astype(np.int64)
    tile = _grain(res)
    rows = off[:, 0, None, None] + np.arange(res)[None, :, None]
    cols = off[:, 1, None, None] + np.arange(res)[None, None, :]
    base = base + f32(s["grain"]) * tile[rows, cols] + f32(s["gray"])
    img = base[:, None] + s["tint"].astype(np.float32)[:, :, None, None]  # (B, 3, res, res)
    palette = np.array(list(COLOURS.values()), np.float32)
    for k in reversed(range(MAX_OBJECTS)):  # the main object (k = 0) last, on top
        for shape in range(len(SHAPES)):
            sel = np.nonzero(s["shape"][:, k] == shape)[0]
            if not len(sel):
                continue
            cov = _coverage(s, k, sel, p, res)[:, None]  # (b, 1, res, res)
            col = np.clip(palette[s["colour"][sel, k]] * (1 + s["shade"][sel, k, None].astype(np.float32)), 0, 1)
            img[sel] = img[sel] + cov * (col[:, :, None, None] - img[sel])
    return np.round(np.clip(img, 0.0, 1.0) * 255) / np.float32(255)


def _position_bin(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """3 x 3 grid cell of centres (row-major: 0 = top left, 8 = bottom right), -1 where absent."""
    b = np.minimum((cy * 3).astype(np.int64), 2) * 3 + np.minimum((cx * 3).astype(np.int64), 2)
    return np.where(cx < 0, -1, b)


def _relation(s: dict) -> np.ndarray:
    """Index into RELATIONS of object 0 relative to object 1 (the dominant axis), -1 if alone."""
    dx, dy = s["cx"][:, 0] - s["cx"][:, 1], s["cy"][:, 0] - s["cy"][:, 1]
    rel = np.where(np.abs(dx) >= np.abs(dy), np.where(dx < 0, 0, 1), np.where(dy < 0, 2, 3))
    return np.where(s["count"] >= 2, rel, -1)


def _phrase(s: dict, b: int, k: int) -> str:
    return f"a {SIZES[s['size'][b, k]]} {COLOUR_NAMES[s['colour'][b, k]]} {SHAPES[s['shape'][b, k]]}"


def caption(s: dict, b: int) -> str:
    """The caption of image b of the scenes s (main object first)."""
    text = _phrase(s, b, 0)
    if s["count"][b] >= 2:
        text += f" {RELATIONS[_relation(s)[b]]} {_phrase(s, b, 1)}"
    if s["count"][b] >= 3:
        text += f", and {_phrase(s, b, 2)}"
    return text


NAME = re.compile(r"^shapes(?:-(32|64))?(?:-(train|test))?(?::(\d+))?$")


def parse(spec: str) -> dict | None:
    """{"resolution", "split", "n"} of a name like shapes, shapes-64, shapes-32-test:2000; None
    when `spec` is not a shapes name. "shapes" is shapes-32-train; the split defaults to train."""
    m = NAME.match(str(spec))
    if m is None:
        return None
    split = m.group(2) or "train"
    return {"resolution": int(m.group(1) or 32), "split": split,
            "n": int(m.group(3)) if m.group(3) else DEFAULT_N[split]}


def names() -> list[str]:
    """The shapes names `data.load` accepts (each also with a count suffix `:N`)."""
    return ["shapes", "shapes-32", "shapes-64", "shapes-32-train", "shapes-32-test", "shapes-64-train",
            "shapes-64-test"]


class ShapesSource(torch.utils.data.Dataset):
    """The shapes split as a data source: item i is drawn from (seed, offset + i) when read.

    resolution: 32 or 64; split: "train" (global indices [0, n)) or "test" ([10**9, 10**9 + n));
    n: the number of items (default 50,000 train, 10,000 test); seed: the whole data set's seed.
    Items {"x0": (3, res, res) float32 in [-1, 1], "cond": {"y": int64}}; `batch(indices)` draws
    many at once (vectorised); `captions(indices)` and `attributes(indices)` give the other labels.
    """

    kind = "image"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __init__(self, resolution: int = 32, split: str = "train", n: int | None = None, seed: int = 0):
        if resolution not in RESOLUTIONS:
            raise ValueError(f"shapes resolution must be one of {list(RESOLUTIONS)}, got {resolution}")
        if split not in DEFAULT_N:
            raise ValueError(f"unknown shapes split {split!r}; choose 'train' or 'test'")
        n = DEFAULT_N[split] if n is None else int(n)
        if not 1 <= n <= TEST_OFFSET:
            raise ValueError(f"shapes: n must lie in [1, {TEST_OFFSET}] (the splits are disjoint index ranges), "
                             f"got {n}")
        self.resolution, self.split, self.n, self.seed = int(resolution), split, n, int(seed)
        self.offset = 0 if split == "train" else TEST_OFFSET
        self.shape = (3, self.resolution, self.resolution)
        self.source = f"shapes-{self.resolution}-{split}(n={n}, seed={self.seed})"

    def __len__(self) -> int:
        return self.n

    def _global(self, indices) -> np.ndarray:
        i = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(i) and (i.min() < -self.n or i.max() >= self.n):
            raise IndexError(f"{self.source}: index out of range [0, {self.n})")
        return self.offset + np.where(i < 0, i + self.n, i)

    def scenes(self, indices) -> dict[str, np.ndarray]:
        """The raw drawn parameters of `indices` (see `shapes.scenes`)."""
        return scenes(self.seed, self._global(indices))

    def images(self, indices) -> torch.Tensor:
        """(len(indices), 3, res, res) float32 in [-1, 1]."""
        return torch.from_numpy(render(self.scenes(indices), self.resolution) * 2 - 1)

    def labels(self, indices) -> torch.Tensor:
        """Class labels (len(indices),) int64: shape * 8 + colour of the main object."""
        s = self.scenes(indices)
        return torch.from_numpy(s["shape"][:, 0] * len(COLOURS) + s["colour"][:, 0])

    def batch(self, indices) -> dict:
        """The collated batch of `indices`, drawn in one vectorised pass (equal to the items)."""
        s = self.scenes(indices)
        x = torch.from_numpy(render(s, self.resolution) * 2 - 1)
        return {"x0": x, "cond": {"y": torch.from_numpy(s["shape"][:, 0] * len(COLOURS) + s["colour"][:, 0])}}

    def __getitem__(self, i) -> dict:
        b = self.batch([int(i)])
        return {"x0": b["x0"][0], "cond": {"y": b["cond"]["y"][0]}}

    def arrays(self, limit: int | None = None, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the first `limit` items (all when None), drawn `batch_size` at a time."""
        n = self.n if limit is None else max(0, min(int(limit), self.n))
        if n == 0:
            return torch.zeros((0, *self.shape)), torch.zeros(0, dtype=torch.int64)
        parts = [self.batch(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        return torch.cat([p["x0"] for p in parts]), torch.cat([p["cond"]["y"] for p in parts])

    def captions(self, indices) -> list[str]:
        """Captions of `indices`, e.g. "a large red circle left of a small blue square"."""
        s = self.scenes(indices)
        return [caption(s, b) for b in range(len(s["count"]))]

    def attributes(self, indices) -> dict[str, np.ndarray]:
        """Fixed-width label arrays of `indices` (-1 marks an empty object slot):
        "y" (B,) class; "count" (B,) 1..3; "relation" (B,) index into RELATIONS of object 0 to
        object 1, -1 when alone; per object slot (B, 3): "shape", "colour", "size" (0 small,
        1 large), "position" (3 x 3 bin), "cx", "cy", "scale" (float, in image widths)."""
        s = self.scenes(indices)
        return {"y": s["shape"][:, 0] * len(COLOURS) + s["colour"][:, 0], "count": s["count"],
                "relation": _relation(s), "shape": s["shape"], "colour": s["colour"], "size": s["size"],
                "position": _position_bin(s["cx"], s["cy"]), "cx": s["cx"], "cy": s["cy"], "scale": s["scale"]}

    def __repr__(self) -> str:
        return f"ShapesSource({self.source})"


def load(spec: str, seed: int = 0) -> ShapesSource:
    """The source a shapes name describes (see `parse`); `seed` picks another whole data set."""
    p = parse(spec)
    if p is None:
        raise ValueError(f"not a shapes data name: {spec!r}; use e.g. shapes-32, shapes-64-test or "
                         f"shapes-32-train:200000")
    return ShapesSource(p["resolution"], p["split"], p["n"], seed)
