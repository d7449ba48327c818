"""Pixel images: sklearn's digits, reading image files (shared by the in-memory `image_folder`
and the streaming `folder.ImageFolderSource`), the image-shape check, and writing images back
out (class folders, one grid PNG), every file atomically.

Conventions:
  * images are float32 (N, C, H, W) in [-1, 1]; 8-bit pixels map as v / 255 * 2 - 1.
  * labels are int64 (N,) in [0, num_classes); unlabelled datasets have y = None, num_classes = 0.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..safeio import atomic_path
from .source import ArrayDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def check_images(x, channels: int | tuple[int, ...] | None = None, what: str = "images") -> Tensor:
    """x as a tensor if it is (N, C, H, W) with C == channels (an int or a tuple of allowed
    counts; None allows 1, 3 or 4), else a ValueError naming `what` and the shape found."""
    x = torch.as_tensor(x)
    allowed = (1, 3, 4) if channels is None else (channels,) if isinstance(channels, int) else tuple(channels)
    if x.ndim != 4 or x.shape[1] not in allowed:
        c = str(allowed[0]) if len(allowed) == 1 else "C"
        also = "" if len(allowed) == 1 else f" with C in {', '.join(map(str, allowed))}"
        raise ValueError(f"{what} expects images (N, {c}, H, W){also} in [-1, 1], got shape {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------ digits
DIGITS_TEST = 297  # the last 297 of sklearn's 1,797 digits are the test split, the first 1,500 train


def digits(split: str = "all") -> ArrayDataset:
    """sklearn's 8x8 digits (values 0..16) as (N, 1, 8, 8), x / 16 * 2 - 1, labels 0..9.

    split: "train" (first 1,500, in sklearn's order), "test" (last 297) or "all" (1,797).
    """
    from sklearn.datasets import load_digits

    splits = {"all": slice(None), "train": slice(None, -DIGITS_TEST), "test": slice(-DIGITS_TEST, None)}
    if split not in splits:
        raise ValueError(f"unknown digits split {split!r}; choose one of {list(splits)}")
    d = load_digits()
    x = torch.from_numpy(d.images[splits[split]]).to(torch.float32)[:, None] / 16 * 2 - 1
    y = torch.from_numpy(d.target[splits[split]]).to(torch.int64)
    return ArrayDataset(x, y, 10, [str(k) for k in range(10)], source=f"digits[{split}]", kind="image")


# ------------------------------------------------------------------------------ image folder
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _read(path: Path) -> tuple[np.ndarray, bool]:
    """One image as float32 (H, W, 1 or 3) in [0, 1], alpha composited on white; and is-grayscale."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now, so truncated or garbage files fail here
        mode = img.mode
        if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale (e.g. PNG)
            a = np.asarray(img, dtype=np.float32)[..., None] / 65535
        elif mode == "F":
            a = np.asarray(img, dtype=np.float32)[..., None]
            a = a / 255 if a.max() > 1 else a
        elif mode in ("1", "L"):
            a = np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255
        elif mode in ("LA", "La"):
            a = np.asarray(img.convert("LA"), dtype=np.float32) / 255
        elif mode == "RGB":
            a = np.asarray(img, dtype=np.float32) / 255
        else:  # RGBA, palette (transparency becomes alpha), CMYK, YCbCr, ...
            a = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255
    if a.shape[-1] in (2, 4):  # composite on white: c * alpha + 1 * (1 - alpha)
        alpha = a[..., -1:]
        a = a[..., :-1] * alpha + (1 - alpha)
    return np.clip(a, 0, 1), mode in _GRAY_MODES


def _resize_crop(a: Tensor, size: int) -> Tensor:
    """(C, H, W): shorter side to `size` (bicubic, antialiased), then a centered size x size crop."""
    _, h, w = a.shape
    if (h, w) == (size, size):
        return a
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        a = F.interpolate(a[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return a[:, top:top + size, left:left + size].clamp(0, 1)  # bicubic overshoots at edges


def _list_images(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """(file, label) pairs sorted by path, and the class names (None when unlabelled)."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image_file(p))
    if not dirs:
        return [(p, -1) for p in loose], None
    if loose:
        warnings.warn(f"{root}: ignoring {len(loose)} image(s) next to the class subfolders "
                      f"(e.g. {loose[0].name}); only images inside subfolders are labelled")
    files, empty = [], []
    for label, d in enumerate(dirs):
        inside = sorted(p for p in d.rglob("*") if _is_image_file(p))
        if not inside:
            empty.append(d.name)
        files += [(p, label) for p in inside]
    if empty and files:  # an empty class keeps its index, so labels match the writer's
        warnings.warn(f"{root}: class folder(s) {empty} have no images; their labels get no examples")
    return files, [d.name for d in dirs]


class UnreadableImage(ValueError):
    """An image file PIL cannot decode (truncated, garbage, unsupported)."""


def list_folder(path, image_size: int | None, channels: int | None):
    """Validate the image-folder options; (root, [(file, label)], class names or None)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None (infer), 1 or 3, got {channels}")
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    files, class_names = _list_images(root)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    return root, files, class_names


def decode(path, image_size: int | None) -> tuple[Tensor, bool]:
    """One file as float32 (C, H, W) in [0, 1] (C = 1 or 3), resized and center-cropped to
    image_size x image_size when given; and whether the file is grayscale.
    Raises UnreadableImage naming the file and the skip option."""
    try:
        a, is_gray = _read(Path(path))
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise UnreadableImage(f"cannot read image {path}: {e}; pass skip_corrupt=True (CLI: --skip-corrupt) "
                              f"to skip unreadable files") from e
    t = torch.from_numpy(a).permute(2, 0, 1)
    return (t if image_size is None else _resize_crop(t, int(image_size))), is_gray


# ------------------------------------------------------------------ images of their own sizes
def capped_size(h: int, w: int, max_area: int | None) -> tuple[int, int]:
    """(h, w) scaled down, aspect ratio kept, to at most max_area pixels (None or 0: as it is)."""
    if not max_area or h * w <= max_area:
        return int(h), int(w)
    s = math.sqrt(max_area / (h * w))
    return max(1, math.floor(h * s)), max(1, math.floor(w * s))


def cap_area(t: Tensor, max_area: int | None) -> Tensor:
    """(C, H, W) in [0, 1] resized (bicubic, antialiased) to capped_size; unchanged when it fits."""
    h, w = capped_size(t.shape[1], t.shape[2], max_area)
    if (h, w) == tuple(t.shape[1:]):
        return t
    return F.interpolate(t[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


def header_size(src) -> tuple[int, int]:
    """(h, w) of an image file or bytes stream from its header alone (PIL opens lazily)."""
    from PIL import Image
    try:
        with Image.open(src) as img:
            w, h = img.size
    except Exception as e:
        raise UnreadableImage(f"cannot read image {getattr(src, 'name', src)}: {e}; pass skip_corrupt=True "
                              "(CLI: --skip-corrupt) to skip unreadable files") from e
    return int(h), int(w)


def sizes_at(source, indices) -> "np.ndarray":
    """(len(indices), 2) (h, w) of a folder or tar source's items: its one size, or each item's own
    (source.variable_size: keep_size / max_area, from source._sizes, made by own_sizes)."""
    idx = np.asarray(list(indices), dtype=np.int64)
    if not source.variable_size:
        return np.tile(np.array([source.shape[1:]], dtype=np.int64), (len(idx), 1))
    return source._sizes[idx]


def own_sizes(n: int, size_of, skip_corrupt: bool, note) -> "np.ndarray":
    """(n, 2) (h, w) of every item from size_of(j); an unreadable one takes the size of the next readable
    index (cyclically), as its item does (folder.readable_item), when skip_corrupt."""
    out = np.zeros((n, 2), dtype=np.int64)
    bad = []
    for j in range(n):
        try:
            out[j] = size_of(j)
        except UnreadableImage:
            if not skip_corrupt:
                raise
            note(j)
            bad.append(j)
    ok = np.setdiff1d(np.arange(n), bad)
    if not len(ok):
        raise ValueError("no readable images")
    for j in bad:
        out[j] = out[ok[np.searchsorted(ok, j) % len(ok)]]
    return out


def check_variable_size(image_size, keep_size: bool, max_area) -> bool:
    """Whether a folder / tar source keeps each image's size (keep_size or max_area), refusing both at once
    with image_size (one square for every image)."""
    if max_area is not None and int(max_area) < 0:
        raise ValueError(f"max_area must be >= 0 pixels, got {max_area}")
    variable = bool(keep_size or max_area)
    if variable and image_size:
        raise ValueError("--image-size resizes every image to one square, --keep-size / --max-area keep each "
                         "image's own size (packed training): give one")
    return variable


def to_channels(t: Tensor, channels: int) -> Tensor:
    """(C, H, W) -> (channels, H, W): RGB to ITU-R 601 luminance, or gray repeated to 3."""
    if channels == 1 and len(t) == 3:
        return (t * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    if channels == 3 and len(t) == 1:
        return t.expand(3, -1, -1)
    return t


def size_mismatch(first, first_hw, path, hw) -> ValueError:
    """The error for images of different sizes read without image_size."""
    (h0, w0), (h1, w1) = tuple(first_hw), tuple(hw)
    return ValueError(f"images differ in size: {first} is {w0}x{h0} but {path} is {w1}x{h1}; "
                      f"pass image_size=N (CLI: --image-size N) to resize and center-crop all to NxN, or keep_size=True "
                      f"(CLI: --keep-size, optionally --max-area A) to train on each size, packed (--pack-tokens)")


def image_folder(path, image_size: int | None = None, channels: int | None = None,
                 skip_corrupt: bool = False) -> ArrayDataset:
    """Images under `path` decoded into memory, (N, C, H, W) in [-1, 1] (for small folders and
    tests; `data.load(folder)` streams instead, see `folder.ImageFolderSource`).

    Class subfolders (sorted names; nested folders inside them count) become labels 0, 1, ...;
    an empty class folder keeps its label (with a warning). A folder without subfolders is
    unlabelled; with subfolders, images lying next to them are ignored (with a warning).
    Files: png, jpg, jpeg, bmp, gif (first frame), webp, any case.
    image_size: resize the shorter side to it (bicubic, antialiased) and center-crop a square;
        None requires every image to have the same size.
    channels: None infers 1 if every image is grayscale (modes 1, L, LA, I;16, ...) else 3;
        1 converts to luminance (ITU-R 601), 3 repeats gray. Transparency is composited on white.
    skip_corrupt: drop unreadable files (listed in `.skipped`, with a warning) instead of raising.
    """
    root, files, class_names = list_folder(path, image_size, channels)
    arrays, labels, gray, skipped, first = [], [], [], [], None
    for p, label in files:
        try:
            t, is_gray = decode(p, image_size)
        except UnreadableImage:
            if not skip_corrupt:
                raise
            skipped.append(str(p))
            continue
        first = first or p
        if t.shape[1:] != (arrays or [t])[0].shape[1:]:  # only possible without image_size
            raise size_mismatch(first, arrays[0].shape[1:], p, t.shape[1:])
        arrays.append(t)
        labels.append(label)
        gray.append(is_gray)
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]}")
    if not arrays:
        raise ValueError(f"no readable images in {root} ({len(skipped)} unreadable)")
    c = channels or (1 if all(gray) else 3)
    x = torch.stack([to_channels(t, c) for t in arrays])
    y = None if class_names is None else torch.tensor(labels, dtype=torch.int64)
    return ArrayDataset(x * 2 - 1, y, None if y is None else len(class_names), class_names,
                        source=str(root), skipped=skipped, kind="image")


# ------------------------------------------------------------------------------------ writers
def _to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, C) uint8, rounding to the nearest level."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    a = a.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _image_batch(x, what: str) -> Tensor:
    """(C, H, W) or (N, C, H, W) -> (N, C, H, W), checked by `check_images`."""
    x = torch.as_tensor(x)
    return check_images(x[None] if x.ndim == 3 else x, None, what)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """One uint8 (H, W) or (H, W, C) array as a PNG, written atomically (never a truncated file)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def write_image_folder(dataset: ArrayDataset, path, exist_ok: bool = False) -> Path:
    """Write the images of `dataset` as PNGs, one subfolder per class (root only if unlabelled).

    Folder names sort in label order (zero-padded indices when the class names would not), so
    reading the folder back, here or with torchvision's ImageFolder, gives the same labels.
    Values are quantized to 8 bits: v -> round((v + 1) * 127.5). Each PNG is written atomically.
    """
    x = _image_batch(dataset.x, "write_image_folder")
    root = Path(path)
    if root.exists() and any(root.iterdir()) and not exist_ok:
        raise FileExistsError(f"{root} is not empty; choose a new folder or pass exist_ok=True")
    if dataset.y is None:
        dirs = [root]
        labels = [0] * len(x)
    else:
        k = dataset.num_classes
        names = dataset.class_names or [str(i).zfill(len(str(k - 1))) for i in range(k)]
        if sorted(names) != names or len(set(names)) != k or any("/" in n or "\\" in n or n.startswith(".")
                                                                 for n in names):
            names = [f"{str(i).zfill(len(str(k - 1)))}_{n.replace('/', '_').replace(chr(92), '_')}"
                     for i, n in enumerate(names)]
        dirs = [root / n for n in names]
        labels = dataset.y.tolist()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    width = len(str(len(x) - 1))
    for i, (img, label) in enumerate(zip(x, labels)):
        _save_png(_to_uint8(img), dirs[label] / f"{str(i).zfill(width)}.png")
    return root


def save_grid(x: Tensor, path, nrow: int | None = None, min_size: int = 32, padding: int = 2) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid, `nrow` images per row
    (default ceil(sqrt(N))).

    Each image is upscaled by the integer factor s = ceil(min_size / min(H, W)) (nearest, so an
    8x8 digit becomes 32x32 crisp pixels); images are separated by `padding` white pixels, so the
    PNG is (rows * (s H + padding) + padding) high and (nrow * (s W + padding) + padding) wide.
    The file is written atomically: a crash leaves the old file or the new one, never a mix.
    """
    x = _image_batch(x, "save_grid").detach().float().cpu()
    n, c, h, w = x.shape
    nrow = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    s = max(1, math.ceil(min_size / min(h, w)))
    x = x.repeat_interleave(s, 2).repeat_interleave(s, 3)
    H, W = h * s + padding, w * s + padding
    grid = torch.ones(c, rows * H + padding, nrow * W + padding)
    for i, img in enumerate(x):
        r, col = divmod(i, nrow)
        grid[:, padding + r * H:padding + r * H + h * s, padding + col * W:padding + col * W + w * s] = img
    out = Path(path)
    _save_png(_to_uint8(grid), out)  # atomic_path creates the parent folder
    return out
