"""Checkpoints: tensors in safetensors, everything else in JSON; never pickles (DESIGN §4.8).

Layout of one checkpoint::

    run_dir/checkpoints/step-00001000/
        model.safetensors   ema.safetensors   optimizer.safetensors   rng.safetensors
        state.json          # the caller's JSON state + "_checkpoint": {version, step, groups}

Completeness is defined by the rename, not by a marker file. save() writes every file into a
hidden sibling ``.tmp-step-00001000-<pid>``, fsyncs each file and then the folder, and only then
renames it to ``step-00001000`` (one atomic rename) and fsyncs ``checkpoints/``. So a folder
named ``step-*`` is complete whatever happens to the process; a run killed mid-save leaves only a
``.tmp-*`` folder, which latest() ignores and the next save() removes. As a guard against
folders copied by hand, latest() also requires state.json (written last), and load() checks
that every group listed in it is there.

Nothing here unpickles: a pickle can run arbitrary code when loaded.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .safeio import fsync_path as _fsync_path
from .safeio import looks_like_pickle, pickle_message

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
# hidden folders save() may leave behind when killed: .tmp-<name>-<pid> (being written),
# .old-<name>-<pid> (a same-step checkpoint being replaced), .del-<name>-<pid> (being pruned)
_HIDDEN_RE = re.compile(r"^\.(tmp|old|del)-(step-\d+)-(\d+)$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointError(RuntimeError, OSError):
    """A checkpoint could not be written or read (the message says what is intact / what to do)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path."""


# --------------------------------------------------------------------------------------------
# save / latest / load


def save(run_dir: str | os.PathLike, step: int, tensors: dict[str, dict[str, Tensor]],
         state: dict, keep: int | None = 3) -> Path:
    """Write ``run_dir/checkpoints/step-{step:08d}/`` atomically and return its path.

    tensors: group name -> flat {key: tensor} (e.g. "model", "ema", "optimizer", "rng"), one
    ``<group>.safetensors`` each. state: a JSON-serialisable dict (config, step, counters, the
    json halves of optimizer_to_tensors / rng_state). keep: how many complete checkpoints to
    keep, the one just written always among them (None keeps all).
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if "_checkpoint" in state:
        raise ValueError("state must not contain the reserved key '_checkpoint'")
    for group in tensors:
        if not isinstance(group, str) or not _GROUP_RE.match(group):
            raise ValueError(f"group name {group!r} must match {_GROUP_RE.pattern} (it becomes a file name)")
    # serialise and prepare everything before touching the disk: a bad state fails cleanly
    meta = dict(state)
    meta["_checkpoint"] = {"version": FORMAT_VERSION, "step": step, "groups": list(tensors)}
    try:
        text = json.dumps(meta, indent=1) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint state is not JSON-serialisable ({exc}); store tensors as a "
                        "tensor group and convert numpy values with .tolist()") from exc
    payload = {group: _savable(group, d) for group, d in tensors.items()}

    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(ckpt_dir)  # first, so a killed run's leftovers do not eat the disk we need
    previous = latest(run_dir)
    name = f"step-{step:08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    try:
        tmp.mkdir()
        for group, flat in payload.items():
            path = tmp / f"{group}.safetensors"
            save_file(flat, str(path), metadata={"format": "pt"})
            _fsync_path(path)
        _write_text(tmp / STATE_FILE, text)
        _fsync_path(tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = (f"the previous checkpoint {previous} is intact" if previous is not None
                  else f"no earlier checkpoint exists in {ckpt_dir}")
        hint = " (disk full)" if getattr(exc, "errno", None) == errno.ENOSPC else ""
        err = CheckpointError(f"could not write checkpoint {final}{hint}: {exc}; nothing was "
                              f"replaced and the partial files were removed; {intact}")
        err.errno = getattr(exc, "errno", None)
        raise err from exc
    except BaseException:  # KeyboardInterrupt: clean up, stay interrupted
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # publish: one rename makes it complete. Re-saving a step moves the old copy aside first
    # (a directory cannot be renamed onto a non-empty one); _remove_stale restores it if we die
    # between the two renames.
    old = None
    if final.exists():
        old = ckpt_dir / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(ckpt_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

    if keep is not None:
        others = [p for _, p in _complete(ckpt_dir) if p != final]
        for path in others[: max(0, len(others) - (keep - 1))]:
            # rename first so a kill during rmtree never leaves a half-deleted step-* folder
            doomed = ckpt_dir / f".del-{path.name}-{os.getpid()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        _fsync_path(ckpt_dir)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir/checkpoints``, or None."""
    found = _complete(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


def load(path: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Read a checkpoint -> (tensors by group, state). Never unpickles.

    path: a checkpoint folder (``.../checkpoints/step-XXXXXXXX``), a run directory (its newest
    complete checkpoint), the run's ``checkpoints`` folder, or a bare ``.safetensors`` file
    (returned as ``{stem: tensors}, {}``). Tensors come back on the CPU.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {p}: the path does not exist{_whats_there(p)}")
    if p.is_file():
        _refuse_pickle(p)
        if p.suffix == ".safetensors":
            return {p.stem: _read_safetensors(p)}, {}
        if p.name != STATE_FILE:
            raise CheckpointError(f"{p} is not a checkpoint: give a checkpoint folder "
                                  "(run_dir/checkpoints/step-XXXXXXXX), a run directory or a .safetensors file")
        p = p.parent
    if not (p / STATE_FILE).is_file():
        found = latest(p) or (latest(p.parent) if p.name == "checkpoints" else None)
        if found is None:
            raise CheckpointNotFoundError(f"no complete checkpoint at {p} (expected {STATE_FILE} there "
                                          f"or complete step-* folders in {p / 'checkpoints'}){_whats_there(p)}")
        p = found
    try:
        state = json.loads((p / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint state {p / STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt checkpoint state {p / STATE_FILE}: expected a JSON object")
    info = state.pop("_checkpoint", None)
    if info is not None:
        if info.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{p} was written by a newer unifusion (format {info['version']} > {FORMAT_VERSION})")
        groups = list(info.get("groups", []))
        bad = [g for g in groups if not isinstance(g, str) or not _GROUP_RE.match(g)]
        if bad:  # a hand-edited name like "../../x" must not read a file outside the checkpoint
            raise CheckpointError(f"corrupt checkpoint state {p / STATE_FILE}: invalid group name(s) {bad}")
    else:  # a folder assembled by hand: every safetensors file in it
        groups = sorted(f.stem for f in p.glob("*.safetensors"))
    tensors = {}
    for group in groups:
        file = p / f"{group}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"incomplete checkpoint {p}: {STATE_FILE} lists group '{group}' "
                                  f"but {file.name} is missing")
        tensors[group] = _read_safetensors(file)
    return tensors, state


# --------------------------------------------------------------------------------------------
# optimizer and RNG state <-> (tensors, JSON)


def pack(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, JSON scalars) into flat tensors keyed
    by their path and a JSON-able skeleton; unpack() inverts it exactly (tuples and non-string
    dict keys included). Use it for any state_dict that mixes tensors and hyperparameters."""
    tensors: dict[str, Tensor] = {}
    return tensors, _encode(obj, prefix, tensors)


def unpack(tensors: dict[str, Tensor], meta: Any) -> Any:
    """Inverse of pack()."""
    if isinstance(meta, list):
        return [unpack(tensors, v) for v in meta]
    if not isinstance(meta, dict):
        return meta
    if set(meta) == {"__tensor__"}:
        key = meta["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor '{key}'")
        return tensors[key]
    if set(meta) == {"__tuple__"}:
        return tuple(unpack(tensors, v) for v in meta["__tuple__"])
    if set(meta) == {"__items__"}:
        return {k: unpack(tensors, v) for k, v in meta["__items__"]}
    return {k: unpack(tensors, v) for k, v in meta.items()}


def optimizer_to_tensors(opt_state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON meta): per-parameter state (AdamW: exp_avg,
    exp_avg_sq, step) becomes tensors ``state.<id>.<name>``, param_groups go to JSON."""
    tensors, meta = pack(opt_state_dict)
    return tensors, {"format": "torch.optim.state_dict", "state_dict": meta}


def optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of optimizer_to_tensors; the result goes to ``optimizer.load_state_dict``."""
    if meta.get("format") != "torch.optim.state_dict":
        raise CheckpointError(f"not an optimizer state (format {meta.get('format')!r})")
    return unpack(tensors, meta["state_dict"])


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """Every global RNG -> (tensors, JSON meta): torch CPU (and each CUDA device, if any) as
    byte tensors; python ``random`` and numpy's global MT19937 as JSON lists."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    n_cuda = 0
    if torch.cuda.is_available():
        cuda_states = torch.cuda.get_rng_state_all()
        n_cuda = len(cuda_states)
        tensors.update({f"torch.cuda.{i}": s for i, s in enumerate(cuda_states)})
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"cuda_devices": n_cuda,
            "python": [version, list(internal), gauss_next],
            "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore what rng_state() captured (CUDA only when the device count matches; else warns)."""
    torch.set_rng_state(tensors["torch.cpu"].to("cpu", torch.uint8))
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
            torch.cuda.set_rng_state_all([tensors[f"torch.cuda.{i}"].to("cpu", torch.uint8)
                                          for i in range(n_cuda)])
        else:
            warnings.warn(f"checkpoint holds RNG states of {n_cuda} CUDA devices but "
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are "
                          "visible; CUDA RNG not restored", stacklevel=2)
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npm = meta["numpy"]
    np.random.set_state((npm["name"], np.asarray(npm["keys"], dtype=np.uint32), npm["pos"],
                         npm["has_gauss"], npm["cached_gaussian"]))


# --------------------------------------------------------------------------------------------
# helpers


def _savable(group: str, flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing storage (safetensors refuses shared or strided ones)."""
    out, seen = {}, set()
    for key, t in flat.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor keys must be strings; group '{group}' has {key!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"'{group}'['{key}'] is a {type(t).__name__}, not a tensor; "
                            "put non-tensor values in the JSON state")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh contiguous copy
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        partial = t.numel() * t.element_size() != storage.nbytes()
        if not t.is_contiguous() or partial or (ptr != 0 and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)  # tied / viewed weights
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        if path in tensors:
            raise ValueError(f"two tensors map to the same key '{path}'")
        tensors[path] = obj
        return {"__tensor__": path}
    def sub(k: Any) -> str:
        return f"{path}.{k}" if path else str(k)

    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, sub(i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, sub(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        for k in obj:  # e.g. optimizer state keyed by int parameter ids
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store dict key {k!r} at '{path}' in JSON")
        return {"__items__": [[k, _encode(v, sub(k), tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at '{path}' in a checkpoint (tensors and JSON values only)")


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if looks_like_pickle(file):
            raise CheckpointError(pickle_message(file)) from exc
        raise CheckpointError(f"corrupt safetensors file {file}: {exc}") from exc


def _refuse_pickle(file: Path) -> None:
    if file.suffix != ".safetensors" and looks_like_pickle(file):
        raise CheckpointError(pickle_message(file))


def _complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and (entry / STATE_FILE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier failed attempt: save() is not re-entrant
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(ckpt_dir: Path) -> None:
    """Delete hidden folders of dead savers; put back a replaced checkpoint whose successor never
    arrived (a kill between the two renames of a same-step re-save)."""
    for entry in ckpt_dir.iterdir():
        m = _HIDDEN_RE.match(entry.name)
        if not m or not entry.is_dir() or _pid_alive(int(m.group(3))):
            continue
        final = ckpt_dir / m.group(2)
        if m.group(1) == "old" and not final.exists() and (entry / STATE_FILE).is_file():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _whats_there(p: Path) -> str:
    for cand in (p / "checkpoints", p, p.parent, p.parent / "checkpoints"):
        if cand.name == "checkpoints" and cand.is_dir():
            names = sorted(e.name for e in cand.iterdir())
            complete = [e.name for _, e in _complete(cand)]
            if not names:
                return f"; {cand} is empty"
            return (f"; {cand} holds {names} (complete checkpoints: {complete or 'none'})")
    return ""


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
