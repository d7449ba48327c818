"""Sample quality of the token mixers at equal training steps: a small DiT trained on `shapes` with softmax
attention, linear attention (ReLU, SANA's) and GAU (networks/attention.py), everything else equal, then
`unifusion eval` (FID / KID / precision / recall in the shipped shapes classifier's features against
held-out shapes-32-test images; attribute accuracy of the main object; dpmpp_2m at NFE 20, EMA weights).

The DiT: width 128, depth 4, 4 heads, patch 4 on 3x32x32 pixels (64 tokens), class-conditional EDM; each
mixer trains --steps steps of batch --batch with one thread (its CPU time is reported). At 64 tokens the
mixers cost about the same per step (benchmarks/attention_scaling.py: linear attention pays off from a few
hundred tokens); this measures what they cost in quality. Runs are kept in --keep and reused.

    python benchmarks/mixer_quality.py --keep runs/mixers              # 1,500 steps each
    python benchmarks/mixer_quality.py --keep /tmp/m --steps 20 --n 200 # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MIXERS = ("softmax", "linear", "gau")


def run(cmd: list[str], log: Path) -> float:
    """Run a CLI command with one thread (its output into `log`); its CPU time (children) in minutes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as f:
        subprocess.run([str(Path(sys.executable).parent / "unifusion"), *cmd], check=True, env=env, stdout=f,
                       stderr=f)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=1000, help="samples scored per model")
    ap.add_argument("--mixers", default=",".join(MIXERS))
    args = ap.parse_args(argv)
    from tables import table
    keep = Path(args.keep)
    keep.mkdir(parents=True, exist_ok=True)
    rows = []
    for mixer in args.mixers.split(","):
        out = keep / mixer
        done = out / "done.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        train = ["train", "--data", "shapes-32-train", "--network", "dit-s2", "--network.input_size", "32",
                 "--network.patch_size", "4", "--network.in_channels", "3", "--network.hidden_size", "128",
                 "--network.depth", "4", "--network.num_heads", "4", "--network.attention", mixer,
                 "--steps", str(args.steps), "--batch-size", str(args.batch), "--lr", "1e-3", "--warmup-steps", "100",
                 "--ema-half-life", "5000", "--sample-every", "0", "--checkpoint-every", str(args.steps),
                 "--threads", "1", "--out", str(out), "--overwrite"]
        minutes = run(train, keep / f"{mixer}.log")
        ev = keep / f"{mixer}-eval"
        eval_min = run(["eval", "--checkpoint", str(out), "--n", str(args.n), "--out", str(ev)], keep / f"{mixer}.log")
        scores = json.loads((ev / "eval.json").read_text())
        first = scores[0] if isinstance(scores, list) else scores.get("rows", [scores])[0]
        row = {"mixer": mixer, "train_min": minutes, "eval_min": eval_min,
               **{k: first.get(k) for k in ("fid", "kid", "precision", "recall", "accuracy", "attribute_accuracy")}}
        done.write_text(json.dumps(row))
        rows.append(row)
        print(f"  {mixer}: {row}", file=sys.stderr, flush=True)
    print(f"DiT width 128, depth 4, 4 heads, patch 4 (64 tokens), shapes-32, class-conditional EDM; {args.steps} "
          f"steps x batch {args.batch}, lr 1e-3; eval: {args.n} samples, dpmpp_2m NFE 20, EMA")
    print(table(rows, [("mixer", "mixer", 0), ("fid", "FID", 1), ("kid", "KID", 2), ("precision", "precision", 3),
                       ("recall", "recall", 3), ("accuracy", "accuracy", 3), ("train_min", "train CPU-min", 1),
                       ("eval_min", "eval CPU-min", 1)]))


if __name__ == "__main__":
    main()
