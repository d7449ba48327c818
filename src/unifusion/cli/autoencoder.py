"""`unifusion autoencoder train [CONFIG.yaml] [--key value ...]` and `unifusion autoencoder stats
--checkpoint RUN [--n 4096] [--out FOLDER]`: the training loop with --family autoencoder, then the
latent statistics measured with the EMA weights and written into <out>/model/spec.json."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import config as C
from . import EXIT_INTERRUPTED
from .train import resolve as train_resolve

# the defaults of `autoencoder train` over the config's: about 4 minutes on 2 CPU cores (f4, 32x32)
DEFAULTS = {"family": "autoencoder", "data": "shapes-32", "network": "ae-f4", "out": "runs/ae", "steps": 800,
            "batch_size": 32, "lr": 1e-3, "warmup_steps": 50, "ema_half_life": 5000.0, "checkpoint_every": 200,
            "sample_every": 200}
USAGE = ("unifusion autoencoder train [CONFIG.yaml] [--key value ...] | stats --checkpoint RUN [--n N] [--out DIR] "
         "[--overwrite]")


def resolve(tokens: list[str]) -> C.TrainConfig:
    """DEFAULTS <- YAML <- flags (cli.train.resolve)."""
    return train_resolve(tokens, DEFAULTS, "autoencoder train")


def run_autoencoder(what: str, tokens: list[str]) -> int:
    if what == "train":
        if any(t in ("-h", "--help") for t in tokens):
            print(f"usage: {USAGE}\n\nTrain a KL autoencoder (models/autoencoder.py); defaults over `unifusion train`'s: "
                  + " ".join(f"{C.flag(k)} {v}" for k, v in DEFAULTS.items()) + "\n\n" + C.help_text("autoencoder"))
            return 0
        return train(tokens)
    p = argparse.ArgumentParser(prog="unifusion autoencoder stats",
                                description="Measure an autoencoder's latent statistics (per-channel mean and std "
                                            "of the posterior means of n training images, EMA weights) and write "
                                            "them into a model folder's spec.json.")
    p.add_argument("--checkpoint", required=True, help="a model folder (updated in place), a finished run (its "
                                                       "model/), or a checkpoint / unfinished run")
    p.add_argument("--n", type=int, default=4096, help="training images measured")
    p.add_argument("--out", default=None, help="the model folder to write for a checkpoint (default "
                                               "<run>/model-step-NNNNNNNN); an existing one must hold these weights")
    p.add_argument("--overwrite", action="store_true", help="replace the model files in an --out that holds "
                                                            "another model or other weights")
    args = p.parse_args(tokens)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    stats(args.checkpoint, args.n, args.out, args.overwrite)
    return 0


def train(tokens: list[str]) -> int:
    from ..models.autoencoder import write_latent_statistics
    from ..training.loop import train as train_loop
    cfg = resolve(list(tokens))
    res = train_loop(cfg)
    if res["rank"] != 0:
        return EXIT_INTERRUPTED if res["interrupted"] else 0
    if res["interrupted"]:
        print(f"interrupted; checkpoint saved to {res['checkpoint']}. Continue with: "
              f"unifusion autoencoder train --out {cfg.out} --resume")
        return EXIT_INTERRUPTED
    _, latent = write_latent_statistics(res["model"])
    print(f"done. outputs in {res['out']}:\n  model:        {res['model']} (latent statistics of {latent['n']} "
          f"images: std {_fmt(latent['std'])}, scale {_fmt(latent['scale'])})\n  checkpoint:   {res['checkpoint']}"
          f"\n  previews:     {res['samples']} (training images above their reconstructions)"
          f"\n  loss curve:   {res['loss_curve']}\n  log:          {res['log']}"
          f"\nscore it with `unifusion eval --checkpoint {res['model']}`")
    return 0


def stats(path: str, n: int, out: str | None, overwrite: bool = False) -> Path:
    """Latent statistics into a model folder (see the parser's help); returns its spec.json."""
    from .. import models
    from ..models.autoencoder import _model_folder, write_latent_statistics
    from ..models.io import run_folder
    p = Path(path)
    folder = _model_folder(p) if out is None else None
    if out is None and folder is None:
        step = models.read(p)[3].get("step") or 0
        out = run_folder(p) / f"model-step-{int(step):08d}"
    spec_path, latent = write_latent_statistics(folder or p, out, n, overwrite=overwrite)
    print(f"latent statistics of {latent['n']} images (std {_fmt(latent['std'])}, shift {_fmt(latent['shift'])}, "
          f"scale {_fmt(latent['scale'])}) written to {spec_path}")
    return spec_path


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
