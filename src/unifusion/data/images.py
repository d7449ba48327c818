"""Datasets held in memory as tensors in [-1, 1]: the ArrayDataset, sklearn's digits, image
folders and .npz arrays, plus writing images back out (class folders, one grid PNG).

Conventions, shared by every loader:
  * x is float32 (N, ...) in [-1, 1]; images are (N, C, H, W), 8-bit pixels map as v / 255 * 2 - 1.
  * labels are int64 (N,) in [0, num_classes); unlabelled datasets have y = None, num_classes = 0.
  * every dataset passes `check_values`: no NaN/inf, nothing outside [-1, 1] by more than 1e-6.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
RANGE_TOL = 1e-6


def check_values(x: Tensor, where: str) -> None:
    """Raise ValueError if x holds NaN/inf or values outside [-1, 1] (beyond RANGE_TOL)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}: {int(bad.sum())} NaN/inf value(s), the first at index {first}")
    if x.numel() and (x.min() < -1 - RANGE_TOL or x.max() > 1 + RANGE_TOL):
        first = tuple(int(i) for i in (x.abs() > 1 + RANGE_TOL).nonzero()[0])
        raise ValueError(f"{where}: values must lie in [-1, 1], found [{float(x.min()):.6g}, "
                         f"{float(x.max()):.6g}] (first outside at index {first})")


class ArrayDataset(torch.utils.data.Dataset):
    """x: float32 (N, ...) in [-1, 1]; y: int64 (N,) or None.

    `ds[i]` is `(x[i], y[i])`, with y[i] a 0-dim int64 tensor equal to -1 when the dataset is
    unlabelled, so a DataLoader batches labelled and unlabelled data alike.
    """

    def __init__(self, x: Tensor, y: Tensor | None = None, num_classes: int | None = None,
                 class_names: list[str] | None = None, source: str = "", skipped: list[str] | None = None):
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise ValueError(f"{source or 'dataset'}: x must be floating point in [-1, 1], got {x.dtype}")
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"{source or 'dataset'}: x must be (N, ...) with N >= 1, got shape {tuple(x.shape)}")
        self.x = x.to(torch.float32).contiguous()
        check_values(self.x, source or "dataset")
        if y is not None:
            y = torch.as_tensor(y)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape != (len(x),):
                raise ValueError(f"{source or 'dataset'}: labels must be integers of shape ({len(x)},), "
                                 f"got {y.dtype} {tuple(y.shape)}")
            y = y.to(torch.int64)
            if num_classes is None:
                num_classes = int(y.max()) + 1
            if y.min() < 0 or y.max() >= num_classes:
                raise ValueError(f"{source or 'dataset'}: labels must lie in [0, {num_classes}), "
                                 f"found [{int(y.min())}, {int(y.max())}]")
        self.y = y
        self.num_classes = 0 if y is None else int(num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.source = source
        self.skipped = list(skipped or [])
        self._targets = y if y is not None else torch.full((len(x),), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self._targets[i]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    def __repr__(self) -> str:
        return (f"ArrayDataset(n={len(self)}, shape={self.shape}, num_classes={self.num_classes}, "
                f"source={self.source!r})")


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
    return ArrayDataset(x, y, 10, [str(k) for k in range(10)], source=f"digits[{split}]")


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


def image_folder(path, image_size: int | None = None, channels: int | None = None,
                 skip_corrupt: bool = False) -> ArrayDataset:
    """Images under `path` as (N, C, H, W) in [-1, 1].

    Class subfolders (sorted names; nested folders inside them count) become labels 0, 1, ...;
    an empty class folder keeps its label (with a warning). A folder without subfolders is
    unlabelled; with subfolders, images lying next to them are ignored (with a warning). Files: png, jpg, jpeg, bmp, gif (first frame), webp, any case.
    image_size: resize the shorter side to it (bicubic, antialiased) and center-crop a square;
        None requires every image to have the same size.
    channels: None infers 1 if every image is grayscale (modes 1, L, LA, I;16, ...) else 3;
        1 converts to luminance (ITU-R 601), 3 repeats gray. Transparency is composited on white.
    skip_corrupt: skip unreadable files (listed in `.skipped`, with a warning) instead of raising.
    """
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

    arrays, labels, gray, skipped, first = [], [], [], [], None
    for p, label in files:
        try:
            a, is_gray = _read(p)
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            if not skip_corrupt:
                raise ValueError(f"cannot read image {p}: {e}; pass skip_corrupt=True to skip "
                                 f"unreadable files") from e
            skipped.append(str(p))
            continue
        t = torch.from_numpy(a).permute(2, 0, 1)  # (C, H, W)
        if image_size is not None:
            t = _resize_crop(t, int(image_size))
        elif first is None:
            first = (p, t.shape[1:])
        elif t.shape[1:] != first[1]:
            (h0, w0), (h1, w1) = first[1], t.shape[1:]
            raise ValueError(f"images differ in size: {first[0]} is {w0}x{h0} but {p} is {w1}x{h1}; "
                             f"pass image_size=N (CLI: --image-size N) to resize and center-crop all to NxN")
        arrays.append(t)
        labels.append(label)
        gray.append(is_gray)
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]}")
    if not arrays:
        raise ValueError(f"no readable images in {root} ({len(skipped)} unreadable)")

    c = channels or (1 if all(gray) else 3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    x = torch.stack([(t * luma).sum(0, keepdim=True) if c == 1 and len(t) == 3
                     else t.expand(3, -1, -1) if c == 3 and len(t) == 1 else t for t in arrays])
    y = None if class_names is None else torch.tensor(labels, dtype=torch.int64)
    return ArrayDataset(x * 2 - 1, y, None if y is None else len(class_names), class_names,
                        source=str(root), skipped=skipped)


# ------------------------------------------------------------------------------------- .npz
def npz_arrays(path, key: str = "x", label_key: str | None = "y",
               float_range: tuple[float, float] | None = None) -> ArrayDataset:
    """Arrays from an .npz file: x under `key`, optional integer labels under `label_key`.

    Shapes: (N, D) vectors; (N, H, W) one-channel images; (N, C, H, W), or (N, H, W, C), which is
    recognized when the last dim is 1, 3 or 4 and the second is not.
    Values: integer data (uint8, or any integer type within 0..255) maps as v / 255 * 2 - 1.
    Float data: with float_range=None, data within [0, 1] is taken as [0, 1] and mapped to
    2 v - 1, data with negative values within [-1, 1] is used as is, anything else is an error;
    pass float_range=(-1, 1) or (0, 1) to state the range instead of inferring it.
    A `class_names` array in the file names the classes.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"npz file {p} does not exist")
    with np.load(p, allow_pickle=False) as f:
        if key not in f:
            raise ValueError(f"{p}: no array {key!r}; the file holds {sorted(f.files)}")
        a = f[key]
        y = f[label_key] if label_key and label_key in f else None
        class_names = [str(s) for s in f["class_names"]] if "class_names" in f else None
    where = f"{p}[{key}]"
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim not in (2, 4):
        raise ValueError(f"{where}: expected (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C), "
                         f"got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{where}: integer data must be 8-bit pixels in 0..255, found "
                             f"[{a.min()}, {a.max()}]; save floats in [-1, 1] or [0, 1] instead")
        x = torch.from_numpy(a.astype(np.float32)) / 255 * 2 - 1
    elif np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{where}: {int(bad.sum())} NaN/inf value(s), the first at index {first}")
        lo, hi = float(a.min()), float(a.max())
        if float_range is None:
            if lo >= -RANGE_TOL and hi <= 1 + RANGE_TOL:
                float_range = (0, 1)
            elif lo >= -1 - RANGE_TOL and hi <= 1 + RANGE_TOL:
                float_range = (-1, 1)
            else:
                raise ValueError(f"{where}: float data must lie in [-1, 1] or [0, 1], found "
                                 f"[{lo:.6g}, {hi:.6g}]; rescale it before saving")
        if tuple(float_range) not in ((0, 1), (-1, 1)):
            raise ValueError(f"float_range must be (0, 1), (-1, 1) or None (infer), got {float_range}")
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        x = x * 2 - 1 if tuple(float_range) == (0, 1) else x
    else:
        raise ValueError(f"{where}: unsupported dtype {a.dtype}; use uint8 or float")
    x = x.contiguous()
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{p}[{label_key}]: labels must be integers, got {y.dtype}")
        y = torch.from_numpy(y.astype(np.int64))
    num_classes = None if y is None or class_names is None else len(class_names)
    return ArrayDataset(x, y, num_classes, class_names if y is not None else None, source=where)


# ------------------------------------------------------------------------------------ writers
def _to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, C) uint8, rounding to the nearest level."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    a = a.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _check_images(x: Tensor, what: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"{what} needs images (N, C, H, W) with C in 1, 3, 4; got shape {tuple(x.shape)}")
    return x


def write_image_folder(dataset: ArrayDataset, path, exist_ok: bool = False) -> Path:
    """Write the images of `dataset` as PNGs, one subfolder per class (root only if unlabelled).

    Folder names sort in label order (zero-padded indices when the class names would not), so
    reading the folder back, here or with torchvision's ImageFolder, gives the same labels.
    Values are quantized to 8 bits: v -> round((v + 1) * 127.5).
    """
    x = _check_images(dataset.x, "write_image_folder")
    root = Path(path)
    if root.exists() and any(root.iterdir()) and not exist_ok:
        raise FileExistsError(f"{root} is not empty; choose a new folder or pass exist_ok=True")
    from PIL import Image

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
        Image.fromarray(_to_uint8(img)).save(dirs[label] / f"{str(i).zfill(width)}.png")
    return root


def save_grid(x: Tensor, path, nrow: int | None = None, min_size: int = 32, padding: int = 2) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid, `nrow` images per row
    (default ceil(sqrt(N))).

    Each image is upscaled by the integer factor s = ceil(min_size / min(H, W)) (nearest, so an
    8x8 digit becomes 32x32 crisp pixels); images are separated by `padding` white pixels, so the
    PNG is (rows * (s H + padding) + padding) high and (nrow * (s W + padding) + padding) wide.
    """
    x = _check_images(x, "save_grid").detach().float().cpu()
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
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(_to_uint8(grid)).save(out)
    return out
