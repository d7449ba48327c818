"""`unifusion calibrate`: fit a sampler's sigma grid at one NFE to a trained model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import models
from ..evaluation.evaluate import calibration_file
from ..models.io import run_folder
from ..samplers.calibrate import FORMAT, MAX_NFE


def parse_labels(text: str | None, num_classes: int, what: str) -> list[int] | None:
    """'0-4' or '1,3,5' -> labels (None: every class)."""
    if text is None:
        return None
    if not num_classes:
        raise ValueError(f"{what} needs a class-conditional model; this one is unconditional")
    from .sample import parse_seeds
    labels = parse_seeds(text, None)
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"{what}: labels {bad} are not in 0..{num_classes - 1}")
    return labels


def check_out(out: Path, overwrite: bool) -> None:
    """--out: a new file or an earlier calibration (replaced); any other file only with --overwrite."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the calibration's file name, e.g. {out / 'grid.json'}")
    if not out.exists() or overwrite:
        return
    try:
        ours = json.loads(out.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"--out {out} exists and is not a calibration; choose another --out, or pass --overwrite "
                         "to replace it")


def model_folder(checkpoint) -> Path:
    """--save-to-model: the model folder a path names (itself, or a finished run's <run>/model)."""
    folder = Path(checkpoint)
    folder = folder / "model" if not (folder / models.io.SPEC_FILE).is_file() else folder
    if not (folder / models.io.SPEC_FILE).is_file():
        raise ValueError(f"--save-to-model needs a model folder or a finished run (with <run>/model), not "
                         f"{checkpoint}; give that folder as --checkpoint")
    return folder


def run_calibrate(args) -> dict:
    if args.n_ref < 2 or args.n_val < 2:
        raise ValueError(f"--n-ref and --n-val must be >= 2, got {args.n_ref} and {args.n_val}")
    if not 1 <= args.nfe <= MAX_NFE:
        raise ValueError(f"--nfe must be in 1..{MAX_NFE}, got {args.nfe}: a calibrated grid is for small budgets "
                         f"(above ~{MAX_NFE} calls every grid is close to exact, and the fit takes hours)")
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "calibration" / calibration_file(args.sampler,
                                                                                                          args.nfe)
    check_out(out, getattr(args, "overwrite", False))
    folder = model_folder(args.checkpoint) if args.save_to_model else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.load(args.checkpoint, use_ema=not args.no_ema, device=device)
    spec = model.spec
    if model.one_pass:
        raise ValueError(f"a {spec.family} model samples in one inverse pass: it has no noise levels to calibrate")
    if not callable(getattr(model, "denoise", None)):
        raise ValueError(f"--checkpoint {args.checkpoint} is a model of the {spec.family} family, which has no "
                         "sampler, so there is no noise grid to calibrate; give a diffusion or flow model")
    k = spec.num_classes
    fit_labels = parse_labels(args.fit_labels, k, "--fit-labels") or list(range(k))
    val_labels = parse_labels(args.val_labels, k, "--val-labels") or list(range(k))
    cal = model.calibrate(args.sampler, args.nfe, n_ref=args.n_ref, n_val=args.n_val, fit_labels=fit_labels,
                          val_labels=val_labels, seed=args.seed, method=args.method, progress=True)
    cal.save(out)
    print(cal.summary())
    if k and (args.fit_labels or args.val_labels):
        print(f"fit on labels {fit_labels}, held-out RMSE on labels {val_labels}")
    print(f"wrote {out}; use it with `unifusion sample --noise-grid {out}` or "
          f"`unifusion eval --grid calibrated --sampler {args.sampler} --nfe {args.nfe}`")
    if folder is not None:
        spec.calibrated[models.spec.calibration_key(args.sampler, args.nfe)] = cal.to_dict()
        models.io.save_spec(folder, spec)
        print(f"stored in {folder / models.io.SPEC_FILE}: the default grid of {args.sampler} at NFE {args.nfe}")
    return {"calibration": str(out), "rmse_val": cal.rmse_val, "seconds": cal.seconds}
