"""The training loop: one visible function (nanoGPT's train.py is the model). It knows no
process math: it calls `model.loss` and nothing else of the model.

Every random draw of step k comes from generators seeded by (seed, k): the data order
(data/order.py), and the model's per-example draws (noise levels, noise, condition dropout),
which are drawn for the whole global batch by `model.random` and then split over ranks. So a
resumed run only needs weights, optimizer, EMA and the step to continue bit-identically, and K
ranks see exactly the examples and draws of one rank with the same global batch. Network
dropout (the networks' own nn.Dropout, off in the default presets) is the exception: its masks
come from the per-rank global RNG seeded by (seed, step, rank), so with it K ranks equal one
rank only in distribution, not bit for bit.
"""
from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import config as C
from .. import data as datasets
from .. import models
from .. import safeio
from ..safeio import atomic_path
from .. import checkpoint
from . import distributed, run_dir
from ..networks.layers import use_tf32
from .ema import EMA, POSTHOC_PREFIX as POSTHOC_DIR, PowerEMA


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


# with several ranks, how often (in steps) they agree whether a signal asked them to stop (a collective)
STOP_EVERY = 10


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (torchrun, SLURM, Kubernetes) set a flag; the loop saves a
    checkpoint at the end of the step and stops. A second Ctrl-C stops at once.

    A repeated SIGTERM only sets the flag again: schedulers escalate with SIGKILL, not a second
    SIGTERM, and Linux sends the parent-death SIGTERM (distributed._die_with_launcher) once per
    exiting thread of a killed multi-threaded launcher, so one kill -9 of torchrun can deliver
    it two or more times in a row."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.hit, self._old = False, {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.hit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: C.TrainConfig, progress: bool = True) -> dict:
    """Train as `cfg` says; returns where the outputs went (and 'interrupted': bool)."""
    cfg.validate()
    dist = distributed.setup(cfg.device, sharding=cfg.sharding)
    distributed.set_threads(cfg.threads, dist.device)
    out = Path(cfg.out)
    lock, refusal = None, None
    if dist.rank == 0:
        try:
            lock = run_dir.RunLock(out).acquire()
        except (ValueError, OSError) as e:
            refusal = e
    try:
        _agree(dist, refusal)
        result = _train(cfg, dist, out, progress, lock)
        if cfg.calibrate and dist.rank == 0 and not result["interrupted"]:
            result["calibration"] = calibrate_model(Path(result["model"]), dist.device, progress)
        return result
    except BaseException:
        if lock is not None and not lock.committed:  # refused before writing: the folder as it was
            lock.discard()
        raise
    finally:
        if lock is not None:
            lock.release()
        dist.cleanup()


def _train(cfg, dist, out: Path, progress: bool, lock=None) -> dict:
    """Everything is checked (folder, resume, data, spec, teacher, --init-from, network, the first
    batch) before rank 0 writes anything into `out` (DESIGN §2): a refused run leaves it as it was."""
    device, rank, world = dist.device, dist.rank, dist.world_size
    if cfg.compile == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"--compile reduce-overhead replays the step as CUDA graphs and needs a CUDA device; this "
                         f"run is on {device.type}: use --compile default (or true) there")
    use_tf32(device)  # fp32 matmuls and convolutions in TF32 on CUDA (networks.layers.use_tf32)
    last = checkpoint.latest(out) if cfg.resume else None
    refusal = None
    if rank == 0:
        try:
            run_dir.check(out, cfg.resume, cfg.overwrite)
            stored = run_dir.stored_config(out) if cfg.resume else None
            if stored is not None:  # the same run, or refuse (config.resumed merges the CLI's flags)
                _check_same_run(cfg, stored, out)
        except (ValueError, OSError) as e:
            refusal = e
    _agree(dist, refusal)

    # ---- resume: the stored config must describe the same run (config.resumed merges the CLI's flags)
    tensors, state, start = {}, {}, 0
    if cfg.resume and last is None and rank == 0:
        print(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting from step 0")
    if last is not None:
        tensors, state = checkpoint.load(last)
        if "spec" not in state or "config" not in state:
            raise ValueError(f"cannot resume from {last}: its state.json has no config/spec (written by an "
                             "older unifusion, or edited by hand); start a new run with --overwrite")
        start = state["step"]
        if start > cfg.steps:
            raise ValueError(f"the run in {out} is already at step {start}, beyond --steps {cfg.steps}; to train "
                             f"further, resume with a larger --steps")

    lo, hi = dist.min_max(start)
    if lo != hi:  # e.g. nodes with their own local --out: rank 0 resumes, the others start over
        raise ValueError(f"the ranks resume from different steps ({lo} to {hi}): --out {out} must be one folder that "
                         "every node mounts (rank 0 writes the checkpoints, every rank reads them)")

    # ---- data and model (a resumed run keeps the spec it was started with)
    source = datasets.load(cfg.data, **C.data_options(cfg))
    B = cfg.batch_size
    if B % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {B} must be divisible by ranks x --grad-accum = {world} x {cfg.grad_accum}")
    micro = B // (world * cfg.grad_accum)
    spec = models.ModelSpec.from_dict(state["spec"]) if state else C.model_spec(cfg, source)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run with this seed
    model = models.build(spec).to(device)
    if cfg.calibrate:  # refused now, not after training
        check_calibrate(model)
    source = model.data_source(source)  # e.g. captions in the items for the text families
    if state:  # into the whole model, before any sharding
        models.io.load_weights(model, tensors["model"], str(last))
    elif cfg.init_from:  # e.g. a reflow student starting from its teacher
        _init_from(model, cfg.init_from)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and device.type == "cuda" else None
    if cfg.precision == "fp16" and scaler is None:
        raise ValueError("--precision fp16 needs a CUDA device (use bf16 on CPU)")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
           else torch.autocast(device.type, dtype=torch.float16) if cfg.precision == "fp16" else nullcontext())
    log_path = out / "log.jsonl"

    batches = datasets.StepBatches(source, cfg.seed, B, world, rank, start, cfg.num_workers, end_step=cfg.steps)
    first = None
    if start < cfg.steps:  # (a run killed after its last checkpoint resumes straight to its final outputs)
        first = next(batches)
        datasets.check_batch(first, need_cond=spec.num_classes > 0)
        if cfg.reflow and "noise" not in first:
            raise ValueError(f"--reflow trains on noise-data couplings, but --data {cfg.data} has no noise; make "
                             "couplings with `unifusion couple --checkpoint TEACHER --out DIR` and train on DIR")
        if not state:  # data-dependent initialisation (Glow's ActNorm), on the global batch under DDP
            model.initialize(_to(first, device))
        _check_model_takes(model, first, spec, device)

    # ---- checked: now rank 0 writes (an --overwrite deletes the old run only here)
    refusal = None
    if rank == 0:
        if lock is not None:
            lock.committed = True
        try:
            run_dir.prepare(out, cfg.resume, cfg.overwrite)
            C.save(cfg, out / run_dir.CONFIG)
            run_dir.truncate_log(log_path, start)
            run_dir.truncate_snapshots(out / POSTHOC_DIR, start)
        except (ValueError, OSError) as e:
            refusal = e
    _agree(dist, refusal)  # also the barrier: the folder is ready for every rank
    # FSDP shards `model` in place: its parameters become DTensor shards, so the optimizer and the
    # EMAs come after this and hold shards too (EMA updates are then local, elementwise: exact);
    # saved state is gathered whole (dist.full) and loaded back as shards (dist.local)
    if cfg.channels_last:  # NHWC convolution weights (and so activations); the optimizer and EMAs follow
        model.to(memory_format=torch.channels_last)
    net = dist.wrap(model, compile=cfg.compile, precision=cfg.precision)
    opt = _optimizer(model, cfg)
    ema = EMA(model, cfg.ema_half_life)  # after the initialisation, so the average starts from it
    posthoc = PowerEMA(model, C.posthoc_stds(cfg.posthoc_stds)) if cfg.posthoc_every else None
    if state:
        opt.load_state_dict(dist.local_optimizer_state(
            checkpoint.optimizer_from_tensors(tensors["optimizer"], state["optimizer"]), opt))
        _match_layouts(opt)
        ema.load_state_dict(dist.local(tensors["ema"], ema.shadow))
        if posthoc is not None:
            posthoc.load_state_dict(dist.local(tensors["posthoc"], posthoc.snapshot()[0]))
        if rank == 0:
            print(f"resumed from {last} at step {start}")
    tb = _tensorboard(out) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    # The step never waits for the device (DESIGN §4.14): finiteness, the skip of a bad step's update, the
    # bad-step count and the loss stay device tensors, read together at log steps and at checkpoints. So
    # --max-bad-steps aborts at the first log step after that many non-finite steps in a row.
    bad = state.get("bad_steps", 0)
    bad_run = torch.tensor(bad, device=device)  # non-finite steps in a row
    worst = bad_run.clone()  # the longest such run since the last read
    loss_sum, n_loss = torch.zeros((), device=device), 0
    t0, last_ckpt, interrupted, ahead = time.time(), last, False, None
    with _Interrupt() as stop, batches:
        for step in range(start, cfg.steps):
            local = first if step == start else next(batches)
            # -- the global batch's draws from (seed, step), this rank's rows (module docstring); on CUDA
            # drawn a step ahead and copied without blocking
            draws = ahead if ahead is not None else _draws(model, cfg.seed, step, B, rank, world, device)
            draws = {k: v for k, v in draws.items() if k not in local}
            torch.manual_seed(_seed(cfg.seed, step, rank, 2))  # network dropout (see the docstring)
            for gr in opt.param_groups:
                gr["lr"] = lr_at(cfg, step)

            if cfg.compile == "reduce-overhead":  # a new step: the CUDA graphs' previous outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            total = torch.zeros((), device=device)
            for m in range(cfg.grad_accum):
                rows = slice(m * micro, (m + 1) * micro)
                batch = {**_to_device(_rows(local, rows), device), **_rows(draws, rows)}
                sync = dist.no_sync(net) if m < cfg.grad_accum - 1 else nullcontext()
                with sync:  # the backward too: FSDP decides whether to reduce-scatter in backward
                    with amp:
                        loss = net(batch).mean() / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                total += loss.detach()
            total = dist.mean(total)

            # -- the update, skipped on the device when the loss is not finite: the optimizer state, the
            # weights and both EMAs are then exactly as if the step had not happened
            ok = torch.isfinite(total)
            if scaler:  # NaN gradients make the scaler skip the step (and back off its scale)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, torch.where(ok, 1.0, math.nan))
                scaler.unscale_(opt)
            if cfg.grad_clip > 0:  # the norm stays on the device
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            elif all(g.get("fused") for g in opt.param_groups):
                opt.found_inf = (~ok).float()  # fused AdamW skips the update and takes back its step count
                opt.step()
            elif ok:  # no found_inf (e.g. resumed from a checkpoint of the unfused AdamW): a host read
                opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, B, ok)
            if posthoc is not None:
                posthoc.update(model, ok)
            bad_run = torch.where(ok, 0, bad_run + 1)
            worst = torch.maximum(worst, bad_run)
            loss_sum += total
            n_loss += 1
            done = step + 1
            if device.type == "cuda" and done < cfg.steps:
                ahead = _draws(model, cfg.seed, done, B, rank, world, device)

            if done % cfg.log_every == 0 or done == cfg.steps:  # every rank reads: they agree on aborting
                mean, bad, longest = torch.stack([loss_sum / n_loss, bad_run.float(), worst.float()]).tolist()
                bad, longest = int(bad), int(longest)
                loss_sum.zero_()
                n_loss, worst = 0, bad_run.clone()
                if longest >= cfg.max_bad_steps:
                    raise RuntimeError(f"the loss was not finite for {cfg.max_bad_steps} steps in a row (read at "
                                       f"step {done}); lower --lr, check the data for NaN, or use --precision fp32")
                if done == cfg.steps and bad == state.get("bad_steps", 0) + done - start:
                    raise RuntimeError(f"no step of this run had a finite loss ({done - start} steps, every update "
                                       "skipped); lower --lr, check the data for NaN, or use --precision fp32")
                if rank == 0:
                    rec = {"step": done, "loss": mean, "lr": lr_at(cfg, step), "bad_steps": bad,
                           "time": round(time.time() - t0, 4)}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if tb is not None:
                        tb.add_scalar("loss", rec["loss"], done)
                        tb.add_scalar("lr", rec["lr"], done)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update(1)
            if posthoc is not None and (rank == 0 or dist.sharded) and done % cfg.posthoc_every == 0:
                tensors_, meta_ = posthoc.snapshot()
                tensors_ = dist.full(tensors_)  # FSDP: every rank gathers, rank 0 gets full tensors
                if rank == 0:
                    safeio.save_safetensors(tensors_, out / POSTHOC_DIR / f"step-{done:08d}.safetensors", meta_)
            # one process reads its own flag; ranks agree (a collective) every STOP_EVERY steps and at checkpoints,
            # so every rank stops at the same step
            save = done % cfg.checkpoint_every == 0 or done == cfg.steps
            stop_now = (not dist.enabled or save or done % STOP_EVERY == 0) and dist.any(stop.hit)
            if save or stop_now:
                last_ckpt = _save(out, done, model, ema, opt, cfg, int(bad_run), dist, posthoc)
            if (rank == 0 or dist.sharded) and cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps \
                    and model.previews:
                whole, whole_ema = _unsharded(model, ema, dist)
                if rank == 0:
                    _preview(out, done, whole, whole_ema, cfg, source)
            if stop_now:
                interrupted = True
                break
    bar.close()
    if tb is not None:
        tb.close()
    result = {"out": str(out), "log": str(log_path), "checkpoint": str(last_ckpt) if last_ckpt else None,
              "interrupted": interrupted, "rank": rank}
    if not interrupted and (rank == 0 or dist.sharded):
        whole, whole_ema = _unsharded(model, ema, dist)
        if rank == 0:
            result["samples"] = str(_preview(out, cfg.steps, whole, whole_ema, cfg, source)) if whole.previews else None
            result["loss_curve"] = str(log_curve(log_path, out / "loss.png"))
            result["model"] = str(models.save(whole, out / "model", whole_ema.state_dict()))
    return result


def check_calibrate(model) -> tuple[str, int]:
    """The (sampler, NFE) --calibrate fits for this model: its default pair; ValueError when there
    is no grid to fit (a one-pass family, a few-step student on its own levels, a stochastic sampler)."""
    if model.one_pass or not callable(getattr(model, "calibration_pair", None)):
        raise ValueError(f"--calibrate fits a sampler's noise grid; the {model.spec.family} family has none "
                         "(it samples in one pass, or does not sample): drop --calibrate")
    if (model.spec.training or {}).get("objective", {}).get("sampler"):
        raise ValueError("--calibrate: a few-step student samples on its own levels; drop --calibrate (or calibrate "
                         "another sampler afterwards with `unifusion calibrate --save-to-model`)")
    try:
        return model.calibration_pair()
    except ValueError as e:
        raise ValueError(f"--calibrate: {e}") from None


# train --calibrate's second try when the reference solve does not converge (a stiff learned denoiser near
# sigma_min, e.g. an eps-parametrized DDPM toy): the tolerance a float32 network resolves, 4x the calls
LOOSE_REFERENCE = {"rtol": 1e-5, "atol": 1e-5, "max_nfe": 16000}


def calibrate_model(folder: Path, device, progress: bool = True) -> dict:
    """`train --calibrate`: the grid of the model's default (sampler, NFE) fitted to the saved model
    (its EMA weights) and stored in its spec.json, where default sampling finds it. A model that
    already holds it is left alone: a resumed run rewrites the model folder with the same weights,
    and models.save keeps their calibrations. A reference solve that does not converge is tried
    again with LOOSE_REFERENCE; if that fails too, the model stays uncalibrated (the training's
    outputs are whole) and the reason is printed."""
    from ..samplers.calibrate import ReferenceNotConverged
    model = models.load(folder, device=device)
    sampler, nfe = check_calibrate(model)
    key = models.spec.calibration_key(sampler, nfe)
    if model.spec.calibration(sampler, nfe, *model.spec.sigma_range()) is not None:
        print(f"calibrate: {folder / models.io.SPEC_FILE} already holds the grid of {sampler} at NFE {nfe} for these "
              f"weights; kept (`unifusion calibrate --checkpoint {folder} --sampler {sampler} --nfe {nfe} "
              "--save-to-model` fits it again)")
        return {"key": key, "fitted": False}
    try:
        cal = model.calibrate(progress=progress)
    except ReferenceNotConverged:
        print(f"calibrate: the reference solve did not converge at the default tolerance; trying {LOOSE_REFERENCE}")
        try:
            cal = model.calibrate(reference=LOOSE_REFERENCE, progress=progress)
        except ReferenceNotConverged as e:
            print(f"calibrate: not calibrated, the model samples on its own grid ({str(e).splitlines()[0]}); try "
                  f"`unifusion calibrate --checkpoint {folder} --save-to-model` with another --sampler or --nfe")
            return {"key": key, "fitted": False, "error": str(e)}
    spec = model.spec
    spec.calibrated[key] = cal.to_dict()
    models.io.save_spec(folder, spec)
    base = min((k for k in cal.rmse_val if k != "calibrated"), key=cal.rmse_val.get)
    print(f"calibrate: {sampler} at NFE {nfe} in {cal.seconds['total']:.0f} s, held-out RMSE "
          f"{cal.rmse_val['calibrated']:.3g} vs {base} {cal.rmse_val[base]:.3g} "
          f"({cal.rmse_val['calibrated'] / cal.rmse_val[base]:.2f}x); the default grid of "
          f"{folder / models.io.SPEC_FILE}")
    return {"key": key, "fitted": True, "rmse_val": cal.rmse_val, "seconds": cal.seconds}


def _unsharded(model, ema, dist):
    """(model, ema) as the one-process code paths (preview, models.save) take them. Under FSDP a
    collective, so every rank calls it: the weights and the EMA are gathered whole, and rank 0
    gets a plain (unsharded) copy of the model holding them and an EMA over that copy; the other
    ranks get (None, None). Otherwise the arguments themselves."""
    if not dist.sharded:
        return model, ema
    weights, shadow = dist.full(model.state_dict()), dist.full(ema.state_dict())
    if dist.rank != 0:
        return None, None
    whole = models.build(model.spec).to(dist.device)
    models.io.load_weights(whole, weights, "the gathered FSDP shards")
    whole_ema = EMA(whole, ema.half_life, ema.warmup_ratio)
    whole_ema.load_state_dict(shadow)
    return whole, whole_ema


def _init_from(model, path) -> None:
    """Load another model's weights (its EMA when it has one) into a new run's model."""
    spec, weights, ema, info = models.read(path)
    chosen = ema if ema is not None else weights
    try:
        models.io.load_weights(model, chosen, info["where"])
    except ValueError as e:
        raise ValueError(f"--init-from {path}: {e}; give a model with this run's network (the same --network "
                         "and --network.X arguments)") from None


def _agree(dist, refusal: Exception | None) -> None:
    """Rank 0 checks the run folder; its refusal ends every rank at once with the same cause,
    instead of leaving the others waiting for the collective timeout."""
    if dist.any(refusal is not None):
        if refusal is not None:
            raise refusal
        raise ValueError("rank 0 refused to start this run; its message above says why")


def _check_same_run(cfg, stored: dict, out: Path) -> None:
    differ = C.unsafe_changes(cfg, stored)
    if differ:
        raise ValueError(f"cannot resume {out}: the run was started with other "
                         f"{', '.join(C.flag(k) for k in differ)}; resume with `unifusion train --out {out} "
                         f"--resume` alone, or start a new run in another --out")


def _rows(batch: dict, sl) -> dict:
    return {k: _rows(v, sl) if isinstance(v, dict) else v[sl] for k, v in batch.items()}


def _to(batch: dict, device) -> dict:
    """Tensors to the device (nested dicts alike); other values (a list of captions) as they are."""
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _to_device(batch: dict, device) -> dict:
    """_to, but on CUDA from pinned memory and without blocking (a copy from pageable memory can wait
    for the device)."""
    if device.type != "cuda":
        return _to(batch, device)

    def move(v):
        if not isinstance(v, torch.Tensor):  # other values (a list of captions) as they are
            return v
        pinned = v if v.device.type != "cpu" or v.is_pinned() else v.contiguous().pin_memory()
        return pinned.to(device, non_blocking=True)
    return {k: _to_device(v, device) if isinstance(v, dict) else move(v) for k, v in batch.items()}


def _draws(model, seed: int, step: int, B: int, rank: int, world: int, device) -> dict:
    """Step `step`'s per-example draws: the global batch's from (seed, step) on a CPU generator, then this
    rank's rows, on the device."""
    draws = model.random(B, torch.Generator().manual_seed(_seed(seed, step)))
    return _to_device({k: v[rank::world] for k, v in draws.items()}, device)


def _optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel per parameter group) where every parameter is a floating tensor on the CPU or
    a CUDA device; the loop hands a fused AdamW found_inf, which skips a bad step's update on the device
    (state and step count untouched). Otherwise (other devices) foreach, and the skip reads the flag."""
    params = list(model.parameters())
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))


def _match_layouts(opt) -> None:
    """Optimizer state in its parameter's memory format (loaded state is contiguous; a channels_last
    parameter's moments must be channels_last too: the fused AdamW walks all of them as flat memory)."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _tensorboard(out: Path):
    """A SummaryWriter when tensorboard is installed, else None (the JSONL log is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # tensorboard missing or broken: not needed
        return None


def _check_model_takes(model, batch, spec, device):
    """One forward pass on two examples before step 0: a network that cannot take the data fails
    here with the shapes named, not deep inside step 0."""
    two = _to(_rows(batch, slice(0, 2)), device)
    try:
        with torch.no_grad():
            loss = model.loss(two, torch.Generator().manual_seed(0))
    except Exception as e:
        raise ValueError(f"network {spec.network['class']} does not accept data of shape {spec.shape}: {e}; "
                         "pick a --network preset for this data or set --network.in_channels etc.") from e
    if loss.shape != (2,):
        raise ValueError(f"the model's loss has shape {tuple(loss.shape)}, expected (2,) for two examples")


def _save(out, step, model, ema, opt, cfg, bad, dist, posthoc=None):
    """Rank 0 writes full tensors; under FSDP every rank first takes part in gathering them, so a
    checkpoint has the same files and keys whatever the sharding and the number of ranks."""
    path = None
    if dist.rank == 0 or dist.sharded:
        parts = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
        if posthoc is not None:
            parts["posthoc"] = posthoc.state_dict()
        parts = dist.full(parts)
    if dist.rank == 0:
        opt_t, opt_meta = checkpoint.optimizer_to_tensors(parts.pop("optimizer"))
        state = {"step": step, "config": cfg.to_dict(), "spec": model.spec.to_dict(), "optimizer": opt_meta,
                 "bad_steps": bad}
        groups = {"model": parts["model"], "ema": parts["ema"], "optimizer": opt_t}
        if posthoc is not None:
            groups["posthoc"] = parts["posthoc"]
        path = checkpoint.save(out, step, groups, state, keep=cfg.keep_checkpoints)
    dist.barrier()
    return path


def _preview(out, step, model, ema, cfg, source):
    """A grid from the EMA weights on fixed seeds (one row per class when class-conditional, one
    per preview caption when text-conditional; an autoencoder's: the first training images above
    their reconstructions)."""
    k = model.spec.num_classes
    texts = model.spec.conditioning.get("preview_prompts") or []
    rows = max(1, min(k, 10)) if k else max(1, len(texts))
    image = len(model.spec.shape) == 3
    n = 8 * rows if image else 1000
    seeds = [s // 8 + (s % 8) * 1000 for s in range(n)] if k or texts else list(range(n))
    cond = ({"y": torch.tensor([min(i // 8, k - 1) for i in range(n)])} if k else
            {"caption": [texts[min(i // 8, len(texts) - 1)] for i in range(n)]} if texts else None)
    with ema.swapped(model), torch.no_grad():
        model.eval()
        if hasattr(model, "preview_images"):  # an autoencoder: training images above their reconstructions
            x = model.preview_images(source, n)
        else:
            # the flags' defaults mean the model's own default sampler and NFE
            own = (cfg.sample_sampler, cfg.sample_nfe) == models.spec.DEFAULT_SAMPLING
            x = model.sample(seeds=seeds, sampler=None if own else cfg.sample_sampler,
                             nfe=None if own else cfg.sample_nfe, cond=cond)
        model.train()
    path = out / "samples" / f"step-{step:08d}.png"
    if image:
        datasets.save_grid(x, path, nrow=8)
    else:
        _scatter(x, source.arrays(1000)[0], path)
    latest = out / "samples" / "latest.png"
    with atomic_path(latest) as tmp:
        tmp.write_bytes(path.read_bytes())
    return latest


def _scatter(x, data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.5), sharex=True, sharey=True)
    for ax, pts, title in ((axes[0], data, "data"), (axes[1], x, "samples")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def log_curve(log_path: Path, png: Path, key: str = "loss", ylabel: str = "training loss", xlabel: str = "step",
              log_scale: bool = True) -> Path:
    """A PNG of one log.jsonl column against the step (the training loss; fine-tuning's reward)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in recs], [r[key] for r in recs])
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return png
