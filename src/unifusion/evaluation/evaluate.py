"""`unifusion eval`: sample a trained checkpoint and score the samples.

Per setting (sampler, NFE, grid, CFG scale) it draws N samples with seeds 0..N-1 (the same
noise for every setting, so rows differ only by the sampler) and reports

- FID, KID and k-NN precision/recall against the model's training data, in a feature space:
  the shipped digits CNN for 8x8 gray images, the shipped shapes CNN for the procedural `shapes`
  data, Inception-v3 when `--inception FILE` is given, else the raw values (2-D toys);
- class accuracy of the samples under the shipped digits classifier (conditional digits models),
  or, for conditional shapes models, the fraction whose main object the shapes classifier reads
  as the conditioned shape and colour;
- copy rate: the fraction of samples that are near-copies of a training image (pixel space);
- wall-clock sampling time.

Alongside, the held-out split (when the data has one) scored the same way as if it were a set
of samples: a reference point from real unseen data (at its own, often smaller, sample size, so
FID is biased upwards relative to the rows). `--nll N` adds the bits/dim of N held-out images
(uniform dequantization; see `nll`): through the PF-ODE with Hutchinson's divergence for the
denoiser families (diffusion, flow matching, cnf), exactly for the coupling flows. A coupling
flow samples in one inverse pass: its table has one row (sampler "inverse", NFE 1). An
autoencoder samples nothing: it gets PSNR, SSIM and rFID of its reconstructions of held-out
images instead (evaluation/reconstruction.py).

Reference features and statistics are cached as .npz next to the outputs.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import data as datasets
from .. import samplers
from ..likelihood import bits_per_dim, dequantize
from ..safeio import atomic_path, atomic_write
from . import features as fx
from . import metrics
from .level_search import is_search

DEFAULT_SAMPLERS = ("euler", "heun", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "lms")
DEFAULT_NFES = (5, 10, 20, 50)


# ------------------------------------------------------------------------------ reference
class RawFeatures:
    """Identity features: the flattened values (for low-dimensional data such as the 2-D toys)."""

    name = "raw"

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(x).flatten(1).float()


def feature_extractor(shape: tuple, inception: str | None = None, data_spec: str | None = None):
    """Inception-v3 from a user file, the shipped digits CNN for (1, 8, 8) images, the shipped
    shapes CNN for the `shapes` data (named by data_spec), else raw values."""
    if inception:
        return fx.InceptionV3Features.from_file(inception)
    if data_spec is not None and is_shapes(data_spec):
        return fx.shapes_features()
    if tuple(shape) == (1, 8, 8):
        return fx.digits_features()
    if len(shape) == 3 and math.prod(shape) > 64:
        raise ValueError(f"no built-in feature network for images of shape {tuple(shape)}: pass "
                         f"--inception FILE (Inception-v3 weights as safetensors) for FID on such data")
    return RawFeatures(math.prod(shape))


def is_shapes(data_spec: str) -> bool:
    """Whether `data_spec` names the procedural shapes data (see data.shapes)."""
    from ..data import shapes
    return shapes.parse(str(data_spec)) is not None


SHAPES_HELD_OUT = 2000  # held-out shapes images scored as the real-data row


def held_out_spec(data_spec: str, data_options: dict | None = None) -> tuple[str, dict] | None:
    """The dataset (spec, options) a model trained on `data_spec` has not seen, if there is one."""
    from ..data import shapes, toys
    if data_spec == "digits-train":
        return "digits-test", {}
    p = shapes.parse(data_spec)
    if p is not None and p["split"] == "train":  # the test split: a disjoint index range
        return shapes.name(p["variant"], p["resolution"], "test", SHAPES_HELD_OUT), dict(data_options or {})
    if data_spec in toys.TOYS:  # toys are sampled: another seed is fresh data
        return data_spec, {"n": 2000, "seed": 1_000_003}
    return None


@dataclass
class Reference:
    train: datasets.ArrayDataset     # what the model was trained on (copy-rate reference)
    feats: np.ndarray                # (N, D) features of train
    stats: metrics.Stats             # their mean and covariance
    held_out: datasets.ArrayDataset | None
    extractor: object
    stats_path: Path
    digits: bool = False             # the data is sklearn's digits: class accuracy is meaningful
    shapes: bool = False             # the data is the procedural shapes: shape-and-colour accuracy


def _fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()[:16]


REFERENCE_LIMIT = 50_000  # examples of a streamed source decoded for the reference statistics
SHAPES_REFERENCE_LIMIT = 10_000  # drawn shapes images for the statistics (the data set is unbounded)


def in_memory(source, limit: int = REFERENCE_LIMIT) -> datasets.ArrayDataset:
    """An in-memory ArrayDataset of a source (streamed sources: their first `limit` examples)."""
    if isinstance(source, datasets.ArrayDataset):
        return source
    x, y = source.arrays(limit)
    return datasets.ArrayDataset(x, y, source.num_classes or None, source.class_names, source=source.source)


def reference_data(data_spec: str, data_options: dict) -> tuple[datasets.ArrayDataset, datasets.ArrayDataset | None]:
    """(the training data, its held-out split or None), in memory, as `reference` scores against."""
    shapes = is_shapes(data_spec)
    train = in_memory(datasets.load(data_spec, **data_options), SHAPES_REFERENCE_LIMIT if shapes else REFERENCE_LIMIT)
    held = held_out_spec(data_spec, data_options)
    return train, (in_memory(datasets.load(held[0], **held[1])) if held else None)


def reference(data_spec: str, data_options: dict, extractor, cache_dir: Path, data=None) -> Reference:
    """Training data, its features and statistics; features and statistics are read from
    `cache_dir` when a cache written for the same data (by content hash) and extractor exists.
    data: reference_data(data_spec, data_options) when already loaded."""
    shapes = is_shapes(data_spec)
    train, held_out = data if data is not None else reference_data(data_spec, data_options)
    meta = {"data": data_spec, "n": len(train), "features": extractor.name, "sha1": _fingerprint(train.x)}
    stem = f"ref-{Path(data_spec).name or 'data'}-{extractor.name}"
    feats_path, stats_path = cache_dir / f"{stem}-features.npz", cache_dir / f"{stem}-stats.npz"
    feats = None
    if feats_path.is_file() and stats_path.is_file():
        with np.load(feats_path, allow_pickle=False) as f:
            if str(f["meta"]) == json.dumps(meta, sort_keys=True):
                feats = f["feats"].astype(np.float64)
    if feats is None:
        feats = fx.extract(extractor, train.x)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(feats_path) as tmp:
            np.savez(tmp, feats=feats.astype(np.float32), meta=np.array(json.dumps(meta, sort_keys=True)))
        metrics.cache_stats(stats_path, feats, meta)
    return Reference(train, feats, metrics.load_stats(stats_path), held_out, extractor, stats_path,
                     digits=data_spec.startswith("digits"), shapes=shapes)


# ------------------------------------------------------------------------------ scoring
@dataclass
class Row:
    sampler: str
    nfe: int
    grid: str
    cfg_scale: float
    n: int
    fid: float
    kid: float
    precision: float
    recall: float
    accuracy: float | None  # conditional digits and shapes only
    copy_rate: float
    seconds: float          # wall-clock time to draw the n samples (0 for real data)


def score(x: torch.Tensor, y: torch.Tensor | None, ref: Reference, label: dict) -> Row:
    """Scores of samples x (N, ...) in [-1, 1] (labels y when conditional) against `ref`."""
    f = fx.extract(ref.extractor, x)
    mu, cov = metrics.feature_stats(f)
    k = metrics.kid(f, ref.feats, subsets=50, subset_size=1000)
    pr = metrics.precision_recall(ref.feats, f, k=3)
    acc = None
    if y is not None and ref.digits and isinstance(ref.extractor, fx.DigitsFeatures):
        acc = fx.digits_accuracy(x, y, ref.extractor)
    elif y is not None and ref.shapes and isinstance(ref.extractor, fx.ShapesFeatures):
        acc = fx.shapes_accuracy(x, y, ref.extractor)
    return Row(n=len(x), fid=metrics.frechet_distance(mu, cov, ref.stats.mu, ref.stats.cov), kid=k.mean,
               precision=pr.precision, recall=pr.recall, accuracy=acc,
               copy_rate=metrics.copy_rate(x, ref.train.x).rate, **label)


def real_data_row(ref: Reference) -> Row | None:
    """The held-out split scored as if it were samples: real unseen data as a reference point."""
    if ref.held_out is None:
        return None
    return score(ref.held_out.x.clamp(-1, 1), ref.held_out.y if ref.held_out.num_classes else None, ref,
                 dict(sampler="held-out data", nfe=0, grid="-", cfg_scale=1.0, seconds=0.0))


def calibrated_grid(model, sampler: str, nfe: int, folder: Path | None):
    """The grid calibrated to this model for (sampler, nfe): stored in its spec, else the file
    `unifusion calibrate` wrote to <run>/calibration/; a clear error when there is none."""
    from ..samplers.calibrate import Calibration
    cal = model.spec.calibration(sampler, nfe)
    path = folder / calibration_file(sampler, nfe) if folder is not None else None
    if cal is None and path is not None and path.is_file():
        cal = Calibration.load(path)
    if cal is None:
        raise ValueError(f"no calibrated grid for {sampler} at NFE {nfe}"
                         + (f" in the spec or in {path}" if path else "") + "; make one with `unifusion calibrate "
                         f"--checkpoint RUN --sampler {sampler} --nfe {nfe}`")
    return cal


def calibration_file(sampler: str, nfe: int) -> str:
    return f"{sampler}-nfe{nfe}.json"


def evaluate(model, ref: Reference, sampler: str, nfe: int, n: int, grid: str | None = None, cfg_scale: float = 1.0,
             batch_size: int = 500, first_seed: int = 0, progress: bool = False, calibration_dir: Path | None = None,
             **options) -> Row:
    """One row: N samples (seeds first_seed.., the model's default conditions) drawn and scored.
    grid None: the model's default for (sampler, nfe), a grid stored in its spec for the pair
    (calibrated, or searched levels) else its own grid; "calibrated": the model's calibrated grid
    for (sampler, nfe) (see calibrated_grid); a Calibration or a tensor of sigmas as it is.
    options go to model.sample (sigma_min, sigma_max, sampler options)."""
    if model.one_pass:
        grid = None
    elif grid is None:
        own = {k: v for k, v in options.items() if k not in ("sigma_min", "sigma_max")}  # the sampler's options
        grid = model.stored_grid(sampler, nfe, options.get("sigma_min"), options.get("sigma_max"), own) \
            or model.spec.grid["name"]
    use = calibrated_grid(model, sampler, nfe, calibration_dir) if isinstance(grid, str) and grid == "calibrated" \
        else grid
    t0 = time.perf_counter()
    with torch.no_grad():
        x, cond = model.sample(seeds=range(first_seed, first_seed + n), sampler=sampler, nfe=nfe, grid=use,
                               cfg=cfg_scale, batch_size=batch_size, return_cond=True, progress=progress, **options)
    seconds = time.perf_counter() - t0
    y = cond["y"] if cond and "y" in cond else None
    shown = ("-" if model.one_pass else grid if isinstance(grid, str) else "searched" if is_search(grid)
             else "calibrated" if grid is not None else model.spec.grid["name"])
    shown = model.process.native_grid if shown == "native" else shown  # name the grid actually used
    return score(x, y, ref, dict(sampler=sampler, nfe=nfe, grid=shown, cfg_scale=cfg_scale, seconds=seconds))


# ------------------------------------------------------------------------------ likelihood
def nll(model, data: datasets.ArrayDataset, n: int, probes: int = 1, seed: int = 0, batch_size: int = 500) -> dict:
    """Negative log-likelihood of the first n examples of `data` through the model, in bits/dim.

    Discrete data with L levels is dequantized uniformly inside the bin centred on each level
    (likelihood.py states the one convention: -log2 P(x) <= -log2 p(x + (u - 1/2) delta) -
    log2 delta, delta = 2 / (L - 1); with L = 256 this is the usual CIFAR-10 bound). Continuous
    data gets -log2 p(x) / dim. Conditional models are scored unconditionally (the null label):
    log p(x). For the PF-ODE families the divergence is Hutchinson's estimator with `probes`
    Rademacher probes (64 dims make the exact trace 64 backward passes per call); RK45 at
    rtol = atol = 1e-5. Coupling flows give log p(x) exactly. "method" in the result says which:
    "exact" (change of variables, no probes) or "pf-ode".
    """
    if n < 1 or n > len(data):
        raise ValueError(f"--nll must be in 1..{len(data)} (the examples there are to score), got {n}")
    if probes < 1:
        raise ValueError(f"--probes must be >= 1, got {probes}")
    exact = bool(getattr(model, "one_pass", False))  # a coupling flow: its own exact log p(x), not a PF-ODE
    device = model.device
    x = data.x[:n].to(device)
    levels = datasets.levels(data)
    trained = getattr(getattr(model, "spec", None), "data", {}).get("levels")
    if trained and levels != trained:
        raise ValueError(f"the model was trained on data with {trained} levels but this data has "
                         f"{levels or 'continuous'} levels: score it on data quantized like its training data")
    g = torch.Generator(device=device).manual_seed(seed)
    dim = x[0].numel()
    out, nfe = [], 0
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].double()
        if levels:
            xb = dequantize(xb, levels, generator=g)
        lp, calls = model.log_likelihood(xb, divergence="hutchinson", probes=probes, generator=g, return_nfe=True)
        nfe = max(nfe, calls)
        out.append(bits_per_dim(lp, dim, levels) if levels else -lp / (dim * math.log(2)))
    bpd = torch.cat(out)
    return {"bits_per_dim": float(bpd.mean()), "stderr": float(bpd.std() / math.sqrt(len(bpd))), "n": len(bpd),
            "levels": levels, "nfe": nfe, "probes": None if exact else probes,
            "method": "exact" if exact else "pf-ode"}


# ------------------------------------------------------------------------------ output
ONE_PASS = "inverse"  # the sampler column of a coupling flow's row
COLUMNS = ("sampler", "nfe", "grid", "cfg_scale", "n", "fid", "kid", "precision", "recall", "accuracy",
           "copy_rate", "seconds")


def table(rows: list[Row]) -> str:
    """A markdown table of rows."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "0" if v == 0 else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))


def plot_sweep(rows: list[Row], path: Path, floor: Row | None = None) -> Path:
    """FID vs NFE at the first CFG scale: one colour per sampler, one line style per grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = rows[0].cfg_scale
    rows = [r for r in rows if r.cfg_scale == scale]
    colours = {s: plt.cm.tab10(i % 10) if i < 10 else plt.cm.Dark2(i % 8)
               for i, s in enumerate(dict.fromkeys(r.sampler for r in rows))}
    styles = {g: ["-", "--", ":", "-."][i % 4] for i, g in enumerate(dict.fromkeys(r.grid for r in rows))}
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    for s, g in dict.fromkeys((r.sampler, r.grid) for r in rows):
        pts = sorted((r.nfe, r.fid) for r in rows if (r.sampler, r.grid) == (s, g))
        ax.plot(*zip(*pts), marker="o", ms=4, color=colours[s], ls=styles[g],
                label=s + ("" if len(styles) == 1 else f" / {g}"))
    if floor is not None:
        ax.axhline(floor.fid, color="k", ls=":", lw=1, label=f"held-out data (n={floor.n})")
    nfes = sorted({r.nfe for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="NFE (denoiser calls)", ylabel=f"FID (n={rows[0].n})",
           title=f"FID vs NFE (cfg scale {scale:g})" + ("" if len(styles) == 1 else
                                                         ": " + ", ".join(f"{st} {g}" for g, st in styles.items())))
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(styles) // 3)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def plot_cfg(rows: list[Row], path: Path) -> Path:
    """Left: FID against classifier accuracy across CFG scales, one line per (sampler, NFE, grid).
    Right: precision, recall and accuracy against the scale (the fidelity / diversity trade)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    several_grids = len({r.grid for r in rows}) > 1
    for i, key in enumerate(dict.fromkeys((r.sampler, r.nfe, r.grid) for r in rows)):
        pts = sorted((r.cfg_scale, r.accuracy, r.fid, r.precision, r.recall) for r in rows
                     if (r.sampler, r.nfe, r.grid) == key)
        name = f"{key[0]}, NFE {key[1]}" + (f", {key[2]}" if several_grids else "")
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
        for w, a, f, *_ in pts:
            ax.annotate(f"w={w:g}", (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ws = [p[0] for p in pts]
        for j, what in ((3, "precision"), (4, "recall"), (1, "accuracy")):
            bx.plot(ws, [p[j] for p in pts], marker="o", color=f"C{j - 1}", ls=["-", "--", ":"][i % 3],
                    label=f"{what} ({name})")
    ax.set(xlabel="classifier accuracy of samples", ylabel="FID", title="FID vs accuracy across CFG scales w")
    bx.set(xlabel="guidance scale w (0: unconditional, 1: conditional)", ylabel="score",
           title="precision / recall / accuracy vs w")
    for a in (ax, bx):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def ema_sweep(args, model, ref, sampler: str, nfe: int, grid) -> list[tuple[float, Row]]:
    """One row per post-hoc EMA std (training/ema.py reconstructs the weights)."""
    from ..training import ema as E
    from ..training.ema import model_with, parse_stds, snapshots_of
    _, snaps = snapshots_of(args.checkpoint)
    stds = parse_stds(args.ema_sweep, "--ema-sweep")
    made = [(std, E.reconstruct(snaps, std)[0]) for std in stds]  # every std fits, or nothing is scored
    rows = []
    for std, weights in made:
        m = model_with(args.checkpoint, weights).to(model.device)
        r = evaluate(m, ref, sampler, nfe, args.n, grid, 1.0, args.batch_size)
        r.sampler = f"{r.sampler} (post-hoc ema {std:.3f})"
        rows.append((std, r))
    return rows


def plot_ema_sweep(points: list[tuple[float, Row]], fixed: Row, path: Path) -> Path:
    """FID against the post-hoc EMA's relative std, with the trained (fixed half-life) EMA as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p[0] for p in points], [p[1].fid for p in points], "o-", label="post-hoc EMA")
    ax.axhline(fixed.fid, color="gray", ls="--", label="EMA used in training (fixed half-life)")
    ax.set_xlabel("relative std of the EMA profile")
    ax.set_ylabel(f"FID ({fixed.sampler}, NFE {fixed.nfe}, n={fixed.n})")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ CLI
def _items(text: str, what: str, cast=float) -> list:
    try:
        vals = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: cannot read {text!r}; give a comma-separated list, e.g. 5,10,20") from None
    if not vals:
        raise ValueError(f"{what}: empty list")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its latest)")
    p.add_argument("--sampler", default=None, help="sampler of the single evaluation (default: the model's own, "
                                                   "recorded when it was trained (dpmpp_2m for older models), or a "
                                                   "few-step student's, e.g. euler or consistency)")
    p.add_argument("--nfe", type=int, default=None, help="denoiser-call budget of the single evaluation (default: the "
                                                         "model's own: 20, or a few-step student's K)")
    p.add_argument("--grid", default=None, help="sigma grid(s), e.g. karras or karras,tuned,calibrated (default: the "
                                                "model's own, usually native; calibrated: from `unifusion calibrate`)")
    p.add_argument("--sigma-min", type=float, default=None, help="lowest noise level (default: the model's own)")
    p.add_argument("--sigma-max", type=float, default=None,
                   help="starting noise level (default: the model's own; inf starts from pure noise)")
    p.add_argument("--ema-sweep", default=None, metavar="STDS",
                   help="post-hoc EMA: also score EMAs of these relative stds reconstructed from the run's snapshots "
                        "(training with --posthoc-every), e.g. 0.02,0.05,0.1,0.15,0.2; plots FID against the std")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the starting noise (1: the model's own)")
    p.add_argument("--sweep", action="store_true", help="every sampler in --samplers x every NFE in --nfes")
    p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS), help="samplers of the sweep")
    p.add_argument("--nfes", default=",".join(map(str, DEFAULT_NFES)), help="NFE budgets of the sweep")
    p.add_argument("--cfg-scales", default="1", help="classifier-free guidance scales, e.g. 1,1.5,2,3 (1 = conditional)")
    p.add_argument("--n", type=int, default=1500, help="samples per setting")
    p.add_argument("--geneval", type=int, default=25, metavar="N",
                   help="text-conditional shapes models: GenEval-style prompts per task, seen and held-out combinations")
    p.add_argument("--nll", type=int, default=0, metavar="N", help="also the bits/dim of N held-out examples (PF-ODE; exact for coupling flows)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes for --nll (PF-ODE families)")
    p.add_argument("--inception", default=None, help="Inception-v3 weights (.safetensors) for FID on other images")
    p.add_argument("--batch-size", type=int, default=500, help="samples per batch")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--search-levels", action="store_true",
                   help="few-step sampling (euler, consistency; NFE >= 2): pick the levels between the first and 0 "
                        "one at a time by FID on --n samples of seeds 1,000,000.. (the CM paper's greedy search; "
                        "evaluation/level_search.py), store them in the model folder's spec as its default grid "
                        "for that sampler and NFE, and score them against the model's own grid on seeds 0..n-1")
    p.add_argument("--search-range", default=None, metavar="LOW,HIGH",
                   help="--search-levels: the candidate sigmas (default: the model's sigma_min to its sigma_max, "
                        "or 100 below a first level inf)")


def check_search(args, model, sampler: str, nfe: int) -> tuple:
    """--search-levels' one-line refusals before anything is sampled; (low, high, model folder)."""
    from . import level_search
    if args.sweep or args.grid or args.ema_sweep:
        raise ValueError("--search-levels scores one sampler and NFE against the model's own grid: drop "
                         + ", ".join(f for f, v in (("--sweep", args.sweep), ("--grid", args.grid),
                                                    ("--ema-sweep", args.ema_sweep)) if v))
    if model.spec.conditioning.get("kind") == "text":
        raise ValueError("--search-levels scores FID of class-conditional or unconditional samples; this model is "
                         "text-conditional")
    level_search.check_model(model, sampler, nfe)
    low = high = None
    if args.search_range:
        vals = _items(args.search_range, "--search-range")
        if len(vals) != 2 or not 0 < vals[0] < vals[1] or not math.isfinite(vals[1]):
            raise ValueError(f"--search-range must be LOW,HIGH with 0 < LOW < HIGH < inf, got {args.search_range!r}")
        low, high = vals
    return low, high, level_search.model_folder(args.checkpoint)


def run_dir(checkpoint) -> Path:
    """The run folder a checkpoint path belongs to (models.io.run_folder)."""
    from ..models.io import run_folder
    return run_folder(checkpoint)


def run(args) -> dict:
    from .. import models
    from tqdm.auto import tqdm
    if args.n < 4:
        raise ValueError(f"--n must be >= 4 (precision/recall use 3 nearest neighbours), got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.nll < 0:
        raise ValueError(f"--nll must be >= 0 (how many held-out examples to score; 0: none), got {args.nll}")
    if args.probes < 1:
        raise ValueError(f"--probes must be >= 1, got {args.probes}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.load(args.checkpoint, use_ema=not args.no_ema, device=device)
    if getattr(args, "search_levels", False) and model.scores in ("retrieval", "reconstructions"):
        raise ValueError(f"a {model.spec.family} model has no noise levels to search: give a diffusion or flow model "
                         "or a few-step student")
    if model.scores == "retrieval":  # a text-image encoder: retrieval and zero-shot attributes
        from .textimage import run_retrieval
        return run_retrieval(args, model)
    if model.scores == "reconstructions":  # an autoencoder samples nothing: PSNR, SSIM and rFID of reconstructions
        from .reconstruction import run_reconstruction
        return run_reconstruction(args, model)
    spec, nc = model.spec, model.spec.num_classes
    out = Path(args.out) if args.out else run_dir(args.checkpoint) / "eval"
    scales = _items(args.cfg_scales, "--cfg-scales")
    text = spec.conditioning.get("kind") == "text"
    if any(s != 1 for s in scales) and not nc and not text:
        raise ValueError("--cfg-scales other than 1 need a conditional model; this one is unconditional")
    if model.one_pass:  # a coupling flow: one inverse pass, no sampler / NFE / grid to sweep
        names, nfes, grid_names = [ONE_PASS], [1], ["-"]
    elif args.sweep:
        names, nfes = _items(args.samplers, "--samplers", str), _items(args.nfes, "--nfes", int)
    else:  # the model's own sampler and NFE unless named (spec.sampling_defaults())
        own = spec.sampling_defaults()
        names, nfes = [args.sampler or own[0]], [args.nfe if args.nfe is not None else own[1]]
    if not model.one_pass:  # None: the model's default for the pair (a stored grid, else its own)
        grid_names = _items(args.grid, "--grid", str) if args.grid else [None]
        valid_grids = sorted(samplers.grids.GRIDS) + ["native", "calibrated"]
        unknown_grids = [g for g in grid_names if g is not None and g not in valid_grids]
        if unknown_grids:
            raise ValueError(f"unknown grid(s) {unknown_grids}; choose from {valid_grids}")
        unknown = [s for s in names if s not in samplers.names()]
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; choose from {samplers.names()}")
    if min(nfes) < 1:
        raise ValueError(f"--nfe must be >= 1, got {min(nfes)}")
    search = getattr(args, "search_levels", False)
    if getattr(args, "search_range", None) and not search:
        raise ValueError("--search-range is for --search-levels")
    if search:
        search = check_search(args, model, names[0], nfes[0])
    source = spec.data.get("source")
    if not source:
        raise ValueError("the model's spec does not name its training data (spec.data.source), so there is "
                         "nothing to score against")
    if args.nll and spec.data.get("kind") == "latent":
        raise ValueError("--nll of a latent model would be the density of its latents, not of images (the "
                         "decoder has no tractable likelihood); evaluate it without --nll")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for eval.csv and eval.json")
    # a latent model's samples are decoded images: scored like images against its image data
    shape = tuple(spec.data["image_shape"]) if spec.data.get("kind") == "latent" else spec.shape
    data = reference_data(source, spec.data.get("options", {}))
    if args.nll:  # checked before anything is sampled or written
        scored = data[1] if data[1] is not None else data[0]
        if args.nll > len(scored):
            which = "held-out" if data[1] is not None else "training"
            raise ValueError(f"--nll {args.nll} is more than the {len(scored)} {which} examples there are to score; "
                             f"pass --nll {len(scored)} or fewer")
    extractor = feature_extractor(shape, args.inception, source)
    out.mkdir(parents=True, exist_ok=True)
    ref = reference(source, spec.data.get("options", {}), extractor, out, data=data)
    where = model.info.get("where")
    step = model.info.get("step")
    note = ("" if ref.digits or not isinstance(ref.extractor, fx.DigitsFeatures) else
            "; NOTE: the data is not sklearn's digits, so the digits feature network is only a proxy and no "
            "class accuracy is reported")
    kind = (f"{spec.family}, {(spec.network or {}).get('class', '-')}" if model.one_pass else
            f"{spec.family}, {spec.process['name']}/{spec.parametrization['name']}")
    print(f"model: {where} (step {step}, {kind}, "
          f"{model.info['weights']} weights); reference: {source} ({len(ref.train)} examples), "
          f"features: {ref.extractor.name}; statistics cached in {ref.stats_path}{note}")
    if text:  # prompts: prompt following (GenEval-style), FID from held-out captions, image-text score
        from .text2image import run_text
        if grid_names[0] == "calibrated":
            raise ValueError("--grid calibrated is not supported for a text-conditional model's scores; name the "
                             "grid (e.g. tuned, karras) or use the model's own")
        if len(grid_names) > 1 or len(names) > 1 or len(nfes) > 1:
            raise ValueError("a text-conditional model is scored at one sampler, NFE and --grid (and any "
                             "--cfg-scales); drop --sweep / give one --grid")
        return run_text(args, model, ref, out, scales, names[0], nfes[0], grid=grid_names[0] or spec.grid["name"])
    floor = real_data_row(ref)
    if search:  # the levels picked on seeds 1,000,000.., stored, then both grids scored on seeds 0..n-1
        from . import level_search
        print(f"searching the levels of {names[0]} at NFE {nfes[0]} by FID on {args.n} samples of seeds "
              f"{level_search.SEARCH_SEED}..")
        cal = level_search.search_levels(model, nfes[0], ref=ref, sampler=names[0], n=args.n, low=search[0],
                                         high=search[1], batch_size=args.batch_size, progress=True)
        print(level_search.summary(cal))
        spec_path = level_search.store(search[2], cal)
        print(f"stored in {spec_path}: the default grid of {names[0]} at NFE {nfes[0]} when that model folder "
              f"is sampled or evaluated" + ("" if search[2] == Path(args.checkpoint) else
                                          f" (--checkpoint {search[2]}; the run's checkpoints keep their own spec)"))
        atomic_write(out / "level_search.json", json.dumps(cal.to_dict(), indent=1))
        grid_names = [spec.grid["name"], cal]
    settings = [(s, k, g, w) for w in scales for g in grid_names for s in names for k in nfes]
    rows = []
    for s, k, g, w in tqdm(settings, desc="eval", disable=len(settings) < 2):
        rows.append(evaluate(model, ref, s, k, args.n, g, w, args.batch_size, progress=len(settings) < 2,
                             calibration_dir=run_dir(args.checkpoint) / "calibration",
                             sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                             **({"temperature": args.temperature} if args.temperature != 1 else {})))
    sweep = []
    if args.ema_sweep:
        sweep = ema_sweep(args, model, ref, names[0], nfes[0], grid_names[0] if not model.one_pass else None)
        result_plot = plot_ema_sweep(sweep, rows[0], out / "ema_sweep.png")
    shown = rows + [r for _, r in sweep] + ([floor] if floor else [])
    print(table(shown))
    if floor:
        print(f"(the held-out row scores {floor.n} real held-out images as if they were samples: FID is biased "
              f"upwards at small n, so compare rows at equal n)")
    write_csv(shown, out / "eval.csv")
    result = {"checkpoint": str(args.checkpoint), "step": step, "reference": source,
              "features": ref.extractor.name, "rows": [dataclasses.asdict(r) for r in shown]}
    if sweep:
        result["ema_sweep"] = {"plot": str(result_plot), "fixed_ema_fid": rows[0].fid,
                               "points": [{"std": std, "fid": r.fid} for std, r in sweep]}
        best = min(sweep, key=lambda p: p[1].fid)
        print(f"post-hoc EMA: best std {best[0]:.3f} (FID {best[1].fid:.3f}) vs the trained EMA's FID "
              f"{rows[0].fid:.3f}; plot {result_plot}")
    if args.sweep and len(nfes) > 1:
        result["plot"] = str(plot_sweep(rows, out / "sweep.png", floor))
    if nc and len(scales) > 1 and rows[0].accuracy is not None:
        result["cfg_plot"] = str(plot_cfg(rows, out / "cfg.png"))
    if args.nll:
        data = ref.held_out if ref.held_out is not None else ref.train
        which = "held-out" if ref.held_out is not None else "training (no held-out split known)"
        r = nll(model, data, args.nll, args.probes, batch_size=args.batch_size)
        result["nll"] = {**r, "data": which}
        how = f"uniform dequantization, {r['levels']} levels" if r["levels"] else "continuous data"
        method = ("exact log-likelihood (change of variables)" if r["method"] == "exact" else
                  f"PF-ODE, Hutchinson with {r['probes']} probe(s), {r['nfe']} ODE function evaluations")
        print(f"NLL: {r['bits_per_dim']:.3f} +- {r['stderr']:.3f} bits/dim on {r['n']} {which} examples "
              f"({how}, {method})")
    atomic_write(out / "eval.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'eval.csv'} and {out / 'eval.json'}"
          + "".join(f" and {result[k]}" for k in ("plot", "cfg_plot") if k in result))
    return result
