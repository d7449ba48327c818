"""CPU thread policy: train-step and sampling time of the default digits model with 1 and 2 (or
more) intra-op threads, on an idle machine and with one busy neighbour process
(`python -c 'while True: pass'`), each measurement in its own subprocess, alternating settings.

    .venv/bin/python benchmarks/threads.py [--threads 1,2] [--steps 60] [--repeats 2]

Prints a table of median ms per train step (batch 128, the default digits UNet) and ms per
sampling batch (64 samples, dpmpp_2m, NFE 20). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def child(threads: int, steps: int) -> dict:
    from pathlib import Path

    import torch

    from unifusion import config, models
    from unifusion.training import loop as L
    with tempfile.TemporaryDirectory() as d:
        cfg = config.from_dict({"steps": steps, "out": d, "checkpoint_every": steps, "sample_every": 0,
                                "log_every": 1, "threads": threads})
        L._preview = lambda *a, **k: None  # time the train steps only
        L.log_curve = lambda *a, **k: None
        L.train(cfg, progress=False)
        recs = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]
        step_s = statistics.median([b["time"] - a["time"] for a, b in zip(recs, recs[1:])][steps // 3:-1])
        model = models.load(Path(d) / "model")
    times = []
    with torch.no_grad():
        for i in range(4):
            t0 = time.perf_counter()
            model.sample(seeds=range(64 * i, 64 * i + 64), sampler="dpmpp_2m", nfe=20)
            times.append(time.perf_counter() - t0)
    return {"step_ms": step_s * 1e3, "sample_ms": statistics.median(times[1:]) * 1e3,
            "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", type=int, default=None)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps)))
        return
    counts = [int(t) for t in args.threads.split(",")]
    results: dict = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for _ in range(args.repeats):
                for t in counts:
                    out = subprocess.run([sys.executable, __file__, "--child", str(t), "--steps", str(args.steps)],
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                    results.setdefault((busy, t), []).append(json.loads(out))
        finally:
            if hog is not None:
                hog.kill()
    import os
    print(f"# digits UNet, batch 128 train step / 64-sample dpmpp_2m NFE 20 batch; {os.cpu_count()} cores; "
          f"median of {args.repeats} subprocess runs")
    print("| neighbour | threads | ms / train step | ms / sampling batch |")
    print("|---|---|---|---|")
    for (busy, t), rs in results.items():
        print(f"| {'one busy process' if busy else 'idle'} | {t} | "
              f"{statistics.median(r['step_ms'] for r in rs):.0f} | {statistics.median(r['sample_ms'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
