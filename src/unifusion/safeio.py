"""Safe file I/O, written once: atomic writes (temp + fsync + rename) and pickle-free reads.

Every file the project writes (npz, PNG, CSV/JSON, safetensors, shards) goes through
`atomic_write`, so a crash or a full disk leaves either the old file or the new one, never a
truncated mix. Every weights file is read through `read_safetensors`, which refuses pickles
(unpickling a user file can run arbitrary code).
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from torch import Tensor

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


class UnsafeFileError(ValueError):
    """A file that would have to be unpickled to be read."""


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory's entry table (some file systems cannot: that is tolerated)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not path.is_dir() or exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path("out.npz") as tmp: np.savez(tmp, ...)``: the writer fills a hidden
    temporary file beside the target (same suffix, so libraries that key on it behave); on
    success it is fsynced and renamed over the target, on failure removed and the old target
    is left untouched."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written to {final}")
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror and exc.filename in (None, str(tmp), tmp):
            exc.filename = str(final)  # name the file the user asked for, not our temporary
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write bytes, text, or whatever `data(tmp_path)` writes, atomically to `path`."""
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """A pickle starts with 0x80 (protocol >= 2); torch.save's zip format with "PK\\x03\\x04"."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(p, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def pickle_message(path: str | os.PathLike) -> str:
    p = Path(path)
    return (f"refusing to load {p}: it is (or looks like) a pickle / torch.save file, and unifusion "
            "reads safetensors + JSON only (unpickling can run arbitrary code). If you trust the file, "
            "convert it once: python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{p.name}', map_location='cpu', weights_only=True); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{p.stem}.safetensors')\"")


def read_safetensors(path: str | os.PathLike, with_metadata: bool = False):
    """Tensors of a safetensors file on the CPU (and its metadata); never unpickles."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    if p.suffix != ".safetensors" and looks_like_pickle(p):
        raise UnsafeFileError(pickle_message(p))
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            tensors: dict[str, Tensor] = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if looks_like_pickle(p):
            raise UnsafeFileError(pickle_message(p)) from exc
        raise ValueError(f"corrupt safetensors file {p}: {exc}") from exc
    return (tensors, meta) if with_metadata else tensors


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Atomically write contiguous CPU tensors as safetensors; the same tensors and metadata give
    the same bytes (the metadata keys sorted, see _sort_metadata)."""
    from safetensors.torch import save_file

    import torch

    # fresh copies: safetensors refuses tensors that share storage (tied weights)
    flat = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(flat, str(tmp), metadata=metadata or {"format": "pt"})
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)
    return atomic_write(path, write)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys in sorted order. safetensors (Rust)
    keeps the metadata in a hash map, so its key order, and with it the file's bytes, changes from
    one process to the next; sorted keys make equal files byte-identical."""
    import json

    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text)) if len(text) <= n else b""
        if len(text) == n:  # the same header length (the usual case): rewritten in place
            f.seek(8)
            f.write(text)
            return
        f.seek(8 + n)
        data = f.read()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 (hex) of named tensors (names, dtypes, shapes and values, in name order): the identity
    of a set of weights, wherever they are stored (e.g. a teacher found under another path)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes (any dtype, bfloat16 too)
    return h.hexdigest()
