"""`unifusion ema`: post-hoc EMA (EDM2) -- any EMA length, after training, from the snapshots of
the two power-function profiles a run recorded with --posthoc-every (training/ema.py).

Each std is written as a model folder <out>/std-X whose spec records what it is
(training.posthoc_ema: std, step, run). Rerunning the same reconstruction rewrites it byte for
byte; a folder made at another step, of another run, or that is no post-hoc EMA at all is refused
unless --overwrite is given."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import models
from ..training import ema as E
from ..training.ema import model_with, parse_stds, snapshots_of


def _steps(steps: list[int]) -> str:
    """'100, 200, ..., 1000 (10 snapshots)' or the whole list when short."""
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} snapshots)"


def _made(folder: Path) -> dict | None:
    """The training.posthoc_ema record of a model folder's spec (None: not a post-hoc EMA folder)."""
    try:
        spec = json.loads((folder / models.io.SPEC_FILE).read_text())
        made = spec.get("training", {}).get("posthoc_ema")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return made if isinstance(made, dict) else None


def check_target(folder: Path, record: dict, overwrite: bool) -> None:
    """The std-X folder may be written: new, empty, or this very reconstruction (--overwrite: anything)."""
    if overwrite or not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    made = _made(folder) if folder.is_dir() else None
    if made == record:
        return
    if made is None:
        why = "is not a post-hoc EMA model folder"
    elif made.get("run") != record["run"]:
        why = f"holds a post-hoc EMA of another run ({made.get('run')})"
    else:
        why = f"holds the EMA with std {made.get('std')} reconstructed at step {made.get('step')}"
    raise ValueError(f"{folder} {why}, not std {record['std']} at step {record['step']}; pass --overwrite to "
                     "replace it, or choose another --out")


def _clear(folder: Path) -> None:
    """--overwrite: remove what was there (the spec first: a half-written folder is never a model)."""
    if folder.is_dir():
        for name in (models.io.SPEC_FILE, models.io.EMA_FILE, models.io.WEIGHTS_FILE):
            (folder / name).unlink(missing_ok=True)
    elif folder.exists():
        folder.unlink()


def run_ema(args) -> dict:
    run, snaps = snapshots_of(args.checkpoint)
    steps = [s[0] for s in snaps]
    if args.at is not None and args.at not in steps:
        raise ValueError(f"--at {args.at}: the run has no snapshot at that step; give one of the snapshot steps "
                         f"{_steps(steps)}")
    at = steps[-1] if args.at is None else args.at
    out = Path(args.out) if args.out else run / "posthoc-ema"
    stds = sorted({f"{std:.3f}": std for std in parse_stds(args.std)}.items())  # one folder per written name
    bad = [std for _, std in stds if not (math.isfinite(std) and std > 0)]
    if bad:
        raise ValueError(f"--std: relative stds must be finite numbers > 0, got {bad}")
    targets = []
    for name, std in stds:  # every folder checked before any is written
        record = {"std": float(name), "step": at, "run": str(run.resolve())}
        check_target(out / f"std-{name}", record, args.overwrite)
        targets.append((name, std, record))
    made = []
    for name, std, record in targets:  # all fit, or none written
        try:
            weights, info = E.reconstruct(snaps, std, at)
        except ValueError:
            lo, hi = E.reconstructible_range(snaps, at)
            if math.isnan(lo):
                raise ValueError(f"no EMA length can be reconstructed at step {at} from the snapshots up to it "
                                 f"(steps {_steps([s for s in steps if s <= at])}); pick a later --at") from None
            raise
        made.append((name, record, weights, info))
    print(f"{len(snaps)} snapshots of {len(snaps[0][1])} profiles in {run / E.POSTHOC_PREFIX}, steps "
          f"{snaps[0][0]}..{snaps[-1][0]}")
    written = {}
    for name, record, weights, info in made:
        model = model_with(args.checkpoint, weights)
        model.spec.training = {**(model.spec.training or {}), "posthoc_ema": record}
        folder = out / f"std-{name}"
        if args.overwrite:
            _clear(folder)
        models.save(model, folder)
        written[record["std"]] = str(folder)
        print(f"  std {name} (gamma {info['gamma']:.2f}) at step {info['step']}: profile error "
              f"{info['profile_error']:.2e} from {info['snapshots']} snapshots -> {folder}")
    return written
