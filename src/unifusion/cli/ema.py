"""`unifusion ema`: post-hoc EMA (EDM2) -- any EMA length, after training, from the snapshots of
the two power-function profiles a run recorded with --posthoc-every (training/ema.py)."""
from __future__ import annotations

from pathlib import Path

from .. import models
from ..training import ema as E


def snapshots_of(checkpoint) -> tuple[Path, list]:
    from ..evaluation.evaluate import run_dir
    run = run_dir(checkpoint)
    folder = run / E.POSTHOC_PREFIX
    snaps = E.read_snapshots(folder)
    if not snaps:
        raise ValueError(f"{run} has no post-hoc EMA snapshots ({folder} is empty or missing): train with "
                         "--posthoc-every K (e.g. 100) to record them")
    return run, snaps


def model_with(checkpoint, weights: dict):
    """The run's model with the reconstructed floating tensors over its own (integer buffers kept)."""
    spec, raw, _, info = models.read(checkpoint)
    model = models.build(spec)
    merged = {**raw, **{k: v for k, v in weights.items() if k in raw}}
    models.io.load_weights(model, merged, info["where"])
    return model.eval()


def parse_stds(text: str) -> list[float]:
    try:
        stds = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--std: cannot read {text!r}; give relative stds, e.g. 0.05,0.10,0.15") from None
    if not stds:
        raise ValueError("--std: give at least one relative std, e.g. 0.10")
    return stds


def run_ema(args) -> dict:
    run, snaps = snapshots_of(args.checkpoint)
    out = Path(args.out) if args.out else run / "posthoc-ema"
    written = {}
    print(f"{len(snaps)} snapshots of {len(snaps[0][1])} profiles in {run / E.POSTHOC_PREFIX}, steps "
          f"{snaps[0][0]}..{snaps[-1][0]}")
    made = [(std, *E.reconstruct(snaps, std, args.at)) for std in parse_stds(args.std)]  # all fit, or none written
    for std, weights, info in made:
        folder = models.save(model_with(args.checkpoint, weights), out / f"std-{std:.3f}")
        written[std] = str(folder)
        print(f"  std {std:.3f} (gamma {info['gamma']:.2f}) at step {info['step']}: profile error "
              f"{info['profile_error']:.2e} from {info['snapshots']} snapshots -> {folder}")
    return written
