"""Model folders: ``spec.json`` + ``weights.safetensors`` (+ ``ema.safetensors``).

`load` also accepts a training run (its newest complete checkpoint) or a checkpoint folder,
whose state.json carries the spec. Nothing is unpickled; weights that do not fit the spec's
network are refused with one line that says how they differ.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .. import safeio
from .. import checkpoint
from .spec import ModelSpec

SPEC_FILE, WEIGHTS_FILE, EMA_FILE = "spec.json", "weights.safetensors", "ema.safetensors"
_EMA_BOOKKEEPING = "__"  # training.ema stores its counters under "__"-prefixed keys


def save(model, folder: str | Path, ema: dict[str, Tensor] | None = None) -> Path:
    """Write a model folder atomically file by file (weights first, spec last). Grids calibrated to
    the folder's model stay in its spec when the weights written are the same (e.g. a finished run
    resumed: it writes its final model again)."""
    out = Path(folder)
    own = model.state_dict()
    ema = {k: v for k, v in ema.items() if k in own} if ema is not None else None
    spec = model.spec
    kept = _calibrations_of_same_weights(out, own, ema)
    if kept:
        import dataclasses
        spec = dataclasses.replace(spec, calibrated={**kept, **spec.calibrated})
    out.mkdir(parents=True, exist_ok=True)
    safeio.save_safetensors(own, out / WEIGHTS_FILE)
    if ema is not None:
        safeio.save_safetensors(ema, out / EMA_FILE)
    for name, text in model.extra_files().items():  # e.g. a text encoder's tokenizer.json
        safeio.atomic_write(out / name, text)
    safeio.atomic_write(out / SPEC_FILE, spec.to_json() + "\n")
    return out


def _calibrations_of_same_weights(folder: Path, weights: dict[str, Tensor], ema: dict[str, Tensor] | None) -> dict:
    """The calibrated grids of the model folder at `folder` if its weights (and EMA) are exactly
    these, else {} (other weights: a grid fitted to those does not carry over). `ema` may hold more
    tensors than the folder's EMA file (a checkpoint's EMA also tracks non-persistent buffers)."""
    try:
        old = ModelSpec.read(folder / SPEC_FILE) if (folder / SPEC_FILE).is_file() else None
        if old is None or not old.calibrated or (ema is None) == (folder / EMA_FILE).is_file():
            return {}
        for path, new, exact in ((folder / WEIGHTS_FILE, weights, True), (folder / EMA_FILE, ema, False)):
            if new is None:
                continue
            have = safeio.read_safetensors(path)
            if (have.keys() != new.keys() if exact else not have.keys() <= new.keys()) or \
                    not all(torch.equal(v, new[k].detach().cpu()) for k, v in have.items()):
                return {}
    except (OSError, ValueError):  # an unreadable folder: nothing to keep
        return {}
    return dict(old.calibrated)


def save_spec(folder: str | Path, spec: ModelSpec) -> Path:
    """Replace a model folder's spec.json (atomically), e.g. to add a calibrated grid."""
    p = Path(folder) / SPEC_FILE
    if not p.is_file():
        raise ValueError(f"{folder} is not a model folder (no {SPEC_FILE}); give the model folder, e.g. <run>/model")
    spec.validate()
    return safeio.atomic_write(p, spec.to_json() + "\n")


def read(path: str | Path) -> tuple[ModelSpec, dict[str, Tensor], dict[str, Tensor] | None, dict]:
    """(spec, weights, ema weights or None, info) from a model folder, a checkpoint folder or a
    run folder; info holds "step" and "where" when they are known."""
    p = Path(path)
    if p.is_dir() and (p / SPEC_FILE).is_file():
        spec = ModelSpec.read(p / SPEC_FILE)
        if not (p / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"model folder {p} has {SPEC_FILE} but no {WEIGHTS_FILE}")
        ema = safeio.read_safetensors(p / EMA_FILE) if (p / EMA_FILE).is_file() else None
        return spec, safeio.read_safetensors(p / WEIGHTS_FILE), ema, {"where": str(p)}
    if p.is_file() and p.suffix == ".safetensors":
        raise ValueError(f"{p} is one weights file; give the folder that holds it and its {SPEC_FILE} "
                         f"(a model folder, a checkpoint folder or the run folder)")
    tensors, state = checkpoint.load(p)
    if "spec" not in state:
        raise ValueError(f"{p} holds no model spec ({checkpoint.STATE_FILE} has no 'spec': written by unifusion "
                         "0.1, before the model layer, or edited by hand) and cannot be loaded; load the run's "
                         "model folder (<run>/model) if it has one, or retrain")
    spec = ModelSpec.from_dict(state["spec"], where=f"{p} ({checkpoint.STATE_FILE})")
    if "model" not in tensors:
        raise ValueError(f"checkpoint {p} has no model weights (model.safetensors)")
    ema = {k: v for k, v in tensors["ema"].items() if not k.startswith(_EMA_BOOKKEEPING)} if "ema" in tensors else None
    # grids calibrated to the run's model folder (`train --calibrate`, `calibrate --save-to-model`) when
    # that folder holds these very weights (the run's final checkpoint)
    kept = _calibrations_of_same_weights(run_folder(p) / "model", tensors["model"], ema)
    if kept:
        import dataclasses
        spec = dataclasses.replace(spec, calibrated={**kept, **spec.calibrated})
    return spec, tensors["model"], ema, {"step": state.get("step"), "where": str(p), "state": state}


def read_spec(path, what: str) -> ModelSpec:
    """The spec of a run, checkpoint or model folder, with `what` (the flag) named in any error."""
    try:
        return read(path)[0]
    except (ValueError, OSError) as e:
        raise ValueError(f"{what} {path}: {e}") from None


def check_same_shape(spec: ModelSpec, shape: tuple, what: str, data: str) -> None:
    """Couplings, teachers and initial weights must come from a model of the data's shape."""
    if tuple(spec.shape) != tuple(shape):
        raise ValueError(f"{what} is a model of data shape {tuple(spec.shape)}, but --data {data} holds "
                         f"{tuple(shape)}: couplings and teachers must come from a model of the same shape")


def run_folder(path: str | Path) -> Path:
    """The run folder a model path belongs to: a run stays itself, a checkpoint folder
    (<run>/checkpoints/step-N) or a file in one gives <run>. Outputs derived from a model go next
    to the run, never inside a checkpoint folder, which pruning may delete."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return p.parent.parent
    return p.parent if p.name == "checkpoints" else p


def load_weights(model, weights: dict[str, Tensor], where: str) -> None:
    """load_state_dict(strict) with one readable line when the weights are another network's."""
    own = model.state_dict()
    # an EMA also tracks non-persistent buffers (DiT's fixed position codes): not part of the weights
    transient = {name for name, _ in model.named_buffers()} - set(own)
    weights = {k: v for k, v in weights.items() if k not in transient}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k}: file {tuple(weights[k].shape)} vs spec {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise ValueError(f"the weights in {where} do not fit the network its spec describes: "
                         + ", ".join(x for x in parts if x)
                         + "; the spec and the weights must come from the same run")
    model.load_state_dict(weights, strict=True)


def load(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """A ready model (eval mode) from a model folder, checkpoint or run; EMA weights when present."""
    from . import build
    spec, weights, ema, info = read(path)
    model = build(spec)
    chosen = ema if use_ema and ema is not None else weights
    load_weights(model, chosen, info["where"])
    model.info = {**info, "weights": "ema" if chosen is ema else "raw"}
    model.info.pop("state", None)
    return model.to(device).eval()
