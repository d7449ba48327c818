"""Train-step time of unifusion's trainer vs a bare PyTorch loop on the same network and batch,
and peak memory with and without gradient checkpointing. Each measurement runs in its own
subprocess (fresh allocator, clean peak RSS), alternating ours / bare, median of the repeats.

    .venv/bin/python benchmarks/train_step.py [--network unet-digits] [--steps 150] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def bare(network: str, steps: int, batch: int, grad_ckpt: bool, threads: int) -> float:
    """EDM-preconditioned denoising loss, forward/backward/AdamW: nothing else."""
    import torch
    torch.set_num_threads(threads)

    from unifusion import data, networks
    torch.manual_seed(0)
    ds = data.load("digits")
    kw = {"gradient_checkpointing": True} if grad_ckpt else {}
    net = networks.build(network, **kw)
    table = torch.nn.Embedding(11, net.emb_dim)  # the class embedding the model layer adds
    opt = torch.optim.AdamW([*net.parameters(), *table.parameters()], lr=1e-3)
    sd = 0.5
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(ds), (batch,))
        x0, y = ds.x[idx], ds.y[idx]
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch))
        s = sigma[:, None, None, None]
        x = x0 + s * torch.randn_like(x0)
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), (s**2 + sd**2).rsqrt()
        D = c_skip * x + c_out * net(c_in * x, sigma.log() / 4, emb=table(y))
        loss = ((s**2 + sd**2) / (s * sd) ** 2 * (D - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[steps // 3:])


LOG_EVERY = 10  # the trainer reads its device-side loss and counters at log steps only


def ours(network: str, steps: int, batch: int, grad_ckpt: bool, threads: int) -> float:
    """The real trainer (fused AdamW, foreach EMA, seeded draws, on-device finite check and skip, a log
    line every LOG_EVERY steps) with no checkpoint or sampling inside the timed window: the per-step time
    from its JSONL log. (The bare loop keeps the default AdamW, as a plain script would.)"""
    from pathlib import Path

    from unifusion import config
    from unifusion.training.loop import train
    with tempfile.TemporaryDirectory() as d:
        cfg = config.from_dict({"network": network, "steps": steps, "batch_size": batch, "out": d,
                                "checkpoint_every": steps, "sample_every": 0, "sample_nfe": 1, "log_every": LOG_EVERY,
                                "grad_checkpointing": grad_ckpt, "grad_clip": 0.0, "threads": threads})
        import unifusion.training.loop as L
        L._preview = lambda *a, **k: Path(d) / "none.png"  # the final sample grid is not a train step
        L.log_curve = lambda *a, **k: Path(d) / "none.png"
        train(cfg, progress=False)
        recs = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]
    dt = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(recs, recs[1:])]
    return statistics.median(dt[len(dt) // 3:-1])  # the last interval saves


def child(args):
    fn = ours if args.which == "ours" else bare
    t = fn(args.network, args.steps, args.batch, args.grad_ckpt, args.threads)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": t, "peak_mib": peak}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--network", default="unet-digits")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--which", choices=["ours", "bare"])
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on both sides (1: the trainer's "
                                                           "default on <= 4 cores)")
    args = p.parse_args()
    if args.which:
        return child(args)
    import torch
    print(f"# train step, {args.network}, batch {args.batch}, digits 8x8, torch {torch.__version__}, "
          f"{args.threads} thread(s) on both sides; median step time over the last 2/3 of {args.steps} steps, "
          f"median of {args.repeats} alternating subprocess runs")
    rows = {}
    for ckpt in (False, True):
        for _ in range(args.repeats):
            for which in ("ours", "bare"):
                cmd = [sys.executable, __file__, "--which", which, "--network", args.network, "--steps",
                       str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)] + \
                    (["--grad-ckpt"] if ckpt else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rows.setdefault((which, ckpt), []).append(json.loads(out))
    print(f"{'loop':6s} {'grad ckpt':>9s} {'ms/step':>8s} {'images/s':>9s} {'peak RSS MiB':>13s}")
    for (which, ckpt), rs in rows.items():
        t = statistics.median(r["step_s"] for r in rs)
        m = statistics.median(r["peak_mib"] for r in rs)
        print(f"{which:6s} {str(ckpt):>9s} {t * 1e3:8.1f} {args.batch / t:9.0f} {m:13.0f}")
    for ckpt in (False, True):
        o = statistics.median(r["step_s"] for r in rows["ours", ckpt])
        b = statistics.median(r["step_s"] for r in rows["bare", ckpt])
        print(f"ratio ours / bare (grad ckpt {ckpt}): {o / b:.3f}")


if __name__ == "__main__":
    main()
