"""`unifusion encoder train [CONFIG.yaml] [--key value ...]`: the training loop with --family
text-image (a contrastive text-image encoder, models/textimage.py), then its zero-shot and
retrieval scores on held-out images."""
from __future__ import annotations

from .. import config as C
from . import EXIT_INTERRUPTED
from .train import resolve

# the defaults of `encoder train` over the config's: about 3 minutes on 2 CPU cores (32x32 shapes)
DEFAULTS = {"family": "text-image", "data": "shapes-t2i-32-train:20000", "out": "runs/text-encoder", "steps": 1200,
            "batch_size": 128, "lr": 1e-3, "warmup_steps": 100, "ema_half_life": 10000.0, "checkpoint_every": 400,
            "weight_decay": 0.05}
USAGE = "unifusion encoder train [CONFIG.yaml] [--key value ...]"


def run_encoder(what: str, tokens: list[str]) -> int:
    if any(t in ("-h", "--help") for t in tokens):
        print(f"usage: {USAGE}\n\nTrain a contrastive text-image encoder (models/textimage.py: --loss clip | siglip); "
              "its text tower conditions denoisers (unifusion train --text-encoder RUN). Defaults over `unifusion "
              "train`'s: " + " ".join(f"{C.flag(k)} {v}" for k, v in DEFAULTS.items()) + "\n\n"
              + C.help_text("text-image"))
        return 0
    from ..training.loop import train as train_loop
    cfg = resolve(list(tokens), DEFAULTS, "encoder train")
    res = train_loop(cfg)
    if res["rank"] != 0:
        return EXIT_INTERRUPTED if res["interrupted"] else 0
    if res["interrupted"]:
        print(f"interrupted; checkpoint saved to {res['checkpoint']}. Continue with: "
              f"unifusion encoder train --out {cfg.out} --resume")
        return EXIT_INTERRUPTED
    print(f"done. outputs in {res['out']}:\n  model:        {res['model']} (with tokenizer.json)\n  checkpoint:   "
          f"{res['checkpoint']}\n  loss curve:   {res['loss_curve']}\n  log:          {res['log']}"
          f"\nscore it with `unifusion eval --checkpoint {res['model']}` (zero-shot attributes, retrieval); "
          f"condition a model on it with `unifusion train --text-encoder {res['model']} ...`")
    return 0
