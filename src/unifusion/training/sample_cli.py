"""`unifusion sample`: checkpoint -> .npz (+ grid PNG)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import data as datasets
from .model import generate, load


def parse_seeds(text: str | None, n: int | None) -> list[int]:
    """'0-63' or '1,5,9' or None (then 0..n-1)."""
    if text is None:
        if n is None:
            raise ValueError("give --n COUNT or --seeds A-B")
        return list(range(n))
    seeds = []
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        try:
            seeds += list(range(int(a), int(b) + 1)) if dash else [int(a)]
        except ValueError:
            raise ValueError(f"--seeds: cannot read {part!r}; use e.g. 0-63 or 1,5,9") from None
    if n is not None:
        if n > len(seeds):
            raise ValueError(f"--n {n} is more than the {len(seeds)} seeds given")
        seeds = seeds[:n]
    return seeds


def run_sample(args) -> dict:
    if not str(args.out).endswith(".npz"):
        raise SystemExit("unifusion sample: --out must end in .npz")
    seeds = parse_seeds(args.seeds, args.n)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, state = load(args.checkpoint, use_ema=not args.no_ema, device=device)
    nc = state["num_classes"]
    labels = torch.full((len(seeds),), args.label) if (nc and args.label is not None) else None
    if labels is not None and not 0 <= args.label < nc:
        raise SystemExit(f"unifusion sample: --label must be in 0..{nc - 1}")
    with torch.no_grad():
        x, y = generate(model, tuple(state["shape"]), seeds, args.sampler, args.nfe, nc, labels, args.cfg,
                        device=device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x.numpy().astype(np.float32), "seeds": np.array(seeds)}
    if nc:
        arrays["y"] = y.numpy()
    np.savez(out, **arrays)
    msg = f"wrote {len(seeds)} samples to {out}"
    if args.grid:
        if x.ndim == 4:
            datasets.save_grid(x, args.grid)
            msg += f" and the grid {args.grid}"
        else:
            msg += " (no --grid for non-image data)"
    print(msg)
    return {"npz": str(out), "grid": args.grid}
