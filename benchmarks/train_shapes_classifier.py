"""Train the small CNN whose penultimate layer is the feature space for FID/KID/precision-recall
on the procedural `shapes` data and whose heads score conditional samples (main object's shape,
colour, size; object count; class), print its held-out accuracies, and write the weights shipped
with the package (src/unifusion/networks/shapes_classifier.safetensors; metadata: accuracy per
head at 32 and 64, the command, the date).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_shapes_classifier.py [--steps 2200] [--out PATH]

Every step draws fresh 32x32 training images (the train split is as large as needed, no epochs).
The classifier box-resamples any input to 32x32 (see ShapesClassifier), so it is trained at 32
and tested at 32 and 64. Augmentation, so the features stay meaningful on imperfect samples: horizontal
flips (no label changes) and, on half of each batch, Gaussian noise of a level uniform in
[0, --noise-max]. Held-out accuracy: the first --test-n images of shapes-32-test and
shapes-64-test. Seeded; about 7 minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unifusion.data.shapes import ShapesSource
from unifusion.networks.classifiers import SHAPES_HEADS, SHAPES_WEIGHTS, ShapesClassifier
from unifusion.safeio import save_safetensors


def targets(source: ShapesSource, indices) -> dict[str, torch.Tensor]:
    """The label of each head for `indices`: the main object's shape, colour, size, the count
    (0-based) and the class."""
    a = source.attributes(indices)
    t = {"shape": a["shape"][:, 0], "colour": a["colour"][:, 0], "size": a["size"][:, 0],
         "count": a["count"] - 1, "class": a["y"]}
    return {k: torch.from_numpy(v) for k, v in t.items()}


def augment(x: torch.Tensor, g: torch.Generator, noise_max: float) -> torch.Tensor:
    """Horizontal flip of a random half; Gaussian noise (level uniform in [0, noise_max]) on
    another random half, clamped back to [-1, 1]."""
    n = len(x)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    level = torch.rand(n, 1, 1, 1, generator=g) * noise_max * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def accuracies(net: ShapesClassifier, source: ShapesSource, n: int, batch: int = 250) -> dict[str, float]:
    """Held-out accuracy per head on the first n images of `source`, plus "shape+colour" (both
    right: what `shapes_accuracy` counts)."""
    net.eval()
    right = {k: 0 for k in [*SHAPES_HEADS, "shape+colour"]}
    for s in range(0, n, batch):
        idx = range(s, min(s + batch, n))
        x, t = source.batch(idx)["x0"], targets(source, idx)
        pred = {k: v.argmax(1) for k, v in net.logits(x).items()}
        for k in SHAPES_HEADS:
            right[k] += int((pred[k] == t[k]).sum())
        right["shape+colour"] += int(((pred["shape"] == t["shape"]) & (pred["colour"] == t["colour"])).sum())
    return {k: v / n for k, v in right.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch", type=int, default=64, help="32x32 images per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (3e-3 stalls the shape head)")
    ap.add_argument("--noise-max", type=float, default=0.3)
    ap.add_argument("--test-n", type=int, default=2000, help="held-out images per resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=SHAPES_WEIGHTS)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n_train = args.steps * args.batch  # fresh indices every step
    train = ShapesSource(32, "train", n_train)
    net = ShapesClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    t0, seen, running = time.time(), 0, None
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        net.train()
        idx = range(step * args.batch, (step + 1) * args.batch)
        x, t = train.batch(idx)["x0"], targets(train, idx)
        out = net.logits(augment(x, g, args.noise_max))
        loss = sum(F.cross_entropy(out[k], t[k], label_smoothing=0.05) for k in SHAPES_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += args.batch
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        bar.set_postfix(loss=f"{running:.3f}")
    minutes = (time.time() - t0) / 60

    acc = {r: accuracies(net, ShapesSource(r, "test", args.test_n), args.test_n) for r in (32, 64)}
    heads = [*SHAPES_HEADS, "shape+colour"]
    print(f"\nheld-out accuracy (first {args.test_n} images of shapes-R-test; {seen} training images, "
          f"{args.steps} steps, {minutes:.1f} min)")
    print("| resolution | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for r in (32, 64):
        print(f"| {r}x{r} | " + " | ".join(f"{acc[r][k]:.4f}" for k in heads) + " |")
    meta = {"test_accuracy": {str(r): {k: round(v, 4) for k, v in acc[r].items()} for r in acc},
            "test_split": "shapes-R-test", "n_test": args.test_n, "train_images": seen, "steps": args.steps,
            "batch": args.batch, "train_resolution": 32, "seed": args.seed, "noise_max": args.noise_max,
            "feature_dim": ShapesClassifier.feature_dim, "heads": SHAPES_HEADS, "minutes": round(minutes, 2),
            "command": " ".join(["benchmarks/train_shapes_classifier.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}
    net.eval()
    save_safetensors(net.state_dict(), args.out, metadata={"unifusion": json.dumps(meta, sort_keys=True)})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return acc


if __name__ == "__main__":
    main()
