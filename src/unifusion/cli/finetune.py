"""`unifusion finetune --model RUN --reward R --method ddpo|grpo|draft [--key value ...]`: flags in,
training.finetune called."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from . import EXIT_INTERRUPTED

EXAMPLES = """built-in rewards (--reward NAME; options by --reward-args '{{key: value}}'):
{rewards}
  module:function    your own reward(x, cond) -> (B,) on decoded samples (options passed as keywords)

examples:
  unifusion finetune --model runs/digits --reward classifier --method grpo --steps 200 --out runs/ft-grpo
  unifusion finetune --model runs/digits --reward classifier --reward-args '{{target: 3}}' --method draft \\
      --draft-k 2 --lora-rank 4 --out runs/ft-three
  unifusion finetune --model runs/flow --reward compressibility --method ddpo --out runs/ft-jpeg
  unifusion finetune --model runs/gmm --reward quadratic --reward-args '{{center: [0.5, 0.0], scale: 0.5}}' \\
      --method grpo --kl-beta 0.5 --out runs/ft-toy
  unifusion finetune --out runs/ft-grpo --resume             # continue a stopped run
  unifusion sample --checkpoint runs/ft-grpo --n 64 --out s.npz --png s.png"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..rewards import describe
    from ..training.finetune import FinetuneConfig
    p.epilog = EXAMPLES.format(rewards=describe())
    groups = {}
    for f in fields(FinetuneConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default!r})"}
        if f.type == "bool":
            kw.update(nargs="?", const="true", metavar="true|false")
        groups[group].add_argument("--" + f.name.replace("_", "-"), **kw)


def run_finetune(args: argparse.Namespace) -> int:
    from ..training import run_dir
    from ..training.finetune import FinetuneConfig, finetune, resumed
    names = {f.name for f in fields(FinetuneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    cfg = FinetuneConfig.from_dict(given)
    if cfg.resume:
        stored = run_dir.stored_config(Path(cfg.out))
        if stored is None and not cfg.model:
            raise ValueError(f"--resume: {cfg.out} holds no fine-tuning run to continue; start one with --model and "
                             "--reward")
        cfg = resumed(stored, given) if stored is not None else cfg.validate()
    else:
        cfg.validate()
    res = finetune(cfg)
    if res["rank"] != 0:
        return EXIT_INTERRUPTED if res["interrupted"] else 0
    if res["interrupted"]:
        print(f"interrupted; checkpoint saved to {res['checkpoint']}. Continue with: "
              f"unifusion finetune --out {cfg.out} --resume")
        return EXIT_INTERRUPTED
    print(f"done. outputs in {res['out']}:\n  model:        {res['model']}\n  checkpoint:   {res['checkpoint']}"
          f"\n  reward curve: {res['reward_curve']}\n  log:          {res['log']}")
    return 0
