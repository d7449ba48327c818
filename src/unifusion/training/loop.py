"""The training loop: one visible function (nanoGPT's train.py is the model).

Every random draw of step k (data order, noise levels, noise, label dropout, network dropout)
comes from generators seeded by (seed, k), and the global batch's draws are made whole and then
split over ranks. So a resumed run only needs weights, optimizer, EMA and the step to continue
bit-identically, and K ranks see exactly the examples and noise of one rank with the same global
batch.
"""
from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .. import config as C
from .. import data as datasets
from .. import losses
from . import checkpoint, distributed
from .ema import EMA
from .model import build, generate

MODEL_KEYS = ("process", "parametrization", "network", "sigma_data", "data", "class_conditional")


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 over the parts)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def lr_at(cfg: C.TrainConfig, step: int) -> float:
    """Linear warmup, then constant or cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class _Interrupt:
    """SIGINT sets a flag; the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self):
        self.hit, self._old = False, None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.hit:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def train(cfg: C.TrainConfig, progress: bool = True) -> dict:
    """Train as `cfg` says; returns where the outputs went (and 'interrupted': bool)."""
    cfg.validate()
    dist = distributed.setup(cfg.device)
    device, rank, world = dist.device, dist.rank, dist.world_size
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # ---- data and model
    ds = datasets.load(cfg.data, **data_options(cfg))
    num_classes = ds.num_classes if cfg.class_conditional else 0
    B = cfg.batch_size
    if B % (world * cfg.grad_accum):
        raise ValueError(f"batch_size={B} must be divisible by ranks x grad_accum = {world} x {cfg.grad_accum}")
    micro = B // (world * cfg.grad_accum)
    if len(ds) < B:
        raise ValueError(f"batch_size={B} is larger than the data set ({len(ds)} examples)")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run with this seed
    model = build(cfg, num_classes).to(device)
    _check_shapes(model, ds, num_classes, device)
    process = C.make_process(cfg)
    density = C.make_noise_density(cfg, process)
    weight = losses.weighting(cfg.weighting, model.param, cfg.sigma_data)
    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model.net, cfg.ema_half_life)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and device.type == "cuda" else None
    if cfg.precision == "fp16" and scaler is None:
        raise ValueError("precision=fp16 needs a CUDA device (use bf16 on CPU)")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
           else torch.autocast(device.type, dtype=torch.float16) if cfg.precision == "fp16" else nullcontext())

    # ---- resume
    start, state = 0, {}
    if cfg.resume:
        last = checkpoint.latest(out)
        if last is None:
            if rank == 0:
                print(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting from step 0")
        else:
            tensors, state = checkpoint.load(last)
            old = state["config"]
            differ = [k for k in MODEL_KEYS if old.get(k) != getattr(cfg, k)]
            if differ:
                raise ValueError(f"cannot resume {last}: the config differs in {differ} "
                                 f"(checkpoint: {[old.get(k) for k in differ]}); use another --out")
            model.net.load_state_dict(tensors["model"])
            ema.load_state_dict(tensors["ema"])
            opt.load_state_dict(checkpoint.optimizer_from_tensors(tensors["optimizer"], state["optimizer"]))
            start = state["step"]
            if rank == 0:
                print(f"resumed from {last} at step {start}")
    net = dist.wrap(torch.compile(model.net) if cfg.compile else model.net)
    train_model = type(model)(net, model.process, model.param)  # the same Denoiser around the wrapped net

    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // (B // world)
    log_path = out / "log.jsonl"
    tb = _tensorboard(out) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    bad, epoch_cache, t0, last_ckpt, interrupted = state.get("bad_steps", 0), (None, None), time.time(), None, False
    window = []
    with _Interrupt() as stop:
        for step in range(start, cfg.steps):
            # -- this step's examples: DistributedSampler's order for the epoch, rank's slice
            epoch, pos = divmod(step, per_epoch)
            if epoch_cache[0] != epoch:
                sampler.set_epoch(epoch)
                epoch_cache = (epoch, list(sampler))
            local = epoch_cache[1][pos * (B // world):(pos + 1) * (B // world)]
            x0_all = ds.x[local].to(device)
            y_all = ds.y[local].to(device) if num_classes else None
            # -- global draws from (seed, step), then this rank's slice (see module docstring)
            g = torch.Generator().manual_seed(_seed(cfg.seed, step))
            sigma = density.sample(B, g)[rank::world]
            noise = torch.randn((B,) + tuple(ds.shape), generator=g)[rank::world]
            if num_classes:
                y_all = losses.null_labels(y_all, num_classes, cfg.cond_drop,
                                           torch.Generator().manual_seed(_seed(cfg.seed, step, rank, 1)))
            torch.manual_seed(_seed(cfg.seed, step, rank, 2))  # network dropout
            for gr in opt.param_groups:
                gr["lr"] = lr_at(cfg, step)

            total = torch.zeros((), device=device)
            for m in range(cfg.grad_accum):
                sl = slice(m * micro, (m + 1) * micro)
                cond = {"y": y_all[sl]} if num_classes else {}
                sync = dist.no_sync(net) if m < cfg.grad_accum - 1 else nullcontext()
                with sync, amp:
                    loss = losses.denoising_loss(train_model, x0_all[sl], sigma[sl].to(device, torch.float32),
                                                 weight, noise=noise[sl].to(device), **cond).mean() / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss.detach()
            total = dist.mean(total)

            if not torch.isfinite(total):
                # skip the update, keep counting; many in a row mean the run has diverged
                opt.zero_grad(set_to_none=True)
                bad += 1
                if bad >= cfg.max_bad_steps:
                    raise RuntimeError(f"the loss was not finite for {bad} steps in a row (last at step {step}); "
                                       f"lower --lr, check the data for NaN, or use --precision fp32")
            else:
                bad = 0
                if scaler:
                    scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
                scaler.step(opt) if scaler else opt.step()
                if scaler:
                    scaler.update()
                opt.zero_grad(set_to_none=True)
                ema.update(model.net, B)

            done = step + 1
            window.append(float(total))
            if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
                rec = {"step": done, "loss": sum(window) / len(window), "lr": lr_at(cfg, step),
                       "bad_steps": bad, "time": round(time.time() - t0, 4)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if tb is not None:
                    tb.add_scalar("loss", rec["loss"], done)
                    tb.add_scalar("lr", rec["lr"], done)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                window = []
            bar.update(1)
            stop_now = stop.hit
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop_now:
                last_ckpt = _save(out, done, model, ema, opt, cfg, num_classes, ds, bad, dist)
            if rank == 0 and cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps:
                _preview(out, done, model, ema, cfg, num_classes, ds, device)
            if stop_now:
                interrupted = True
                break
    bar.close()
    if tb is not None:
        tb.close()
    result = {"out": str(out), "log": str(log_path), "checkpoint": str(last_ckpt) if last_ckpt else None,
              "interrupted": interrupted, "rank": rank}
    if rank == 0 and not interrupted:
        result["samples"] = str(_preview(out, cfg.steps, model, ema, cfg, num_classes, ds, device))
        result["loss_curve"] = str(_loss_curve(log_path, out / "loss.png"))
    dist.cleanup()
    return result


def data_options(cfg: C.TrainConfig) -> dict:
    """The image-folder options, passed only where they apply."""
    if not Path(cfg.data).is_dir():
        if cfg.image_size or cfg.channels or cfg.skip_corrupt:
            raise ValueError("image_size / channels / skip_corrupt apply only to image folders, "
                             f"and data={cfg.data!r} is not a folder")
        return {}
    return {"image_size": cfg.image_size or None, "channels": cfg.channels or None, "skip_corrupt": cfg.skip_corrupt}


def _tensorboard(out: Path):
    """A SummaryWriter when tensorboard is installed, else None (the JSONL log is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # tensorboard missing or broken: not needed
        return None


def _check_shapes(model, ds, num_classes, device):
    x = ds.x[:2].to(device)
    try:
        with torch.no_grad():
            out = model(x, torch.ones(2, device=device), **({"y": ds.y[:2].to(device)} if num_classes else {}))
    except Exception as e:  # the preset and the data disagree: say which
        raise ValueError(f"network does not accept data of shape {tuple(ds.shape)}: {e}") from e
    if out.shape != x.shape:
        raise ValueError(f"network returns shape {tuple(out.shape[1:])} for data of shape {tuple(ds.shape)}")


def _save(out, step, model, ema, opt, cfg, num_classes, ds, bad, dist):
    path = None
    if dist.rank == 0:
        opt_t, opt_meta = checkpoint.optimizer_to_tensors(opt.state_dict())
        state = {"step": step, "config": cfg.to_dict(), "num_classes": num_classes, "shape": list(ds.shape),
                 "optimizer": opt_meta, "bad_steps": bad}
        path = checkpoint.save(out, step, {"model": model.net.state_dict(), "ema": ema.state_dict(),
                                           "optimizer": opt_t}, state, keep=cfg.keep_checkpoints)
    dist.barrier()
    return path


def _preview(out, step, model, ema, cfg, num_classes, ds, device):
    """A grid from the EMA weights on fixed seeds (one row per class when conditional)."""
    n = 8 * max(1, min(num_classes, 10)) if ds.x.ndim == 4 else 1000
    seeds = [s // 8 + (s % 8) * 1000 for s in range(n)] if num_classes else list(range(n))
    labels = torch.tensor([min(i // 8, num_classes - 1) for i in range(n)]) if num_classes else None
    with ema.swapped(model.net), torch.no_grad():
        model.eval()
        x, _ = generate(model, tuple(ds.shape), seeds, cfg.sample_sampler, cfg.sample_nfe, num_classes, labels,
                        device=str(device))
        model.train()
    path = out / "samples" / f"step-{step:08d}.png"
    path.parent.mkdir(exist_ok=True)
    if x.ndim == 4:
        datasets.save_grid(x, path, nrow=8)
    else:
        _scatter(x, ds.x, path)
    latest = out / "samples" / "latest.png"
    latest.write_bytes(path.read_bytes())
    return latest


def _scatter(x, data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.5), sharex=True, sharey=True)
    for ax, pts, title in ((axes[0], data[:1000], "data"), (axes[1], x, "samples")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_curve(log_path: Path, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
