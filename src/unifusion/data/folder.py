"""A folder of image files as a streaming source: the files are listed once, and each item is
decoded (and resized/cropped) from disk when it is asked for, so DataLoader workers can decode
in parallel and the set is never held in memory."""
from __future__ import annotations

import operator
import warnings

import numpy as np
import torch
from torch import Tensor

from .images import (UnreadableImage, cap_area, capped_size, check_variable_size, decode, header_size,
                     list_folder, own_sizes, size_mismatch, sizes_at, to_channels)
from .source import collate

PROBE = 16  # images read at construction to infer channels and the size, and to fail early


class ImageFolderSource(torch.utils.data.Dataset):
    """Images under `path`, decoded per item to float32 (C, H, W) in [-1, 1] (kind "image").

    Labelling is `images.image_folder`'s: class subfolders (sorted names, nested folders count)
    are labels 0, 1, ...; a folder without subfolders is unlabelled; images next to class
    subfolders are ignored with a warning; an empty class folder keeps its label.
    image_size: resize the shorter side to it and center-crop a square. None: every image must
        have the size of the first readable one; a file that differs raises (naming both files
        and --image-size N) when it is read, so possibly only once training reaches it.
    channels: 1 or 3; None infers 1 when the first `probe` readable files (in listing order) are
        all grayscale, else 3. Every item is converted to that count (RGB -> ITU-R 601
        luminance, gray -> repeated).
    skip_corrupt: an unreadable file is replaced by the next readable index (cyclically), with
        that file's label, so the replacement is deterministic whatever the worker; the first
        one a process meets is warned about, and each process lists the ones it met in
        `.skipped`. Without it, reading such a file raises, naming it and --skip-corrupt.
    keep_size / max_area: every image keeps its own size (max_area > 0: scaled down, aspect ratio kept, to at
        most that many pixels); `variable_size` is then True, `sizes(indices)` gives each (h, w) (every
        file's header is read once, here), `shape` is (C, largest h, largest w), and training packs them
        (--pack-tokens, data/packing.py).
    `.files` and `.labels` (int64 (N,) or None) are the listing, in index order.
    """

    kind = "image"

    def __init__(self, path, image_size: int | None = None, channels: int | None = None,
                 skip_corrupt: bool = False, probe: int = PROBE, keep_size: bool = False, max_area: int | None = None):
        self.variable_size = check_variable_size(image_size, keep_size, max_area)
        self.max_area = int(max_area) if max_area else None
        root, files, class_names = list_folder(path, image_size, channels)
        self.root, self.source = root, str(root)
        self.files = [str(p) for p, _ in files]
        self.class_names = class_names
        self.num_classes = 0 if class_names is None else len(class_names)
        self.labels = None if class_names is None else torch.tensor([k for _, k in files], dtype=torch.int64)
        self.image_size = None if image_size is None else int(image_size)
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped: list[str] = []
        self._first, c = self._probe(max(1, int(probe)))
        self.channels = channels or c
        self.shape = (self.channels, *self._first[1])
        if self.variable_size:
            self._sizes = own_sizes(len(self.files), lambda j: capped_size(*header_size(self.files[j]), self.max_area),
                                    self.skip_corrupt, self._note_skipped)
            self.shape = (self.channels, *(int(v) for v in self._sizes.max(0)))

    def sizes(self, indices):
        """(len(indices), 2) (h, w) of the items (every one the same without keep_size / max_area)."""
        return sizes_at(self, indices)

    def _probe(self, k: int) -> tuple[tuple[str, tuple[int, int]], int]:
        """Read the first k readable files: (the first one's path and (H, W)), inferred channels."""
        first, gray, j = None, [], 0
        while len(gray) < k and j < len(self.files):
            try:
                t, is_gray = decode(self.files[j], self.image_size)
            except UnreadableImage:
                if not self.skip_corrupt:
                    raise
                self._note_skipped(j)
                j += 1
                continue
            first = first or (self.files[j], tuple(t.shape[1:]))
            if tuple(t.shape[1:]) != first[1] and not self.variable_size:
                raise size_mismatch(first[0], first[1], self.files[j], t.shape[1:])
            gray.append(is_gray)
            j += 1
        if first is None:
            raise ValueError(f"no readable images in {self.root} ({len(self.files)} unreadable)")
        return first, 1 if all(gray) else 3

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i) -> dict:
        return readable_item(self, i, self._item, self._note_skipped, "images", f"no readable images in {self.root}")

    def _item(self, j: int) -> dict:
        """Item j decoded: {"x0": (C, H, W) in [-1, 1], "cond": {"y": label}} (no cond if unlabelled)."""
        t, _ = decode(self.files[j], self.image_size)
        if self.variable_size:
            t = cap_area(t, self.max_area)
        elif tuple(t.shape[1:]) != self._first[1]:
            raise size_mismatch(self._first[0], self._first[1], self.files[j], t.shape[1:])
        item = {"x0": (to_channels(t, self.channels) * 2 - 1).contiguous()}
        if self.labels is not None:
            item["cond"] = {"y": self.labels[j].clone()}
        return item

    def _note_skipped(self, j: int) -> None:
        if self.files[j] in self.skipped:
            return
        if not self.skipped:
            warnings.warn(f"{self.root}: unreadable image {self.files[j]} is replaced by the next readable "
                          f"one (skip_corrupt); later ones are replaced silently and listed in .skipped")
        self.skipped.append(self.files[j])

    def arrays(self, limit: int | None = None, num_workers: int = 0,
               batch_size: int = 256) -> tuple[Tensor, Tensor | None]:
        """(x (n, C, H, W), y (n,) or None): the first `limit` items (all when None) decoded into
        memory, by `num_workers` DataLoader workers when > 0."""
        n = len(self) if limit is None else max(0, min(int(limit), len(self)))
        if self.variable_size and len(np.unique(self._sizes[:n], axis=0)) > 1:
            raise ValueError(f"{self.root} holds images of several sizes (keep_size / max_area): they do not stack "
                             "into one array; evaluate against a folder read at one --image-size")
        if n == 0:
            return torch.empty((0, *self.shape)), None if self.labels is None else torch.empty(0, dtype=torch.int64)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self, range(n)), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=collate)
        batches = list(loader)
        x = torch.cat([b["x0"] for b in batches])
        return x, None if self.labels is None else torch.cat([b["cond"]["y"] for b in batches])

    def __repr__(self) -> str:
        return (f"ImageFolderSource(n={len(self)}, shape={self.shape}, num_classes={self.num_classes}, "
                f"source={self.source!r})")


def readable_item(source, i, item, note_skipped, unit: str, none_readable: str) -> dict:
    """item(i); when it raises UnreadableImage and source.skip_corrupt is set, the next readable
    index instead (cyclically), noted with note_skipped(j), so a replacement depends only on i,
    whatever the worker. Shared by the image-folder and tar-shard sources."""
    n = len(source)
    i = operator.index(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} {unit}")
    for k in range(n):
        j = (i + k) % n
        try:
            return item(j)
        except UnreadableImage:
            if not source.skip_corrupt:
                raise
            note_skipped(j)
    raise ValueError(none_readable)

