"""`unifusion sample`: a model -> .npz (+ grid PNG)."""
from __future__ import annotations

import numpy as np
import torch

from .. import data as datasets
from .. import models
from ..safeio import atomic_path


def parse_seeds(text: str | None, n: int | None) -> list[int]:
    """'0-63' or '1,5,9' or None (then 0..n-1)."""
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if text is None:
        if n is None:
            raise ValueError("give --n COUNT or --seeds A-B")
        return list(range(n))
    seeds = []
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        try:
            lo, hi = (int(a), int(b)) if dash else (int(a), int(a))
        except ValueError:
            raise ValueError(f"--seeds: cannot read {part!r}; use e.g. 0-63 or 1,5,9") from None
        if hi < lo:
            raise ValueError(f"--seeds: the range {part.strip()!r} is empty; write the lower seed first, e.g. {hi}-{lo}")
        seeds += list(range(lo, hi + 1))
    if n is not None:
        if n > len(seeds):
            raise ValueError(f"--n {n} is more than the {len(seeds)} seeds given")
        seeds = seeds[:n]
    return seeds


def run_sample(args) -> dict:
    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must end in .npz, got {args.out!r}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    seeds = parse_seeds(args.seeds, args.n)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.load(args.checkpoint, use_ema=not args.no_ema, device=device)
    k = model.spec.num_classes
    if args.label is not None:
        if not k:
            raise ValueError("--label needs a class-conditional model; this one is unconditional")
        if not 0 <= args.label < k:
            raise ValueError(f"--label must be in 0..{k - 1}")
    cond = {"y": torch.full((len(seeds),), args.label)} if args.label is not None else None
    own = model.spec.sampling_defaults()  # unless named: the model's own sampler and NFE (a few-step student's)
    with torch.no_grad():
        x, cond = model.sample(seeds=seeds, sampler=args.sampler or own[0],
                               nfe=args.nfe if args.nfe is not None else own[1], cond=cond, cfg=args.cfg,
                               grid=args.noise_grid, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                               batch_size=args.batch_size, progress=True, return_cond=True,
                               temperature=args.temperature)
    arrays = {"x": x.numpy().astype(np.float32), "seeds": np.array(seeds)}
    if k:
        arrays["y"] = cond["y"].numpy()
    with atomic_path(args.out) as tmp:
        np.savez(tmp, **arrays)
    msg = f"wrote {len(seeds)} samples to {args.out}"
    if args.grid:
        if x.ndim == 4:
            datasets.save_grid(x, args.grid)
            msg += f" and the grid {args.grid}"
        else:
            msg += " (no --grid for non-image data)"
    print(msg)
    return {"npz": str(args.out), "grid": args.grid}
