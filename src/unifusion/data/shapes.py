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

The "t2i" variant (names shapes-t2i[-32|-64][-train|-test][:N]) is an easier set for text-to-
image training in miniature: 1 or 2 objects (equal probability), larger (the smallest object is
~8 px across at 32x32), rotated at most 10 degrees, on a plain tinted gray with a weak gradient
(no grating, no grain), placed so that they never overlap and the relation of object 0 to object
1 is unambiguous (drawn uniformly, then the objects placed to satisfy it with the distance along
its axis >= 1.3 times the distance across). Same shapes, colours, sizes, relations, captions and
attribute arrays as the standard set. Its train split never contains a HELD_OUT combination
(scenes containing one are re-drawn from the next draw stream, a pure function of (seed, global
index)); its test split is unrestricted, so held-out combinations appear at their natural rate.

Several sizes (names shapes-mixed[-train|-test][:N], or ShapesSource(sizes=[(h, w), ...])): item i gets the
size sizes[k] with k drawn from its own stream of (seed, global index), and shows the centre h x w window of
its scene drawn at max(h, w) (a 32 x 16 item is the middle half of the 32 x 32 one: square and non-square
sizes of one scene agree where they overlap). Such a source has `variable_size = True`, `shape` = the
largest (3, H, W) and `sizes(indices)`; train on it packed (--pack-tokens, models/packing.py).
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
# shapes-mixed: (h, w) of the sizes drawn uniformly, squares and 4:3, 3:4, 2:1, 1:2 sides up to 32
MIXED_SIZES = ((32, 32), (24, 24), (16, 16), (24, 32), (32, 24), (16, 32), (32, 16), (16, 24), (24, 16))
_SIZE_STREAM = 0x517E5  # the seed offset of the size draws (a stream apart from the scenes')
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


def caption_of(labels: dict, b: int) -> str:
    """The caption of row b of label arrays {"count" (B,), "shape", "colour", "size" (B, slots),
    "relation" (B,)}: the caption grammar, written once (main object first)."""
    text = _phrase(labels, b, 0)
    if labels["count"][b] >= 2:
        text += f" {RELATIONS[labels['relation'][b]]} {_phrase(labels, b, 1)}"
    if labels["count"][b] >= 3:
        text += f", and {_phrase(labels, b, 2)}"
    return text


def caption(s: dict, b: int) -> str:
    """The caption of image b of the scenes s (main object first)."""
    return caption_of({"count": s["count"], "shape": s["shape"], "colour": s["colour"], "size": s["size"],
                       "relation": _relation(s)}, b)


# ------------------------------------------------------------------------------ the t2i variant
# Object scales (same meaning as MAIN_SCALE / OTHER_SCALE), larger than the standard set's: the
# smallest object (another small one, s >= 0.125) is ~8 px across at 32x32 (circle 8.0 px, square
# 7.2 px, triangle 10.4 x 9 px). The main object stays >= 1.16x larger than the other (so a
# classifier can tell which is which) and a large other appears only beside a large main. The
# largest pair (two large triangles, width 2.6 s each) still fits side by side: 2.6 (0.195 + 0.16)
# + 2 margins + the gap < 1.
T2I_MAIN_SCALE = {0: (0.151, 0.158), 1: (0.186, 0.195)}
T2I_OTHER_SCALE = {0: (0.125, 0.130), 1: (0.155, 0.160)}
T2I_MAX_ANGLE = math.radians(10)   # rotation jitter of squares and triangles
T2I_MARGIN = 0.015                 # free border around every object's bounding box, in image widths
T2I_GAP = 0.03                     # the least gap between the two bounding boxes along the relation's axis
T2I_DOMINANCE = 1.3                # centre distance along the relation's axis >= 1.3 x the distance across
T2I_BACKGROUND = {"gray": (0.34, 0.60), "tint": 0.04, "grad": (0.0, 0.06), "shade": 0.05}

# Attribute combinations that never appear in the t2i train split (name -> kind). A colour-shape
# pair counts in any object slot; the relation combination is (main shape, relation, second
# shape): "a ... square above a ... circle". Its converse caption ("a ... circle below a ...
# square", the same picture with the circle named first) is not held out.
HELD_OUT = {"red triangle": "colour-shape", "blue circle": "colour-shape", "yellow square": "colour-shape",
            "square above circle": "relation"}
HELD_OUT_PAIRS = ((0, 2), (2, 0), (3, 1))      # (colour, shape) indices of the colour-shape entries
HELD_OUT_RELATIONS = ((1, 2, 0),)              # (main shape, relation, second shape) indices

_T2I_SALT = 0x5D2A_17C3_94B0_E6F1  # the t2i draw streams are unrelated to the standard set's
_T_BG, _T_COUNT, _T_REL, _T_SPLIT = 0, 6, 7, 8   # 6 background draws, count, relation, 2 along-axis
_T_OBJ, _T_PER = 10, 8                          # per object: shape colour size scale angle shade, 2 positions
_T_DRAWS = _T_OBJ + 2 * _T_PER


def held_out_kinds(attributes: dict) -> dict[str, np.ndarray]:
    """For each HELD_OUT name, a (B,) bool array: which images contain that combination.
    `attributes` needs "shape", "colour" (B, slots) with -1 for empty slots and "relation" (B,)."""
    shape, colour = np.asarray(attributes["shape"]), np.asarray(attributes["colour"])
    relation = np.asarray(attributes["relation"])
    out = {}
    for (c, s), nm in zip(HELD_OUT_PAIRS, [k for k, v in HELD_OUT.items() if v == "colour-shape"]):
        out[nm] = ((shape == s) & (colour == c)).any(1)
    for (s0, r, s1), nm in zip(HELD_OUT_RELATIONS, [k for k, v in HELD_OUT.items() if v == "relation"]):
        out[nm] = (shape[:, 0] == s0) & (relation == r) & (shape[:, 1] == s1)
    return out


def is_held_out(attributes: dict) -> np.ndarray:
    """(B,) bool: the images that contain any HELD_OUT combination (see `held_out_kinds`)."""
    return np.any(list(held_out_kinds(attributes).values()), axis=0)


def _t2i_key(seed: int, attempt: int) -> int:
    """The seed of draw stream `attempt` of the t2i set with data set seed `seed`."""
    with np.errstate(over="ignore"):
        k = _mix(np.array([(seed ^ _T2I_SALT) & 0xFFFFFFFFFFFFFFFF], np.uint64))
        return int(_mix(k + np.uint64(attempt))[0])


def _box(shape: np.ndarray, scale: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, ...]:
    """Bounding box offsets (x_lo, x_hi, y_lo, y_hi) from the centre of objects drawn as in
    `_coverage` (circle radius s; square half side 0.9 s; triangle circumradius 1.5 s, apex up)."""
    c, si = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    half = np.where(shape == 0, scale, 0.9 * scale * (c + si))
    x_lo, x_hi, y_lo, y_hi = -half, half.copy(), -half, half.copy()
    # triangle: vertices opposite the three edge normals t_j = angle + pi/2 + 2 pi j / 3
    t = angle[:, None] + np.pi / 2 + 2 * np.pi * np.arange(3)[None] / 3
    vx, vy = -1.5 * scale[:, None] * np.cos(t), -1.5 * scale[:, None] * np.sin(t)
    tri = shape == 2
    for a, v, f in ((x_lo, vx, np.min), (x_hi, vx, np.max), (y_lo, vy, np.min), (y_hi, vy, np.max)):
        a[tri] = f(v[tri], axis=1)
    return x_lo, x_hi, y_lo, y_hi


def scenes_t2i(seed: int, index, attempt: int = 0, fixed: dict | None = None) -> dict[str, np.ndarray]:
    """The t2i scenes of global indices `index` from draw stream `attempt` (unrestricted: held-out
    combinations included), with the keys of `scenes` (slot 2 always empty).

    fixed: optional labels that replace the draws, each a (B,) int array: "count" (1 or 2),
    "relation" (index into RELATIONS), "shape", "colour", "size" of the main object and
    "shape2", "colour2", "size2" of the second (ignored where count is 1); the rest (scales,
    positions, rotation, shading, background) is still drawn, so the scene satisfies the labels.
    A large second object beside a small main one is a ValueError (the data never has one).
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    u = uniforms(_t2i_key(seed, attempt), index, _T_DRAWS)
    B, fixed = len(index), dict(fixed or {})

    def pick(key, drawn):
        return np.broadcast_to(np.asarray(fixed[key], np.int64), (B,)).copy() if key in fixed else drawn

    count = pick("count", 1 + (u[:, _T_COUNT] < 0.5).astype(np.int64))
    relation = pick("relation", (u[:, _T_REL] * len(RELATIONS)).astype(np.int64))
    if not np.isin(count, (1, 2)).all() or not ((relation >= 0) & (relation < len(RELATIONS))).all():
        raise ValueError("shapes t2i: count must be 1 or 2 and relation an index into RELATIONS")
    s = {"count": count}
    for key in ("shape", "colour", "size"):
        s[key] = np.full((B, MAX_OBJECTS), -1, np.int64)
    for key in ("cx", "cy", "scale", "angle", "shade"):
        s[key] = np.full((B, MAX_OBJECTS), -1.0)
    box = []
    for k in range(2):
        d = u[:, _T_OBJ + k * _T_PER:_T_OBJ + (k + 1) * _T_PER]
        sfx = "" if k == 0 else "2"
        shape = pick("shape" + sfx, (d[:, 0] * len(SHAPES)).astype(np.int64))
        colour = pick("colour" + sfx, (d[:, 1] * len(COLOURS)).astype(np.int64))
        size = pick("size" + sfx, (d[:, 2] < 0.5).astype(np.int64) if k == 0
                    else ((d[:, 2] < 0.5) & (s["size"][:, 0] == 1)).astype(np.int64))
        if k == 1 and ((size == 1) & (s["size"][:, 0] == 0) & (count == 2)).any():
            raise ValueError("shapes t2i: a large second object needs a large main object")
        table = T2I_MAIN_SCALE if k == 0 else T2I_OTHER_SCALE
        scale = np.where(size == 1, _span(d[:, 3], *table[1]), _span(d[:, 3], *table[0]))
        angle = np.where(shape == 0, 0.0, _span(d[:, 4], -T2I_MAX_ANGLE, T2I_MAX_ANGLE))
        present = k < count
        for key, v in (("shape", shape), ("colour", colour), ("size", size), ("scale", scale), ("angle", angle),
                       ("shade", _span(d[:, 5], -T2I_BACKGROUND["shade"], T2I_BACKGROUND["shade"]))):
            s[key][:, k] = np.where(present, v, -1)
        box.append(_box(shape, scale, angle))
    m = T2I_MARGIN
    # object 0 alone: anywhere inside the border
    d0, d1 = u[:, _T_OBJ + 6:_T_OBJ + 8], u[:, _T_OBJ + _T_PER + 6:_T_OBJ + _T_PER + 8]
    x_lo, x_hi, y_lo, y_hi = box[0]
    cx0, cy0 = _span(d0[:, 0], m - x_lo, 1 - m - x_hi), _span(d0[:, 1], m - y_lo, 1 - m - y_hi)
    # two objects: the relation's axis (x for left of / right of, y for above / below) holds the two
    # boxes in order with the free length split uniformly into the three gaps (sorted uniforms); across
    # it, object 0 anywhere and object 1 within 1 / T2I_DOMINANCE of the along-axis distance
    horizontal = relation < 2
    first_is_main = (relation == 0) | (relation == 2)  # left of / above: object 0 comes first
    lo = [np.where(horizontal, b[0], b[2]) for b in box]
    hi = [np.where(horizontal, b[1], b[3]) for b in box]
    a_lo, a_hi = np.where(first_is_main, lo[0], lo[1]), np.where(first_is_main, hi[0], hi[1])
    b_lo, b_hi = np.where(first_is_main, lo[1], lo[0]), np.where(first_is_main, hi[1], hi[0])
    slack = np.maximum((1 - 2 * m) - (a_hi - a_lo) - (b_hi - b_lo) - T2I_GAP, 0.0)
    p, q = np.sort(u[:, _T_SPLIT:_T_SPLIT + 2], axis=1).T
    c_first = m - a_lo + p * slack
    c_second = c_first + a_hi + T2I_GAP + (q - p) * slack - b_lo
    along0 = np.where(first_is_main, c_first, c_second)
    along1 = np.where(first_is_main, c_second, c_first)
    x_lo1, x_hi1, y_lo1, y_hi1 = box[1]
    across0 = np.where(horizontal, _span(d0[:, 1], m - y_lo, 1 - m - y_hi), _span(d0[:, 0], m - x_lo, 1 - m - x_hi))
    reach = np.abs(along1 - along0) / T2I_DOMINANCE
    lo1 = np.maximum(np.where(horizontal, m - y_lo1, m - x_lo1), across0 - reach)
    hi1 = np.minimum(np.where(horizontal, 1 - m - y_hi1, 1 - m - x_hi1), across0 + reach)
    across1 = _span(d1[:, 1], lo1, np.maximum(lo1, hi1))
    two = count == 2
    s["cx"][:, 0] = np.where(two, np.where(horizontal, along0, across0), cx0)
    s["cy"][:, 0] = np.where(two, np.where(horizontal, across0, along0), cy0)
    s["cx"][:, 1] = np.where(two, np.where(horizontal, along1, across1), -1.0)
    s["cy"][:, 1] = np.where(two, np.where(horizontal, across1, along1), -1.0)
    b = u[:, _T_BG:_T_BG + 6]
    zero = np.zeros(B)
    s.update(gray=_span(b[:, 0], *T2I_BACKGROUND["gray"]),
             tint=_span(b[:, 1:4], -T2I_BACKGROUND["tint"], T2I_BACKGROUND["tint"]),
             grad=_span(b[:, 4], *T2I_BACKGROUND["grad"]), grad_angle=b[:, 5] * 2 * math.pi,
             freq=zero, wave_angle=zero, phase=zero, wave=zero, grain=zero, offset=np.zeros((B, 2)))
    return s


def _labels(s: dict) -> dict:
    return {"shape": s["shape"], "colour": s["colour"], "relation": _relation(s)}


def scenes_t2i_train(seed: int, index) -> dict[str, np.ndarray]:
    """The t2i train split's scenes: draw stream 0, and for the images that contain a HELD_OUT
    combination the next stream, until none does (about 19% need a second draw; each further
    round keeps ~19% of the rest). Vectorised; a pure function of (seed, global index)."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    s = scenes_t2i(seed, index, 0)
    todo = np.nonzero(is_held_out(_labels(s)))[0]
    attempt = 0
    while len(todo):
        attempt += 1
        redo = scenes_t2i(seed, index[todo], attempt)
        for k, v in redo.items():
            s[k][todo] = v
        todo = todo[is_held_out(_labels(redo))]
    return s


NAME = re.compile(r"^shapes(?:-(t2i))?(?:-(32|64|mixed))?(?:-(train|test))?(?::(\d+))?$")
VARIANTS = ("standard", "t2i")


def parse(spec: str) -> dict | None:
    """{"variant", "resolution", "split", "n"} of a name like shapes, shapes-64, shapes-32-test:2000,
    shapes-t2i-32-train; None when `spec` is not a shapes name. "shapes" is shapes-32-train (variant
    "standard"); the split defaults to train."""
    m = NAME.match(str(spec))
    if m is None:
        return None
    split = m.group(3) or "train"
    mixed = m.group(2) == "mixed"
    return {"variant": "t2i" if m.group(1) else "standard", "resolution": 32 if mixed else int(m.group(2) or 32),
            "split": split, "n": int(m.group(4)) if m.group(4) else DEFAULT_N[split], "mixed": mixed}


def name(variant: str = "standard", resolution: int = 32, split: str = "train", n: int | None = None) -> str:
    """The data name of a shapes split, e.g. name("t2i", 32, "test", 2000) == "shapes-t2i-32-test:2000"
    (the inverse of `parse`; what a model trained on a split should be tested on is
    name(p["variant"], p["resolution"], "test", N))."""
    return (f"shapes{'-t2i' if variant == 't2i' else ''}-{int(resolution)}-{split}"
            + (f":{int(n)}" if n is not None else ""))


def names() -> list[str]:
    """The shapes names `data.load` accepts (each also with a count suffix `:N`)."""
    out = []
    for v in ("", "-t2i"):
        out += [f"shapes{v}", f"shapes{v}-32", f"shapes{v}-64"]
        out += [f"shapes{v}-{r}-{s}" for r in RESOLUTIONS for s in ("train", "test")]
    return out + ["shapes-mixed", "shapes-mixed-train", "shapes-mixed-test"]


class ShapesSource(torch.utils.data.Dataset):
    """The shapes split as a data source: item i is drawn from (seed, offset + i) when read.

    resolution: 32 or 64; split: "train" (global indices [0, n)) or "test" ([10**9, 10**9 + n));
    n: the number of items (default 50,000 train, 10,000 test); seed: the whole data set's seed;
    variant: "standard" or "t2i" (larger objects, 1-2 per image, plain background; its train split
    holds no HELD_OUT combination, see the module docstring).
    Items {"x0": (3, res, res) float32 in [-1, 1], "cond": {"y": int64}}; `batch(indices)` draws
    many at once (vectorised); `captions(indices)` and `attributes(indices)` give the other labels.
    """

    kind = "image"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __init__(self, resolution: int = 32, split: str = "train", n: int | None = None, seed: int = 0,
                 variant: str = "standard", sizes=None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown shapes variant {variant!r}; choose one of {list(VARIANTS)}")
        if resolution not in RESOLUTIONS:
            raise ValueError(f"shapes resolution must be one of {list(RESOLUTIONS)}, got {resolution}")
        if split not in DEFAULT_N:
            raise ValueError(f"unknown shapes split {split!r}; choose 'train' or 'test'")
        n = DEFAULT_N[split] if n is None else int(n)
        if not 1 <= n <= TEST_OFFSET:
            raise ValueError(f"shapes: n must lie in [1, {TEST_OFFSET}] (the splits are disjoint index ranges), "
                             f"got {n}")
        self.resolution, self.split, self.n, self.seed = int(resolution), split, n, int(seed)
        self.variant = variant
        self.offset = 0 if split == "train" else TEST_OFFSET
        self.shape = (3, self.resolution, self.resolution)
        self.source = f"{name(variant, self.resolution, split)}(n={n}, seed={self.seed})"
        self.size_list = None if sizes is None else [tuple(int(v) for v in hw) for hw in sizes]
        self.variable_size = self.size_list is not None
        if self.variable_size:
            if not self.size_list or any(len(hw) != 2 or min(hw) < 1 for hw in self.size_list):
                raise ValueError(f"shapes sizes must be (height, width) pairs >= 1, got {sizes!r}")
            self.shape = (3, max(h for h, _ in self.size_list), max(w for _, w in self.size_list))
            self.source = self.source.replace(f"-{self.resolution}-", "-mixed-", 1).replace(
                f"seed={self.seed})", f"seed={self.seed}, sizes={len(self.size_list)})")

    def __len__(self) -> int:
        return self.n

    def _global(self, indices) -> np.ndarray:
        i = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(i) and (i.min() < -self.n or i.max() >= self.n):
            raise IndexError(f"{self.source}: index out of range [0, {self.n})")
        return self.offset + np.where(i < 0, i + self.n, i)

    def scenes(self, indices) -> dict[str, np.ndarray]:
        """The raw drawn parameters of `indices` (see `shapes.scenes`; `scenes_t2i` and
        `scenes_t2i_train` for the t2i variant's test and train splits)."""
        g = self._global(indices)
        if self.variant == "standard":
            return scenes(self.seed, g)
        return scenes_t2i_train(self.seed, g) if self.split == "train" else scenes_t2i(self.seed, g)

    def images(self, indices) -> torch.Tensor:
        """(len(indices), 3, res, res) float32 in [-1, 1]."""
        self._one_size(indices)
        return torch.from_numpy(render(self.scenes(indices), self.resolution) * 2 - 1)

    def sizes(self, indices) -> np.ndarray:
        """(len(indices), 2) int64 (h, w) of each item (all the resolution without several sizes)."""
        g = self._global(indices)
        if not self.variable_size:
            return np.full((len(g), 2), self.resolution, dtype=np.int64)
        k = np.minimum((uniforms(self.seed + _SIZE_STREAM, g, 1)[:, 0] * len(self.size_list)).astype(np.int64),
                       len(self.size_list) - 1)
        return np.asarray(self.size_list, dtype=np.int64)[k]

    def _one_size(self, indices) -> None:
        if self.variable_size and len(np.unique(self.sizes(indices), axis=0)) > 1:
            raise ValueError(f"{self.source} holds images of several sizes: they do not stack into one batch; train "
                             "on it packed (--pack-tokens) and evaluate at one size (e.g. against shapes-32-test)")

    def _sized_item(self, i: int) -> dict:
        """Item i at its own size: the centre (h, w) window of its scene drawn at max(h, w)."""
        (h, w), = self.sizes([i])
        s = self.scenes([i])
        r = int(max(h, w))
        img = torch.from_numpy(render(s, r) * 2 - 1)[0]
        top, left = (r - h) // 2, (r - w) // 2
        return {"x0": img[:, top:top + h, left:left + w].contiguous(),
                "cond": {"y": torch.from_numpy(s["shape"][:, 0] * len(COLOURS) + s["colour"][:, 0])[0]}}

    def labels(self, indices) -> torch.Tensor:
        """Class labels (len(indices),) int64: shape * 8 + colour of the main object."""
        s = self.scenes(indices)
        return torch.from_numpy(s["shape"][:, 0] * len(COLOURS) + s["colour"][:, 0])

    def batch(self, indices) -> dict:
        """The collated batch of `indices`, drawn in one vectorised pass (equal to the items)."""
        if self.variable_size:
            self._one_size(indices)
            items = [self._sized_item(int(i)) for i in indices]
            return {"x0": torch.stack([t["x0"] for t in items]), "cond": {"y": torch.stack([t["cond"]["y"] for t in items])}}
        s = self.scenes(indices)
        x = torch.from_numpy(render(s, self.resolution) * 2 - 1)
        return {"x0": x, "cond": {"y": torch.from_numpy(s["shape"][:, 0] * len(COLOURS) + s["colour"][:, 0])}}

    def __getitem__(self, i) -> dict:
        if self.variable_size:
            return self._sized_item(int(i))
        b = self.batch([int(i)])
        return {"x0": b["x0"][0], "cond": {"y": b["cond"]["y"][0]}}

    def arrays(self, limit: int | None = None, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the first `limit` items (all when None), drawn `batch_size` at a time."""
        n = self.n if limit is None else max(0, min(int(limit), self.n))
        if n == 0:
            return torch.zeros((0, *self.shape)), torch.zeros(0, dtype=torch.int64)
        self._one_size(range(n))
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
        raise ValueError(f"not a shapes data name: {spec!r}; use e.g. shapes-32, shapes-64-test, "
                         f"shapes-32-train:200000 or shapes-t2i-32-train")
    return ShapesSource(p["resolution"], p["split"], p["n"], seed, p["variant"],
                        sizes=MIXED_SIZES if p.get("mixed") else None)
