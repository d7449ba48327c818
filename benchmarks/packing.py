"""Packed variable-size batches against padding to the largest size and resolution buckets: training
throughput of a DiT on a mixed-resolution distribution (models/packing.py, networks/packing.py).

The distribution: 4-channel latents of h x w with h, w uniform in {8, 16, 24, 32} (16 sizes, aspect ratios
1:4 to 4:1), a DiT at patch 2, so token grids 4x4 to 16x16 (16 to 256 tokens, 100 on average): padding to
the largest (256 tokens) spends about 60% of the tokens on padding. Every strategy trains on the same
images with the same draws (sigma, noise) and computes the same per-image losses (printed: the largest
difference from the packed loss), so the gradient of every step, and hence the sample quality reached per
step, is the same; only the cost differs:

    packed-<backend>  all images of the step in one sequence, block-diagonal attention (networks.packing:
                      grouped | nested | dense | flex); no padding (dense: its masked cross-image scores)
    padded            each image zero-padded to 32x32, one (B, 256) batch, padding keys masked
                      (scaled_dot_product_attention with a boolean mask: what fixed-shape trainers do)
    buckets           the images grouped by size, one plain batch per size (no mask, no padding); with
                      bucketed training a step is one of these batches

Measured per strategy, each in its own process with one thread: the network's forward + backward per step
(process CPU time; on CUDA wall time after synchronize), tokens/s (real image tokens over that time), the
fraction of the matmul FLOPs spent on padding (counted from the shapes: per layer 2 D (3D + D + 8D) per
token for qkv, proj and the MLP, and 4 D per query-key pair of attention; 1 - the per-image FLOPs / the
strategy's; torch's flop counter does not see the CPU attention kernels), and the peak memory (CPU: peak
RSS increase over the steps; CUDA: max_memory_allocated).

    python benchmarks/packing.py                                   # CPU, 6 steps of 32 images
    python benchmarks/packing.py --steps 2 --batch 8               # smoke
    python benchmarks/packing.py --forward-only --backends grouped,nested,dense,flex   # inference, flex too
    python benchmarks/packing.py --device cuda --backends flex,varlen,grouped,nested,dense   # a GPU session
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = (8, 16, 24, 32)


def make_model(args):
    import torch

    from unifusion import models, networks
    from unifusion.models.spec import ModelSpec
    torch.manual_seed(0)
    spec = ModelSpec(family="diffusion", network=networks.describe(
        "dit-s2", input_size=32, patch_size=2, in_channels=4, hidden_size=args.width, depth=args.depth,
        num_heads=args.heads), data={"kind": "pixel", "shape": [4, 32, 32], "range": None},
        training={"packing": {"tokens": 10**9}}).validate()
    return models.build(spec).to(args.device)


def step_data(args, step: int):
    """The images and draws of step `step`: (x0 carrier (B, 4, 32, 32), sizes (B, 2), sigma, noise)."""
    import torch
    g = torch.Generator().manual_seed(1000 + step)
    sides = torch.tensor(SIDES)
    sizes = torch.stack([sides[torch.randint(4, (args.batch,), generator=g)],
                         sides[torch.randint(4, (args.batch,), generator=g)]], 1)
    x0 = torch.zeros(args.batch, 4, 32, 32)
    for i, (h, w) in enumerate(sizes.tolist()):
        x0[i, :, :h, :w] = torch.randn(4, h, w, generator=g) * 0.5
    sigma = (torch.randn(args.batch, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(args.batch, 4, 32, 32, generator=g)
    return x0, sizes, sigma, noise


def losses_of(model, strategy: str, x0, sizes, sigma, noise):
    """(B,) per-image losses of one strategy (the same numbers for all of them)."""
    import torch

    from unifusion import parametrizations
    from unifusion.networks import packing as P
    if strategy.startswith("packed"):
        P.set_backend(strategy.split("-", 1)[1])
        return model.loss({"x0": x0, "size": sizes, "weight": torch.ones(len(x0)), "sigma": sigma, "noise": noise})
    if strategy == "padded":
        mask = torch.zeros(len(x0), 16, 16, dtype=torch.bool, device=x0.device)
        for i, (h, w) in enumerate(sizes.tolist()):
            mask[i, :h // 2, :w // 2] = True
        x = x0 + sigma[:, None, None, None] * noise
        D = parametrizations.denoise(model.net, model.process, model.param, x, sigma, token_mask=mask)
        pix = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].to(x0.dtype)  # (B, 1, 32, 32)
        err = ((D - x0) ** 2 * pix).flatten(1).sum(1) / (pix.flatten(1).sum(1) * x0.shape[1])
        return model.weight(sigma) * err
    out = torch.zeros(len(x0), device=x0.device)  # buckets: one plain batch per size
    for hw in torch.unique(sizes, dim=0).tolist():
        idx = ((sizes[:, 0] == hw[0]) & (sizes[:, 1] == hw[1])).nonzero()[:, 0]
        h, w = hw
        out = out.index_put((idx.to(x0.device),), model.loss({"x0": x0[idx, :, :h, :w], "sigma": sigma[idx],
                                                              "noise": noise[idx, :, :h, :w]}))
    return out


def child(strategy: str, args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = make_model(args)
    data = [tuple(t.to(dev) for t in step_data(args, s)) for s in range(args.steps)]
    tokens = sum(int((s[1] // 2).prod(1).sum()) for s in data)

    from contextlib import nullcontext
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def one(d):
        if args.forward_only:  # inference: the flex backend has no CPU backward
            with torch.no_grad(), amp:
                return losses_of(model, strategy, *d).float()
        with amp:
            loss = losses_of(model, strategy, *d).float()
        loss.mean().backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    one(data[0])  # warm-up (and, on CUDA, compilation)
    from unifusion.networks import packing as P
    ref_losses = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = 0.0
    else:
        before = _rss()[0]
        Path("/proc/self/clear_refs").write_text("5")
    elapsed = 0.0
    for d in data:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            t = time.perf_counter()
            ref_losses.append(one(d).cpu())
            torch.cuda.synchronize()
            elapsed += time.perf_counter() - t
        else:
            t = time.process_time()
            ref_losses.append(one(d))
            elapsed += time.process_time() - t
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _rss()[1] - before)
    P.set_backend("auto")
    return {"strategy": strategy, "seconds": elapsed / args.steps, "tokens_per_s": tokens / elapsed,
            "peak_mib": peak, "losses": torch.cat(ref_losses).tolist()}


def flops(strategy: str, sizes, D: int) -> float:
    """Matmul FLOPs of one layer's forward for these images (module docstring)."""
    n = (sizes // 2).prod(1).double()  # tokens per image
    lin, pair = 2 * D * 12 * D, 4 * D
    if strategy == "padded":
        return float(len(n) * (lin * 256 + pair * 256 ** 2))
    if strategy == "packed-dense":
        return float(lin * n.sum() + pair * n.sum() ** 2)
    return float(lin * n.sum() + pair * (n ** 2).sum())


def _rss():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default="grouped,nested,dense", help="packed attention backends to compare")
    ap.add_argument("--forward-only", action="store_true", help="time the forward pass alone (no gradients)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (flash varlen "
                                                                                  "needs half precision)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    from tables import table
    strategies = [f"packed-{b}" for b in args.backends.split(",")] + ["padded", "buckets"]
    rows = []
    if not strategies:
        raise SystemExit("nothing to run")
    for s in strategies:
        cmd = [sys.executable, __file__, "--child", s] + [f"--{k}={getattr(args, k)}" for k in
                                                          ("steps", "batch", "width", "depth", "heads", "device",
                                                           "threads", "precision")] + (["--forward-only"] if args.forward_only else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            print(f"{s}: failed: {out.stderr.strip()[-400:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {s}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    import torch
    if not rows:
        raise SystemExit("every strategy failed")
    ref = {r["strategy"]: r for r in rows}
    packed = rows[0]
    padded = ref.get("padded")
    sizes = [step_data(args, s)[1] for s in range(args.steps)]
    for r in rows:
        useful = sum(flops("buckets", s, args.width) for s in sizes)
        r["pad_flops"] = 1 - useful / sum(flops(r["strategy"], s, args.width) for s in sizes)
        r["vs_padded"] = r["tokens_per_s"] / padded["tokens_per_s"] if padded else None
        r["loss_diff"] = f"{float((torch.tensor(r['losses']) - torch.tensor(packed['losses'])).abs().max()):.1e}"
    real = sum(int((s // 2).prod(1).sum()) for s in sizes)
    print(f"{'forward only' if args.forward_only else 'forward + backward'}: "
          f"DiT width {args.width}, depth {args.depth}, {args.heads} heads, patch 2; {args.steps} steps of {args.batch} "
          f"latents h, w in {SIDES}; {args.device} {args.precision}, {args.threads} thread(s); padding to 32x32 holds "
          f"{1 - real / (len(sizes) * args.batch * 256):.0%} padding tokens")
    print(table(rows, [("strategy", "strategy", 0), ("seconds", "s / step", 3), ("tokens_per_s", "tokens/s", 0),
                       ("vs_padded", "x padded", 2), ("pad_flops", "FLOPs on padding", 3),
                       ("peak_mib", "peak MiB", 0), ("loss_diff", "max |loss - packed|", 1)]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
