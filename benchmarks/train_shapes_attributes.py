"""Train the shapes attribute classifier (ShapesAttributeClassifier: the main object's shape, colour,
size; the second object's, or none; the count; the relation of object 0 to object 1, or none) that
scores GenEval-style prompt following (evaluation/geneval.py), print its held-out accuracy per head
on both shapes variants, and write the weights shipped with the package
(src/unifusion/networks/shapes_attributes.safetensors; metadata: the accuracies, the command, the date).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_shapes_attributes.py [--steps 2700] [--out PATH]

Every step draws fresh 32x32 images, half from the standard set (shapes-32-train) and half from the
t2i set. The t2i half is drawn *unrestricted* (draw stream 0 of the train indices, `scenes_t2i`), so
the evaluator has seen every attribute combination, HELD_OUT ones included, as GenEval's detector
has seen every COCO object: only the generator must not. Held-out accuracy: the first --test-n
images of shapes-32-test, shapes-64-test, shapes-t2i-32-test and shapes-t2i-64-test (disjoint
indices), and separately the t2i test images that contain a HELD_OUT combination.

Augmentation, so that imperfect samples are still read: horizontal flips (left of <-> right of),
Gaussian noise of a level uniform in [0, --noise-max] on a random half, and a blend (weight uniform
in [0, 0.5]) with a 3x3 box blur on another random half (decoded latents are soft; stronger blur
rounds off the corners of small squares). One CPU thread, about 8 CPU minutes; seeded.

Note on the standard set: in a 3-object image, objects 1 and 2 are drawn from the same sizes, so
which one the caption names second (the second-object heads and the relation) cannot be read off
the pixels; its accuracy on those heads is reported over all images and over images with <= 2
objects.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unifusion.data import shapes as S
from unifusion.networks.classifiers import ATTRIBUTE_HEADS, SHAPES_ATTRIBUTES_WEIGHTS, ShapesAttributeClassifier
from unifusion.safeio import save_safetensors


def targets(a: dict) -> dict[str, torch.Tensor]:
    """The label of each head from a shapes attribute dict: -1 ("none") -> the head's last class,
    count -> count - 1."""
    def none_last(v, head):
        return np.where(v < 0, ATTRIBUTE_HEADS[head] - 1, v)

    t = {"shape": a["shape"][:, 0], "colour": a["colour"][:, 0], "size": a["size"][:, 0],
         "shape2": none_last(a["shape"][:, 1], "shape2"), "colour2": none_last(a["colour"][:, 1], "colour2"),
         "size2": none_last(a["size"][:, 1], "size2"), "count": a["count"] - 1,
         "relation": none_last(a["relation"], "relation")}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).long() for k, v in t.items()}


def attributes_of(s: dict) -> dict:
    """The attribute arrays of raw scenes (what ShapesSource.attributes returns, less positions)."""
    return {"shape": s["shape"], "colour": s["colour"], "size": s["size"], "count": s["count"],
            "relation": S._relation(s)}


def draw(step: int, batch: int, seed: int) -> tuple[torch.Tensor, dict]:
    """A training batch at 32x32: half standard train images, half unrestricted t2i images, fresh
    global indices every step."""
    h = batch // 2
    idx = np.arange(step * h, (step + 1) * h)
    parts = [S.scenes(seed, idx), S.scenes_t2i(seed, idx)]
    x = torch.from_numpy(np.concatenate([S.render(s, 32) for s in parts]) * 2 - 1)
    a = [attributes_of(s) for s in parts]
    return x, {k: np.concatenate([p[k] for p in a]) for k in a[0]}


def augment(x: torch.Tensor, t: dict, g: torch.Generator, noise_max: float) -> tuple[torch.Tensor, dict]:
    """Horizontal flip of a random half (left of and right of swap); noise on a random half; a blend
    with a 3x3 box blur on a random half."""
    n = len(x)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    rel = t["relation"]
    t = dict(t, relation=torch.where(flip & (rel < 2), 1 - rel, rel))
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    alpha = 0.5 * torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = x + alpha * (soft - x)
    level = torch.rand(n, 1, 1, 1, generator=g) * noise_max * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1), t


@torch.no_grad()
def accuracies(net: ShapesAttributeClassifier, x: torch.Tensor, a: dict) -> dict[str, float]:
    """Accuracy per head, plus "colour+shape" (main object's both right) and "all" (every head right)."""
    pred = {k: v.argmax(1) for k, v in net.eval().logits(x).items()}
    t = targets(a)
    right = {k: pred[k] == t[k] for k in ATTRIBUTE_HEADS}
    right["colour+shape"] = right["shape"] & right["colour"]
    right["all"] = torch.stack([right[k] for k in ATTRIBUTE_HEADS]).all(0)
    return {k: round(float(v.float().mean()), 4) for k, v in right.items()}


def test_sets(n: int) -> dict[str, tuple[torch.Tensor, dict]]:
    """Held-out images: the first n of each variant's test split at 32 and 64, the t2i test
    images with a HELD_OUT combination, the standard ones with <= 2 objects."""
    out = {}
    for variant in ("t2i", "standard"):
        for r in (32, 64):
            src = S.ShapesSource(r, "test", n, variant=variant)
            out[f"{variant}-{r}"] = (src.images(range(n)), src.attributes(range(n)))
    x, a = out["t2i-32"]
    keep = np.nonzero(S.is_held_out(a))[0]
    out["t2i-32 held-out combinations"] = (x[keep], {k: v[keep] for k, v in a.items()})
    x, a = out["standard-32"]
    keep = np.nonzero(a["count"] <= 2)[0]
    out["standard-32 count<=2"] = (x[keep], {k: v[keep] for k, v in a.items()})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2700)
    ap.add_argument("--batch", type=int, default=64, help="32x32 images per step (half standard, half t2i)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (2e-3 stalls the shape heads)")
    ap.add_argument("--noise-max", type=float, default=0.2)
    ap.add_argument("--test-n", type=int, default=2000, help="held-out images per variant and resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=SHAPES_ATTRIBUTES_WEIGHTS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    kwargs = {"width": 32, "hidden": 192, "dropout": 0.1}
    net = ShapesAttributeClassifier(**kwargs)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    cpu0, wall0, running = time.process_time(), time.time(), None
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True, mininterval=10)
    for step in bar:
        net.train()
        x, a = draw(step, args.batch, args.seed)
        x, t = augment(x, targets(a), g, args.noise_max)
        out = net.logits(x)
        loss = sum(F.cross_entropy(out[k], t[k], label_smoothing=0.02) for k in ATTRIBUTE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        bar.set_postfix(loss=f"{running:.3f}")
    cpu_min, wall_min = (time.process_time() - cpu0) / 60, (time.time() - wall0) / 60

    tests = test_sets(args.test_n)
    acc = {name: accuracies(net, x, a) for name, (x, a) in tests.items()}
    cols = [*ATTRIBUTE_HEADS, "colour+shape", "all"]
    print(f"\nheld-out accuracy ({args.steps} steps x {args.batch} images, {cpu_min:.1f} CPU min, "
          f"{wall_min:.1f} min wall, {args.threads} thread(s))")
    print("| test images | n | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for name, row in acc.items():
        print(f"| {name} | {len(tests[name][0])} | " + " | ".join(f"{row[k]:.4f}" for k in cols) + " |")
    acc = {name: dict(row, n=len(tests[name][0])) for name, row in acc.items()}
    meta = {"test_accuracy": acc, "n_test": args.test_n, "test_splits": "shapes[-t2i]-R-test, first n_test",
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "noise_max": args.noise_max, "seed": args.seed,
            "train_images": args.steps * args.batch, "train_data": "half shapes-32-train, half unrestricted t2i "
            "(scenes_t2i stream 0 of the train indices)", "heads": ATTRIBUTE_HEADS, "kwargs": kwargs,
            "cpu_minutes": round(cpu_min, 2), "wall_minutes": round(wall_min, 2), "threads": args.threads,
            "command": " ".join(["benchmarks/train_shapes_attributes.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}
    net.eval()
    save_safetensors(net.state_dict(), args.out, metadata={"unifusion": json.dumps(meta, sort_keys=True)})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return acc


if __name__ == "__main__":
    main()
