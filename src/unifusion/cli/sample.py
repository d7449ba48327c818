"""`unifusion sample`: a model -> .npz (+ a PNG of the samples)."""
from __future__ import annotations

import inspect
import sys

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


def png_path(args) -> str | None:
    """--png, or the deprecated --grid that meant the same (one line says so). A --grid naming a
    noise grid is refused: eval's --grid is the noise grid, and here it would become a PNG file."""
    png, old = getattr(args, "png", None), getattr(args, "grid", None)
    if old is not None:
        from ..samplers import grids
        if old in set(grids.GRIDS) | {"native", "calibrated"} or old.endswith(".json"):
            raise ValueError(f"--grid {old}: sample's --grid was the PNG output (now --png); for the noise grid "
                             f"pass --noise-grid {old}")
        if png is not None:
            raise ValueError("--grid is the old name of --png: give only --png")
        print("unifusion: --grid is deprecated for `sample`; use --png (the PNG of the samples)", file=sys.stderr)
        png = old
    if png is not None and not png.lower().endswith(".png"):
        raise ValueError(f"--png must end in .png, got {png!r}")
    return png


def read_prompts(given: list[str] | None, path: str | None) -> list[str] | None:
    """--prompt (repeatable) then the lines of --prompts FILE; None when neither is given."""
    if given is None and path is None:
        return None
    prompts = list(given or [])
    if path is not None:
        from pathlib import Path
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--prompts {path}: no such file; give a text file with one prompt per line")
        lines = p.read_text(encoding="utf-8").split("\n")
        prompts += lines[:-1] if lines and lines[-1] == "" else lines
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


def check_out(out: str, overwrite: bool) -> None:
    """An existing --out is replaced only when `sample` wrote it (arrays x and seeds), or with --overwrite."""
    from pathlib import Path
    p = Path(out)
    if not p.exists() or overwrite:
        return
    try:
        with np.load(p, allow_pickle=False) as f:
            ours = {"x", "seeds"} <= set(f.files)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"--out {out} exists and was not written by `unifusion sample` (no arrays x and seeds); "
                         "choose another --out, or pass --overwrite to replace it")


def run_sample(args) -> dict:
    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must end in .npz, got {args.out!r}")
    check_out(args.out, getattr(args, "overwrite", False))
    png = png_path(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = read_prompts(getattr(args, "prompt", None), getattr(args, "prompts", None))
    if prompts is not None and args.label is not None:
        raise ValueError("--label and --prompt are two kinds of condition: give one")
    per = parse_seeds(args.seeds, args.n if args.n is not None or args.seeds else (8 if prompts else None))
    size = None
    if getattr(args, "size", None) is not None:
        from ..models.packing import parse_size
        size = parse_size(args.size)
    seeds = per * len(prompts) if prompts else per  # the same seeds for every prompt: rows compare
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from ..networks.layers import use_tf32
    use_tf32(device)  # fp32 matmuls in TF32 on a GPU (training does the same)
    model = models.load(args.checkpoint, use_ema=not args.no_ema, device=device)
    if prompts is not None and model.spec.conditioning.get("kind") != "text":
        raise ValueError("--prompt / --prompts need a text-conditional model (trained with --text-encoder); this one "
                         "is " + ("class-conditional: use --label" if model.spec.num_classes else "unconditional"))
    if size is not None and "size" not in inspect.signature(model.sample).parameters:
        raise ValueError(f"--size: the {model.spec.family} family samples only at its trained size")
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
                               temperature=args.temperature, **({"size": size} if size is not None else {}),
                               **({"prompts": [p for p in prompts for _ in per]} if prompts else {}))
    arrays = {"x": x.numpy().astype(np.float32), "seeds": np.array(seeds)}
    if prompts:
        arrays["prompts"] = np.array([p for p in prompts for _ in per])  # unicode, loads without pickle
    if k:
        arrays["y"] = cond["y"].numpy()
    with atomic_path(args.out) as tmp:
        np.savez(tmp, **arrays)
    msg = f"wrote {len(seeds)} samples to {args.out}"
    if png:
        if x.ndim == 4:
            datasets.save_grid(x, png, **({"nrow": len(per)} if prompts else {}))  # one row per prompt
            msg += f" and the grid {png}"
        else:
            msg += " (no --png for non-image data)"
    print(msg)
    return {"npz": str(args.out), "grid": png}
