"""One-command GPU benchmark: DiT-S/2, B/2 and L/2 training and sampling on 32x32x4 latents
(256x256 images through the SD VAE), through unifusion's own model path, and issue 22's rows.

    .venv/bin/python benchmarks/gpu.py                      # the full table, < 8 minutes on one H100/H200
    .venv/bin/python benchmarks/gpu.py --profile            # + top CUDA kernels of DiT-B/2 bf16 + compile
    .venv/bin/python benchmarks/gpu.py --json gpu.json      # + the rows as JSON
    .venv/bin/python benchmarks/gpu.py --smoke --device cpu # tiny nets on the CPU: checks the code paths
    .venv/bin/python benchmarks/gpu.py --cpu-default-run    # the default CLI run's steps/s on this CPU
    bash benchmarks/gpu_all.sh                              # this and gpu_sync_check.py, one prepared command

Sections, run first and in this order (--sections picks some), then the per-model table with what the
wall-time guard leaves: side (DiT-B/2 bf16 at batch 256, eager and compiled, against diffusers'
DiTTransformer2DModel of the same size in the same harness and process: fused AdamW, the same batches;
diffusers regresses the noise at the batch's sigma, the same network work), cli (the default
`unifusion train` run on this device, eager and with --compile reduce-overhead, in steps/s against the
2-core CPU's, a constant measured with --cpu-default-run), unet (the unet-32 RGB preset's training
img/s: fp32 with TF32, bf16, bf16 + channels_last, compiled), sample (DiT-B/2 sampling at batch 256 with
the eager and the compiled network). fp32 matmuls run in TF32 on CUDA, as in the trainer.

What a training step is: the model a `unifusion train --network dit-b2` run builds (config.model_spec:
EDM process and preconditioning, lognormal noise levels, class-conditional on 1000 classes with 10%
label dropout), AdamW, and `model(batch).mean().backward()` under autocast (bf16, or fp16 with a
GradScaler), optionally through `torch.compile(model)`: the trainer's own step (training/loop.py).
Each batch holds its per-example draws (noise levels, noise, label dropout), made by model.random
before timing, so the timed loop measures the model, not the host RNG. Time = wall clock between
two device synchronisations around the timed steps (no per-step sync).

Model FLOPs: torch.utils.flop_counter.FlopCounterMode over one real training step (forward +
backward, matmuls, convolutions and attention; attention through SDPA's math backend so its two
matmuls are counted on every device), per image; the analytic count (2 FLOPs per multiply-add of
every matmul of the forward, times 3 for forward + backward) is printed beside it. MFU = model
FLOPs x images/s / the device's dense bf16 peak (PaLM's convention: the recomputation of gradient
checkpointing is not model FLOPs, so those rows show what checkpointing costs).

The SDPA backend is read from the profiler (the aten attention op the dispatcher chose, and its
kernels) over one bf16 training step of each model, not assumed. Peak memory is
torch.cuda.max_memory_allocated over a row (weights, AdamW state, activations). Sampling: images/s
of model.sample(sampler="dpmpp_2m", nfe=20) under bf16 autocast (latents, no decoder).

Never part of `make test` (tests/test_gpu_bench.py runs --smoke on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import sys
import time
from types import SimpleNamespace

import torch

# label, key, network preset, overrides over the preset, training batch (chosen to fit an 80 GB card
# with room to spare; DiT trained at 256 global)
MODELS = [
    ("DiT-S/2", "s2", "dit-s2", {}, 256),
    ("DiT-B/2", "b2", "dit-b2", {}, 128),
    ("DiT-L/2", "l2", "dit-l2", {}, 64),
]
# DiT-L/2 (Peebles & Xie 2023, Table 1) where networks.PRESETS has no "dit-l2": dit-b2's layout at
# hidden 1024, depth 24, 16 heads (the saved spec lists every argument, so it is the same model)
L2_FALLBACK = ("dit-b2", dict(hidden_size=1024, depth=24, num_heads=16))
RUN_ORDER = ["b2", "s2", "l2"]  # B/2 first: its bf16 + compile MFU is the target (>= 40% on an H100)
LATENT = (4, 32, 32)
NUM_CLASSES = 1000
SAMPLER, NFE = "dpmpp_2m", 20
SAMPLE_BATCH, SAMPLE_N = 256, 512
STEPS = dict(warmup=3, timed=20, ckpt_warmup=2, ckpt_timed=10, compile_warmup=3, profile=5)
TRAIN_ROWS = [  # (precision, compile, gradient checkpointing), in the order they run per model
    ("bf16", False, False),
    ("fp16+GradScaler", False, False),
    ("bf16", False, True),
    ("bf16", True, False),
]
# --smoke: every code path on a DiT that takes milliseconds
SMOKE = dict(overrides=dict(input_size=8, hidden_size=64, depth=2, num_heads=4), shape=(4, 8, 8), batch=4,
             sample_batch=4, sample_n=8, steps=dict(warmup=1, timed=2, ckpt_warmup=1, ckpt_timed=2,
                                                     compile_warmup=1, profile=2))
NO_CUDA = "no CUDA device: run with --smoke for a CPU check of the code paths"
# first compile of a 12-block DiT (cold caches), used by the wall-time guard until one is measured
COMPILE_GUESS_S = 90.0


# ------------------------------------------------------------------------------ device facts
def peak_bf16(name: str) -> tuple[float | None, str]:
    """Dense (no sparsity) bf16 tensor-core peak in FLOP/s from the device name, and its source."""
    n = name.upper()
    if "H200" in n:  # H200 SXM and GH200 989.4; the air-cooled NVL cards 835 (datasheets)
        return (835e12, "H200 NVL datasheet") if "NVL" in n else (989.4e12, "H200 SXM datasheet")
    if "H100" in n:
        if "PCIE" in n:
            return 756e12, "H100 PCIe datasheet"
        if "NVL" in n:
            return 835e12, "H100 NVL datasheet"
        return 989.4e12, "H100 SXM datasheet"
    if "A100" in n:
        return 312e12, "A100 datasheet"
    return None, f"unknown device {name!r}: no bf16 peak known, MFU not computed (give --peak-tflops)"


def header(device: torch.device, peak, peak_src: str) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30
        extra = dict(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), memory_gib=round(mem, 1))
    else:
        name, extra = f"CPU ({torch.get_num_threads()} threads)", dict(cuda=None, cudnn=None)
    return dict(device=name, torch=torch.__version__, date=now, peak_bf16_flops=peak, peak_source=peak_src,
                **extra)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":  # (TF32 matmuls on CUDA: layers.use_tf32)
        return contextlib.nullcontext()
    dtype = torch.float16 if precision.startswith("fp16") else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------ model and data
def build_model(preset: str, overrides: dict, shape, device: torch.device):
    """The diffusion model `unifusion train --network <preset>` builds on class-labelled latents."""
    from unifusion import config, models, networks
    if preset not in networks.PRESETS and preset == "dit-l2":
        preset, overrides = L2_FALLBACK[0], {**L2_FALLBACK[1], **overrides}
    cfg = config.from_dict({"network": preset, "network_args": overrides, "data": "synthetic-latents"})
    source = SimpleNamespace(kind="latent", shape=tuple(shape), num_classes=NUM_CLASSES, class_names=None)
    torch.manual_seed(0)
    return models.build(config.model_spec(cfg, source)).to(device)


def make_batches(model, batch: int, shape, device: torch.device, count: int = 2) -> list[dict]:
    """`count` training batches on the device, each with its draws (sigma, noise, drop) from
    model.random, as the trainer puts them into the batch; the timed loop cycles through them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        b = {"x0": 0.5 * torch.randn((batch,) + tuple(shape), generator=g),
             "cond": {"y": torch.randint(0, NUM_CLASSES, (batch,), generator=g)}, **model.random(batch, g)}
        out.append({k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
                    for k, v in b.items()})
    return out


# ------------------------------------------------------------------------------ FLOPs
def dit_forward_flops(net) -> int:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward on one image, read off the layers:
    patchify, noise-embedding MLP, per block adaLN modulation, qkv, q k^T, attn v, out projection
    and MLP, then the final adaLN and linear. Norms, activations and elementwise ops not counted."""
    d, n, p, c = net.emb_dim, net.grid ** 2, net.patch_size, net.in_channels
    macs = n * (c * p * p) * d  # patchify conv
    mlp = net.embed.noise_mlp
    macs += mlp[0].in_features * mlp[0].out_features + mlp[2].in_features * mlp[2].out_features
    for blk in net.blocks:
        width = blk.mlp[0].out_features
        macs += d * blk.ada.out_features  # adaLN: (B, D) -> (B, 6D), once per image
        macs += n * d * 3 * d + 2 * n * n * d + n * d * d  # qkv, q k^T and attn v over all heads, proj
        macs += 2 * n * d * width  # MLP
    macs += d * net.final.ada.out_features + n * d * net.final.linear.out_features
    return 2 * macs


def counted_train_flops(model, batch: dict) -> float:
    """FlopCounterMode FLOPs per image of one training step (forward + backward) in fp32, with
    SDPA on its math backend so the attention matmuls are counted whatever the device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    n = len(batch["x0"])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(batch).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


# ------------------------------------------------------------------------------ profiler
def _profile(device: torch.device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts)


# the aten op the SDPA dispatcher chose (authoritative), then kernel-name evidence
SDPA_OPS = [("cudnn", "scaled_dot_product_cudnn_attention"), ("flash", "scaled_dot_product_flash_attention"),
            ("flash", "_flash_attention_forward"), ("efficient", "scaled_dot_product_efficient_attention"),
            ("efficient", "_efficient_attention_forward"), ("math", "scaled_dot_product_attention_math")]
SDPA_KERNELS = [("cudnn", ("native_sdpa", "cudnn_sdpa", "sdpa_cudnn")), ("flash", ("flash_fwd", "flash_bwd",
                "pytorch_flash", "flash_attn")), ("efficient", ("fmha_cutlass", "efficient_attention", "mem_eff"))]


def sdpa_backends(names) -> tuple[str, list[str]]:
    """('flash' / 'efficient' / 'cudnn' / 'math', or several joined by '+', or '?') and the
    attention kernel names seen, from profiler event names."""
    found, kernels = [], []
    for name in names:
        low = name.lower()
        for backend, op in SDPA_OPS:
            if low.startswith("aten::") and op in low:
                label = backend + (" (CPU)" if "_for_cpu" in low else "")
                if label not in found:
                    found.append(label)
                break
        if not low.startswith("aten::"):
            for backend, pats in SDPA_KERNELS:
                if any(pt in low for pt in pats):
                    kernels.append(name)
                    if not any(f.split()[0] == backend for f in found):
                        found.append(backend)
                    break
    order = ["cudnn", "flash", "efficient", "math"]
    found.sort(key=lambda f: order.index(f.split()[0]))
    return ("+".join(found) if found else "?"), sorted(set(kernels))[:4]


def detect_sdpa(model, batch: dict, device: torch.device) -> tuple[str, list[str]]:
    """Profile one bf16 training step (forward + backward) and read which SDPA backend ran."""
    with _profile(device) as prof:
        with autocast(device, "bf16"):
            loss = model.loss(batch).mean()
        loss.backward()
        sync(device)
    model.zero_grad(set_to_none=True)
    return sdpa_backends({e.name for e in prof.events()})


KERNEL_KINDS = [("attention", ("flash", "fmha", "sdpa", "attention")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "addmm", "aten::mm", "bmm")),
                ("triton (fused elementwise/norm)", ("triton",)),
                ("optimizer", ("foreach", "adam", "multi_tensor")),
                ("layernorm", ("layer_norm", "layernorm"))]


def top_kernels(prof, device: torch.device, k: int = 15) -> dict:
    """Top kernels by self device time (CPU: top ops by self CPU time), and the share per kind."""
    def dev_time(e):
        t = getattr(e, "self_device_time_total", None)
        return t if t is not None else getattr(e, "self_cuda_time_total", 0)

    evs = list(prof.key_averages())
    if device.type == "cuda":
        kernel = torch.autograd.DeviceType.CUDA
        rows = [(e.key, dev_time(e), e.count) for e in evs if getattr(e, "device_type", None) == kernel
                and dev_time(e) > 0]
        if not rows:  # older event objects without device_type: every op with device time
            rows = [(e.key, dev_time(e), e.count) for e in evs if dev_time(e) > 0]
        what = "CUDA kernels by self CUDA time"
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in evs if e.self_cpu_time_total > 0]
        what = "ops by self CPU time (CPU run: no kernels)"
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, t, _ in rows:
        low = name.lower()
        kind = next((kd for kd, pats in KERNEL_KINDS if any(p in low for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + t
    return {"what": what, "total_ms": total / 1e3,
            "top": [{"name": n, "ms": t / 1e3, "share": t / total, "calls": c} for n, t, c in rows[:k]],
            "kinds": {kd: t / total for kd, t in sorted(kinds.items(), key=lambda kv: -kv[1])}}


# ------------------------------------------------------------------------------ timed rows
class Budget:
    """The total wall-time guard: a row runs only if its estimate fits in what is left."""

    def __init__(self, minutes: float):
        self.limit, self.t0 = 60.0 * minutes, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit - self.elapsed()

    def skip_note(self, estimate_s: float) -> str | None:
        left = self.left()
        if estimate_s <= left:
            return None
        return f"skipped by the wall-time guard (--max-minutes): needs ~{estimate_s:.0f} s, {max(left, 0):.0f} s left"


def train_row(model, call, batches, precision: str, warmup: int, timed: int, device: torch.device,
              profile_steps: int = 0) -> dict:
    """warmup steps (the first timed alone: it holds compilation) then `timed` steps between two
    syncs; a fresh AdamW (the trainer's optimiser: fused, one kernel per step) and peak-memory counter per row."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type) if precision.startswith("fp16") else None
    amp = autocast(device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss = None

    def step(i):
        nonlocal loss
        with amp:
            loss = call(batches[i % len(batches)]).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step(0)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(timed):
        step(i)
    sync(device)
    dt = (time.perf_counter() - t0) / timed
    prof = None
    if profile_steps:
        with _profile(device) as p:
            for i in range(profile_steps):
                step(i)
            sync(device)
        prof = {**top_kernels(p, device), "steps": profile_steps}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    final = float(loss.detach())
    del opt, scaler
    model.zero_grad(set_to_none=True)
    return {"step_s": dt, "first_step_s": first, "peak_gib": peak, "loss": final, "profile": prof,
            "note": "" if math.isfinite(final) else "loss not finite"}


def sample_row(model, n: int, batch: int, device: torch.device) -> dict:
    """images/s of model.sample(dpmpp_2m, NFE 20) under bf16 autocast, after a short warm-up."""
    model.eval()
    try:
        with autocast(device, "bf16"):
            model.sample(n=min(batch, n), sampler=SAMPLER, nfe=4, batch_size=batch)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            x = model.sample(n=n, sampler=SAMPLER, nfe=NFE, batch_size=batch)
            sync(device)
            dt = time.perf_counter() - t0
    finally:
        model.train()
    ok = bool(torch.isfinite(x).all())
    return {"seconds": dt, "images_per_s": n / dt, "note": "" if ok else "samples not finite"}


# ------------------------------------------------------------------------------ the run
def steps_for(args) -> dict:
    """Steps per row: the table's (or --smoke's), with --steps / --warmup applied to every row kind."""
    steps = dict(SMOKE["steps"] if args.smoke else STEPS)
    if args.steps:
        steps.update(timed=args.steps, ckpt_timed=args.steps)
    if args.warmup:
        steps.update(warmup=args.warmup, compile_warmup=args.warmup, ckpt_warmup=args.warmup)
    return steps


def run_model(label, key, preset, overrides, batch, args, device, peak, budget, out, compile_est) -> None:
    steps = steps_for(args)
    shape = SMOKE["shape"] if args.smoke else LATENT
    if args.smoke:
        overrides, batch = {**overrides, **SMOKE["overrides"]}, SMOKE["batch"]
    if budget.left() <= 0:  # not even the model's setup (FLOP count, SDPA profile) fits any more
        note = "skipped by the wall-time guard (--max-minutes): no time left"
        out["models"].append({"model": label, "params": None, "batch": batch, "analytic_train_gflop_per_img": None,
                              "sdpa": "-"})
        out["train"] += [{"model": label, "batch": batch, "precision": pr, "compile": co, "grad_ckpt": ck, "note": note}
                         for pr, co, ck in TRAIN_ROWS]
        n, sb = (SMOKE["sample_n"], SMOKE["sample_batch"]) if args.smoke else (SAMPLE_N, SAMPLE_BATCH)
        out["sample"].append({"model": label, "sampler": SAMPLER, "nfe": NFE, "batch": sb, "n": n, "note": note})
        return
    t_model = time.perf_counter()
    model = build_model(preset, overrides, shape, device)
    net = model.net
    params = sum(p.numel() for p in net.parameters())
    fwd = dit_forward_flops(net)
    info = {"model": label, "params": params, "batch": batch, "depth": len(net.blocks),
            "forward_gflop_per_img": fwd / 1e9, "analytic_train_gflop_per_img": 3 * fwd / 1e9}
    out["models"].append(info)
    try:
        counted = counted_train_flops(model, make_batches(model, 2, shape, device, count=1)[0])
        info["counted_train_gflop_per_img"] = counted / 1e9
    except Exception as e:  # noqa: BLE001 (a benchmark reports and goes on)
        counted = 3 * fwd
        info["counted_train_gflop_per_img"] = None
        out["notes"].append(f"{label}: FlopCounterMode failed ({type(e).__name__}: {e}); MFU uses the analytic count")
    train_flops = counted
    info["mfu_flops_per_img"] = train_flops
    batches = make_batches(model, batch, shape, device)
    try:
        info["sdpa"], info["sdpa_kernels"] = detect_sdpa(model, batches[0], device)
    except Exception as e:  # noqa: BLE001
        info["sdpa"], info["sdpa_kernels"] = f"error: {type(e).__name__}", []
        out["notes"].append(f"{label}: SDPA detection failed: {e}")
    info["setup_s"] = time.perf_counter() - t_model
    eager_step = None
    assumed = 0.3 * peak if peak else (2e14 if device.type == "cuda" else 2e10)  # for the first estimate

    for precision, compiled, ckpt in TRAIN_ROWS:
        row = {"model": label, "batch": batch, "precision": precision, "compile": compiled, "grad_ckpt": ckpt}
        out["train"].append(row)
        if compiled and args.no_compile:
            row["note"] = "skipped: --no-compile"
            continue
        base = eager_step or train_flops * batch / assumed
        n_steps = (steps["ckpt_warmup"] + steps["ckpt_timed"]) if ckpt else (
            (steps["compile_warmup"] if compiled else steps["warmup"]) + steps["timed"])
        est = n_steps * base * (1.4 if ckpt else 1.0) + 1.0
        if compiled:
            est += compile_est["s"] * info["depth"] / compile_est["depth"]
        note = budget.skip_note(est)
        if note:
            row["note"] = note
            continue
        t_row = time.perf_counter()
        call = None
        try:
            if compiled:
                torch._dynamo.reset()
                call = torch.compile(model, backend=args.compile_backend)  # the trainer's net(batch)
            else:
                call = model.loss
            net.gradient_checkpointing = ckpt  # the runtime switch networks.from_description(**runtime) sets
            r = train_row(model, call, batches, precision,
                          steps["ckpt_warmup"] if ckpt else (steps["compile_warmup"] if compiled else steps["warmup"]),
                          steps["ckpt_timed"] if ckpt else steps["timed"], device,
                          profile_steps=steps["profile"] if (args.profile and compiled and key == "b2") else 0)
        except Exception as e:  # noqa: BLE001 (e.g. out of memory, a compile failure): report, go on
            row["note"] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            out["errors"] += 1
            continue
        finally:
            net.gradient_checkpointing = False
            del call
            if compiled:
                torch._dynamo.reset()
            free(device)
        profile = r.pop("profile")
        if profile is not None:
            out["profile"] = {"model": label, "precision": precision, "compile": compiled, **profile}
        ips = batch / r["step_s"]
        row.update(r, images_per_s=ips, tflops=train_flops * ips / 1e12,
                   mfu=train_flops * ips / peak if peak else None, row_s=time.perf_counter() - t_row)
        if compiled:
            row["compile_s"] = r["first_step_s"]
            if args.compile_backend == "inductor":
                compile_est.update(s=r["first_step_s"], depth=info["depth"])
        elif not ckpt and precision == "bf16":
            eager_step = r["step_s"]

    n, sb = (SMOKE["sample_n"], SMOKE["sample_batch"]) if args.smoke else (SAMPLE_N, SAMPLE_BATCH)
    row = {"model": label, "sampler": SAMPLER, "nfe": NFE, "batch": sb, "n": n}
    out["sample"].append(row)
    base = eager_step or train_flops * batch / assumed
    est = (NFE * math.ceil(n / sb) + 4) * base / 3 * sb / batch + 2.0
    note = budget.skip_note(est)
    if note:
        row["note"] = note
    else:
        try:
            r = sample_row(model, n, sb, device)
            flops = fwd * NFE * r["images_per_s"]
            row.update(r, tflops=flops / 1e12, mfu=flops / peak if peak else None)
        except Exception as e:  # noqa: BLE001
            row["note"] = f"error: {type(e).__name__}: {str(e).strip()[:160]}"
            out["errors"] += 1
    del model, batches
    free(device)


# ------------------------------------------------------------------------------ the issue's side-by-side rows
# DiT-B/2 against diffusers' DiTTransformer2DModel of the same size, in this harness and process
SIDE = dict(preset="dit-b2", batch=256)
# the default `unifusion train` run (digits, unet-digits, batch 128) on a 2-core CPU, steps/s: a constant, the
# ~18 steps/s issue 22 measured on an idle 2-core machine (`--cpu-default-run` re-measures it; on the shared
# development machine at load average ~5 it gave 8.6 steps/s, 2026-12-04, so the idle figure is the fairer one)
CPU_DEFAULT_RUN_STEPS_S = 18.0
CPU_DEFAULT_RUN_SOURCE = "a constant: the idle 2-core CPU figure of issue 22; re-measure with --cpu-default-run"
CLI_STEPS, CLI_LOG_EVERY = 600, 100  # the GPU default-run rows: steps/s over the intervals after the first
# the unet-32 RGB preset (shapes-32: 3x32x32), training img/s: (precision, channels_last, compile)
UNET = dict(preset="unet-32", shape=(3, 32, 32), batch=256, num_classes=10)
UNET_ROWS = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False), ("bf16", True, True)]
SECTIONS = ("side", "cli", "unet", "sample", "models")
SMOKE_SIDE = dict(batch=4)
SMOKE_CLI = dict(steps=6, log_every=2, network_args={"model_channels": 8}, batch_size=8)
SMOKE_UNET = dict(overrides=dict(model_channels=8, channel_mult=(1, 2), resolution=8, attn_resolutions=(4,),
                                 num_heads=2), shape=(3, 8, 8), batch=4)


class DiffusersDiT(torch.nn.Module):
    """diffusers' DiTTransformer2DModel in the harness: the batch's own EDM sigma, noise and labels;
    x = x0 + sigma n in, the noise regressed (eps-prediction, no preconditioning: per step it is the same
    network work as unifusion's loss, plus two elementwise ops). Its label dropout (10%, drawn inside the
    model) stands in for the batch's dropout mask."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch: dict) -> torch.Tensor:
        x0, n = batch["x0"], batch["noise"]
        sigma = batch["sigma"].to(x0.dtype)
        x = x0 + sigma[:, None, None, None] * n
        out = self.net(x, timestep=sigma.log() / 4, class_labels=batch["cond"]["y"]).sample
        return (out.float() - n).pow(2).flatten(1).mean(1)


def build_diffusers_dit(preset: str, overrides: dict, shape, device: torch.device):
    """DiTTransformer2DModel with the preset's size: hidden, depth, heads, patch, input size and channels
    (no learned sigma: out_channels = in_channels; LayerNorm eps 1e-6 as DiT's), or None when diffusers is
    not installed."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return None
    from unifusion import networks
    kw = {**networks.PRESETS[preset][1], **overrides}
    hidden, heads = kw["hidden_size"], kw["num_heads"]
    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=shape[0],
                                out_channels=shape[0], num_layers=kw["depth"], sample_size=shape[1],
                                patch_size=kw.get("patch_size", 2), num_embeds_ada_norm=NUM_CLASSES, norm_eps=1e-6)
    return DiffusersDiT(net).to(device)


def side_by_side(args, device, peak, budget, out, compile_est) -> None:
    """DiT-B/2 bf16 at batch 256, eager and compiled: unifusion's training step (model.loss) and diffusers'
    DiTTransformer2DModel through the same train_row (fused AdamW, autocast, same batches)."""
    steps = steps_for(args)
    shape = SMOKE["shape"] if args.smoke else LATENT
    overrides = SMOKE["overrides"] if args.smoke else {}
    batch = SMOKE_SIDE["batch"] if args.smoke else SIDE["batch"]
    rows = out["side"]
    plan = [("unifusion", False), ("diffusers", False), ("unifusion", True), ("diffusers", True)]
    for who, compiled in plan:
        rows.append({"who": who, "compile": compiled, "batch": batch})
    if budget.left() <= 0:
        for r in rows:
            r["note"] = "skipped by the wall-time guard (--max-minutes): no time left"
        return
    ours = build_model(SIDE["preset"], overrides, shape, device)
    flops = 3 * dit_forward_flops(ours.net)  # per image, forward + backward (the analytic count)
    batches = make_batches(ours, batch, shape, device)
    theirs = build_diffusers_dit(SIDE["preset"], overrides, shape, device)
    out["side_info"] = {"params_unifusion": sum(p.numel() for p in ours.parameters()),  # net + class table
                        "params_diffusers": None if theirs is None else sum(p.numel() for p in theirs.parameters()),
                        "train_gflop_per_img": flops / 1e9}
    modules = {"unifusion": ours, "diffusers": theirs}
    for row in rows:
        module = modules[row["who"]]
        if module is None:
            row["note"] = "diffusers not installed (pip install diffusers==0.42.1, or carry its wheel)"
            continue
        if row["compile"] and args.no_compile:
            row["note"] = "skipped: --no-compile"
            continue
        n = (steps["compile_warmup"] if row["compile"] else steps["warmup"]) + steps["timed"]
        base = next((r["step_s"] for r in rows if r.get("step_s")), None) or flops * batch / (
            0.3 * peak if peak else 2e14 if device.type == "cuda" else 2e10)
        est = n * base + (compile_est["s"] if row["compile"] else 0) + 1.0
        note = budget.skip_note(est)
        if note:
            row["note"] = note
            continue
        print(f"[{budget.elapsed():5.0f} s] side by side: {row['who']} compile {row['compile']} ...", file=sys.stderr,
              flush=True)
        call = None
        try:
            if row["compile"]:
                torch._dynamo.reset()
                call = torch.compile(module, backend=args.compile_backend)
            else:
                call = module.loss if module is ours else module
            r = train_row(module, call, batches, "bf16", steps["compile_warmup"] if row["compile"] else steps["warmup"],
                          steps["timed"], device)
        except Exception as e:  # noqa: BLE001 (a benchmark reports and goes on)
            row["note"] = _error(e)
            out["errors"] += 1
            continue
        finally:
            del call
            if row["compile"]:
                torch._dynamo.reset()
            free(device)
        r.pop("profile")
        ips = batch / r["step_s"]
        row.update(r, images_per_s=ips, mfu=flops * ips / peak if peak else None)
    for row in rows:  # unifusion / diffusers at the same compile setting
        peer = next((p for p in rows if p["who"] == "diffusers" and p["compile"] == row["compile"]), None)
        if row.get("images_per_s") and peer and peer.get("images_per_s"):
            row["vs_diffusers"] = row["images_per_s"] / peer["images_per_s"]
    del ours, theirs, batches, modules
    free(device)


def _error(e: Exception) -> str:
    text = str(e).strip()
    return f"error: {type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"


def cli_run(device: torch.device, steps: int, log_every: int, compile_mode: str = "off", extra: dict | None = None
            ) -> dict:
    """`unifusion train` with the default config (the digits run; extra: overrides) on `device`, in this
    process, for `steps` steps: steps/s = the median over the logged intervals after the first (which holds
    the warm-up, and compilation and graph capture), and the loss at the end. No preview grid or loss plot."""
    import tempfile
    from pathlib import Path

    from unifusion import config
    from unifusion.training import loop as L
    with tempfile.TemporaryDirectory() as d:
        cfg = config.from_dict({"device": device.type, "steps": steps, "log_every": log_every,
                                "checkpoint_every": steps, "sample_every": 0, "compile": compile_mode, "out": d,
                                **(extra or {})})
        real = L._preview, L.log_curve
        L._preview = L.log_curve = lambda *a, **k: Path(d) / "none.png"
        t0 = time.perf_counter()
        try:
            L.train(cfg, progress=False)
        finally:
            L._preview, L.log_curve = real
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]
    dt = sorted((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(recs, recs[1:]))
    per_step = dt[len(dt) // 2] if dt else recs[-1]["time"] / recs[-1]["step"]
    return {"steps_per_s": 1 / per_step, "first_interval_s": recs[0]["time"], "loss": recs[-1]["loss"],
            "wall_s": wall}


def cli_rows(args, device, budget, out) -> None:
    """The default CLI run on this device, eager and (CUDA) with --compile reduce-overhead, against the
    2-core CPU's steps/s (CPU_DEFAULT_RUN_STEPS_S)."""
    steps, log_every = (SMOKE_CLI["steps"], SMOKE_CLI["log_every"]) if args.smoke else (CLI_STEPS, CLI_LOG_EVERY)
    extra = {k: SMOKE_CLI[k] for k in ("network_args", "batch_size")} if args.smoke else {}
    if device.type == "cpu":  # the trainer's thread policy would change this process's threads
        extra["threads"] = torch.get_num_threads()
    for mode in ("off", "reduce-overhead"):
        row = {"device": device.type, "compile": mode, "steps": steps}
        out["cli"].append(row)
        if mode != "off" and device.type != "cuda":
            row["note"] = "CUDA only (CUDA graphs)"
            continue
        if mode != "off" and args.no_compile:
            row["note"] = "skipped: --no-compile"
            continue
        note = budget.skip_note(steps / 20 + (60 if mode != "off" else 5))
        if note:
            row["note"] = note
            continue
        print(f"[{budget.elapsed():5.0f} s] default CLI run, compile {mode} ...", file=sys.stderr, flush=True)
        try:
            row.update(cli_run(device, steps, log_every, mode, extra))
        except Exception as e:  # noqa: BLE001
            row["note"] = _error(e)
            out["errors"] += 1
        finally:
            torch._dynamo.reset()
            free(device)
        if row.get("steps_per_s"):
            row["vs_cpu"] = row["steps_per_s"] / CPU_DEFAULT_RUN_STEPS_S


def build_unet(overrides: dict, shape, device: torch.device):
    """The model `unifusion train --data shapes-32 --network unet-32` builds (EDM, class-conditional)."""
    from unifusion import config, models
    cfg = config.from_dict({"network": UNET["preset"], "network_args": overrides, "data": "shapes-32"})
    source = SimpleNamespace(kind="image", shape=tuple(shape), num_classes=UNET["num_classes"], class_names=None)
    torch.manual_seed(0)
    return models.build(config.model_spec(cfg, source)).to(device)


def unet_rows(args, device, budget, out, compile_est) -> None:
    """img/s of the unet-32 RGB preset's training step: fp32 (TF32 on CUDA), bf16, bf16 + channels_last,
    and the last compiled."""
    steps = steps_for(args)
    shape = SMOKE_UNET["shape"] if args.smoke else UNET["shape"]
    overrides = SMOKE_UNET["overrides"] if args.smoke else {}
    batch = SMOKE_UNET["batch"] if args.smoke else UNET["batch"]
    for precision, cl, compiled in UNET_ROWS:
        out["unet"].append({"precision": precision, "channels_last": cl, "compile": compiled, "batch": batch})
    if budget.left() <= 0:
        for r in out["unet"]:
            r["note"] = "skipped by the wall-time guard (--max-minutes): no time left"
        return
    model = build_unet(overrides, shape, device)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        b = {"x0": torch.rand((batch,) + tuple(shape), generator=g) * 2 - 1,
             "cond": {"y": torch.randint(0, UNET["num_classes"], (batch,), generator=g)}, **model.random(batch, g)}
        batches.append({k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
                        for k, v in b.items()})
    base = None
    for row in out["unet"]:
        if row["compile"] and args.no_compile:
            row["note"] = "skipped: --no-compile"
            continue
        n = (steps["compile_warmup"] if row["compile"] else steps["warmup"]) + steps["timed"]
        note = budget.skip_note(n * (base or 0.2) + (compile_est["s"] / 2 if row["compile"] else 0) + 1.0)
        if note:
            row["note"] = note
            continue
        print(f"[{budget.elapsed():5.0f} s] unet-32 {row['precision']} channels_last {row['channels_last']} compile "
              f"{row['compile']} ...", file=sys.stderr, flush=True)
        call = None
        try:
            model.to(memory_format=torch.channels_last if row["channels_last"] else torch.contiguous_format)
            if row["compile"]:
                torch._dynamo.reset()
                call = torch.compile(model, backend=args.compile_backend)
            else:
                call = model.loss
            r = train_row(model, call, batches, row["precision"],
                          steps["compile_warmup"] if row["compile"] else steps["warmup"], steps["timed"], device)
        except Exception as e:  # noqa: BLE001
            row["note"] = _error(e)
            out["errors"] += 1
            continue
        finally:
            del call
            if row["compile"]:
                torch._dynamo.reset()
            free(device)
        r.pop("profile")
        base = base or r["step_s"]
        row.update(r, images_per_s=batch / r["step_s"])
    del model, batches
    free(device)


def sample_rows(args, device, peak, budget, out, compile_est) -> None:
    """Sampling DiT-B/2 (dpmpp_2m, NFE 20) at batch 256 under bf16 autocast: the eager network and the
    torch.compile'd one (the model.sample path: seeded noise, the sync-free sampler, no decoder)."""
    shape = SMOKE["shape"] if args.smoke else LATENT
    overrides = SMOKE["overrides"] if args.smoke else {}
    n, sb = (SMOKE["sample_n"], SMOKE["sample_batch"]) if args.smoke else (SAMPLE_N, SAMPLE_BATCH)
    for compiled in (False, True):
        out["sample_side"].append({"model": "DiT-B/2", "compile": compiled, "batch": sb, "n": n})
    if budget.left() <= 0:
        for r in out["sample_side"]:
            r["note"] = "skipped by the wall-time guard (--max-minutes): no time left"
        return
    model = build_model(SIDE["preset"], overrides, shape, device)
    fwd = dit_forward_flops(model.net)
    net = model.net
    for row in out["sample_side"]:
        if row["compile"] and args.no_compile:
            row["note"] = "skipped: --no-compile"
            continue
        est = (NFE * math.ceil(n / sb) + 4) * fwd * sb / (0.3 * peak if peak else 2e14 if device.type == "cuda"
                                                           else 2e10) + (compile_est["s"] / 2 if row["compile"] else 2)
        note = budget.skip_note(est)
        if note:
            row["note"] = note
            continue
        print(f"[{budget.elapsed():5.0f} s] sampling DiT-B/2 compile {row['compile']} ...", file=sys.stderr, flush=True)
        try:
            if row["compile"]:
                torch._dynamo.reset()
                model.net = torch.compile(net, backend=args.compile_backend)
            r = sample_row(model, n, sb, device)
            flops = fwd * NFE * r["images_per_s"]
            row.update(r, tflops=flops / 1e12, mfu=flops / peak if peak else None)
        except Exception as e:  # noqa: BLE001
            row["note"] = _error(e)
            out["errors"] += 1
        finally:
            model.net = net
            torch._dynamo.reset()
            free(device)
    del model, net
    free(device)


def measure_cpu_default_run(steps: int = 300) -> int:
    """--cpu-default-run: the CPU_DEFAULT_RUN_STEPS_S measurement (the default run on this machine's CPU)."""
    r = cli_run(torch.device("cpu"), steps, 50)
    print(f"default CLI run on the CPU ({torch.get_num_threads()} threads): {r['steps_per_s']:.1f} steps/s "
          f"(median over {steps // 50 - 1} intervals of 50 steps; loss {r['loss']:.4f})")
    return 0


# ------------------------------------------------------------------------------ printing
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _g(v) -> str:
    """A FLOP figure with 3-4 significant digits whatever its size (tiny --smoke nets included)."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def issue_sections(out: dict) -> list[str]:
    """The side-by-side, default-run, unet-32 and compiled-sampling tables (those that ran)."""
    lines = []
    side = out.get("side") or []
    if side:
        info = out.get("side_info") or {}
        pu, pd = info.get("params_unifusion"), info.get("params_diffusers")
        lines += [f"## Side by side: DiT-B/2 (unifusion) vs diffusers DiTTransformer2DModel of the same size, bf16 "
                  f"autocast, batch {side[0]['batch']}, fused AdamW, one harness and process (params: unifusion "
                  f"{_g(pu and pu / 1e6)}M, diffusers {_g(pd and pd / 1e6)}M; MFU from the analytic "
                  f"{_g(info.get('train_gflop_per_img'))} GFLOP/img)"]
        lines.append(_table(
            ["network", "compile", "ms/step", "img/s", "MFU", "vs diffusers", "peak GiB", "first step s", "note"],
            [[r["who"], "on" if r["compile"] else "off", _f(r.get("step_s") and r["step_s"] * 1e3, ".1f"),
              _f(r.get("images_per_s"), ".0f"), _pct(r.get("mfu")), _f(r.get("vs_diffusers"), ".2f"),
              _f(r.get("peak_gib"), ".2f"), _f(r.get("first_step_s"), ".2f"), r.get("note", "")] for r in side]))
        lines += ["target (issue 22): unifusion >= 1.15x diffusers, eager and compiled; >= 45% MFU compiled", ""]
    cli = out.get("cli") or []
    if cli:
        lines += [f"## Default CLI run (`unifusion train`: digits, unet-digits, batch 128, fp32; TF32 on CUDA), "
                  f"steps/s = median over the {CLI_LOG_EVERY}-step log intervals after the first"]
        lines.append(_table(
            ["device", "compile", "steps", "steps/s", "vs 2-core CPU", "first interval s", "loss at end", "note"],
            [[r["device"], r["compile"], str(r["steps"]), _f(r.get("steps_per_s"), ".1f"), _f(r.get("vs_cpu"), ".1f"),
              _f(r.get("first_interval_s"), ".1f"), _f(r.get("loss"), ".4f"), r.get("note", "")] for r in cli]))
        lines += [f"2-core CPU: {CPU_DEFAULT_RUN_STEPS_S:g} steps/s ({CPU_DEFAULT_RUN_SOURCE}); target (issue 22): "
                  ">= 10x, >= 200 steps/s on an H100/H200", ""]
    unet = out.get("unet") or []
    if unet:
        lines += [f"## unet-32 (RGB 32x32 shapes, class-conditional EDM): training img/s, batch {unet[0]['batch']}"]
        lines.append(_table(
            ["precision", "channels_last", "compile", "ms/step", "img/s", "peak GiB", "first step s", "note"],
            [[r["precision"] + (" (TF32)" if r["precision"] == "fp32" and out["header"].get("cuda") else ""),
              "on" if r["channels_last"] else "off", "on" if r["compile"] else "off",
              _f(r.get("step_s") and r["step_s"] * 1e3, ".1f"), _f(r.get("images_per_s"), ".0f"),
              _f(r.get("peak_gib"), ".2f"), _f(r.get("first_step_s"), ".2f"), r.get("note", "")] for r in unet]))
        lines.append("")
    ss = out.get("sample_side") or []
    if ss:
        lines += [f"## Compiled sampling: DiT-B/2, {SAMPLER} NFE {NFE}, bf16 autocast, batch {ss[0]['batch']} "
                  "(model.sample: seeded noise, the sync-free sampler, no decoder)"]
        lines.append(_table(
            ["network", "batch", "images", "s", "img/s", "TFLOP/s", "MFU", "note"],
            [["compiled" if r["compile"] else "eager", str(r["batch"]), str(r["n"]), _f(r.get("seconds"), ".2f"),
              _f(r.get("images_per_s"), ".1f"), _g(r.get("tflops")), _pct(r.get("mfu")), r.get("note", "")]
             for r in ss]))
        lines += ["target (issue 22): sampling MFU >= 40% at batch 256", ""]
    return lines


def report(out: dict) -> str:
    h = out["header"]
    peak = h["peak_bf16_flops"]
    lines = [f"# unifusion GPU benchmark: {h['device']}, torch {h['torch']}, CUDA {h['cuda'] or '-'}, "
             f"cuDNN {h['cudnn'] or '-'}, {h['date']}",
             f"# peak dense bf16: {peak / 1e12:.1f} TFLOP/s ({h['peak_source']})" if peak else f"# {h['peak_source']}",
             f"# {out['setup']}", ""]
    lines += issue_sections(out)
    if not out["models"]:
        lines += [f"note: {n}" for n in out["notes"]] + [f"\ntotal wall time {out['wall_s']:.0f} s"]
        return "\n".join(lines)
    order = [m[0] for m in MODELS]
    models = sorted(out["models"], key=lambda r: order.index(r["model"]))
    lines.append("## Models (train FLOPs = forward + backward per image; MFU uses the FlopCounterMode column)")
    lines.append(_table(
        ["model", "params (M)", "train batch", "train GFLOP/img (FlopCounterMode)", "train GFLOP/img (analytic 3x fwd)",
         "SDPA backend (profiler)"],
        [[m["model"], _g(m["params"] and m["params"] / 1e6), str(m["batch"]), _g(m.get("counted_train_gflop_per_img")),
          _g(m["analytic_train_gflop_per_img"]), m.get("sdpa", "-")] for m in models]))
    lines += ["", "## Training (AdamW; bf16/fp16 = autocast over fp32 weights; compile = torch.compile(model), "
                  "its first step (compilation) in 'first step s')"]
    train = sorted(out["train"], key=lambda r: order.index(r["model"]))
    lines.append(_table(
        ["model", "batch", "precision", "compile", "grad ckpt", "ms/step", "img/s", "TFLOP/s", "MFU", "peak GiB",
         "first step s", "note"],
        [[r["model"], str(r["batch"]), r["precision"], "on" if r["compile"] else "off",
          "on" if r["grad_ckpt"] else "off",
          _f(r.get("step_s") and r["step_s"] * 1e3, ".1f"), _f(r.get("images_per_s"), ".0f"),
          _g(r.get("tflops")), _pct(r.get("mfu")), _f(r.get("peak_gib"), ".2f"), _f(r.get("first_step_s"), ".2f"),
          r.get("note", "")] for r in train]))
    target = next((r for r in train if r["model"] == "DiT-B/2" and r["precision"] == "bf16" and r["compile"]
                   and not r["grad_ckpt"] and r.get("mfu") is not None), None)
    if target is not None:
        lines.append(f"\ntarget (issue): DiT-B/2 bf16 + compile >= 40% MFU on an H100; here {100 * target['mfu']:.1f}% "
                     f"on {h['device']} ({'met' if target['mfu'] >= 0.4 else 'not met'})")
    lines += ["", f"## Sampling ({SAMPLER}, NFE {NFE}, bf16 autocast, eager; latents, no decoder)"]
    sample = sorted(out["sample"], key=lambda r: order.index(r["model"]))
    lines.append(_table(
        ["model", "batch", "images", "s", "img/s", "TFLOP/s", "MFU", "note"],
        [[r["model"], str(r["batch"]), str(r["n"]), _f(r.get("seconds"), ".2f"), _f(r.get("images_per_s"), ".1f"),
          _g(r.get("tflops")), _pct(r.get("mfu")), r.get("note", "")] for r in sample]))
    p = out.get("profile")
    if p:
        lines += ["", f"## Profile: {p['model']} {p['precision']} compile {'on' if p['compile'] else 'off'}, "
                      f"{p['what']}, {p['total_ms']:.1f} ms over {p['steps']} steps"]
        lines.append("time by kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["kinds"].items()))
        lines.append(_table(["kernel", "ms", "share", "calls"],
                            [[t["name"][:100].replace("|", "/"), f"{t['ms']:.2f}", f"{100 * t['share']:.1f}%",
                              str(t["calls"])] for t in p["top"]]))
    elif out.get("profile_note"):
        lines += ["", out["profile_note"]]
    if out["notes"]:
        lines += [""] + [f"note: {n}" for n in out["notes"]]
    lines.append(f"\ntotal wall time {out['wall_s']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny DiTs, few steps, compile through dynamo's eager "
                                                        "backend: a check of the code paths (CPU is fine)")
    p.add_argument("--device", default=None, help="cuda (default), cuda:N, or cpu with --smoke")
    p.add_argument("--models", default="s2,b2,l2", help="comma-separated subset of s2,b2,l2")
    p.add_argument("--profile", action="store_true", help="torch.profiler over DiT-B/2 bf16 + compile: top kernels")
    p.add_argument("--no-compile", action="store_true", help="skip the compile rows")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --smoke: eager)")
    p.add_argument("--steps", type=int, default=0, help=f"timed steps per row (default {STEPS['timed']})")
    p.add_argument("--warmup", type=int, default=0, help=f"warm-up steps per row (default {STEPS['warmup']})")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="wall-time guard: rows whose estimate does not fit in what is left are skipped")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU, if the device is unknown")
    p.add_argument("--json", default=None, help="also write every row to this file")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS) + ", run in this order: side (DiT-B/2 vs "
                        "diffusers), cli (the default CLI run), unet (unet-32 img/s), sample (compiled sampling), "
                        "models (the per-model table)")
    p.add_argument("--cpu-default-run", action="store_true",
                   help="only measure the default CLI run's steps/s on this machine's CPU (CPU_DEFAULT_RUN_STEPS_S)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = sorted(set(keys) - {m[1] for m in MODELS})
    if bad or not keys:
        p.error(f"--models takes a subset of s2,b2,l2, got {args.models!r}")
    args.models = keys
    args.sections = [k.strip() for k in args.sections.split(",") if k.strip()]
    if set(args.sections) - set(SECTIONS) or not args.sections:
        p.error(f"--sections takes a subset of {','.join(SECTIONS)}, got {','.join(args.sections)!r}")
    if args.device and torch.device(args.device).type == "cpu" and not args.smoke:
        p.error("--device cpu runs only with --smoke (the full table is a GPU benchmark)")
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.cpu_default_run:
        return measure_cpu_default_run()
    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    budget = Budget(args.max_minutes)
    from unifusion.networks.layers import use_tf32
    use_tf32(device)  # as the trainer does: fp32 matmuls (the unet-32 fp32 row, the default run) in TF32
    if args.peak_tflops:
        peak, src = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda":
        peak, src = peak_bf16(torch.cuda.get_device_name(device))
    else:
        peak, src = None, "CPU: no bf16 peak, MFU not computed"
    st = steps_for(args)
    setup = (f"{'--smoke: tiny DiTs ' + str(SMOKE['overrides']) + ', ' if args.smoke else ''}latents "
             f"{'x'.join(map(str, SMOKE['shape'] if args.smoke else LATENT))}, "
             f"{NUM_CLASSES} classes (10% label dropout), "
             f"EDM; per row {st['warmup']} warm-up + {st['timed']} timed steps (compile: {st['compile_warmup']} "
             f"warm-up incl. the compiling one; grad ckpt: {st['ckpt_warmup']} + {st['ckpt_timed']}); "
             f"compile backend {args.compile_backend}; guard {args.max_minutes:g} min")
    out = {"header": header(device, peak, src), "setup": setup, "models": [], "train": [], "sample": [],
           "side": [], "cli": [], "unet": [], "sample_side": [], "notes": [], "errors": 0}
    if device.type == "cuda" and peak is None:
        out["notes"].append(src)
    compile_est = {"s": COMPILE_GUESS_S, "depth": 12}
    # the issue's headline rows first, then the per-model table with what the wall-time guard leaves
    if "side" in args.sections:
        side_by_side(args, device, peak, budget, out, compile_est)
    if "cli" in args.sections:
        cli_rows(args, device, budget, out)
    if "unet" in args.sections:
        unet_rows(args, device, budget, out, compile_est)
    if "sample" in args.sections:
        sample_rows(args, device, peak, budget, out, compile_est)
    by_key = {m[1]: m for m in MODELS}
    for key in [k for k in RUN_ORDER if k in args.models and "models" in args.sections]:
        label, key, preset, overrides, batch = by_key[key]
        print(f"[{budget.elapsed():5.0f} s] {label} ...", file=sys.stderr, flush=True)
        run_model(label, key, preset, overrides, batch, args, device, peak, budget, out, compile_est)
    if args.profile and "profile" not in out:
        out["profile_note"] = ("--profile: no profile (DiT-B/2 bf16 + compile did not run: "
                               "see its row)" if "b2" in args.models else "--profile needs DiT-B/2 in --models")
    out["wall_s"] = budget.elapsed()
    print(report(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
