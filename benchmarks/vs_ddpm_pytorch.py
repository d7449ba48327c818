"""unifusion's default recipe vs denoising-diffusion-pytorch (lucidrains, v2.3.4) on sklearn's
8x8 digits, at an equal CPU budget.

    python benchmarks/vs_ddpm_pytorch.py train --side ours --budget-cpu-min 10 --out runs/vs/ours
    python benchmarks/vs_ddpm_pytorch.py train --side peer --budget-cpu-min 10 --out runs/vs/peer
    python benchmarks/vs_ddpm_pytorch.py report runs/vs/ours runs/vs/peer

Run both sides in the same venv (the one with torchvision and denoising-diffusion-pytorch), so
they use the same torch build; each `train` is its own process so its budget is clean.

Both train on the same 1,500 training digits (the first 1,500 in sklearn's order; the last 297
are the held-out test split):
  * ours: `TrainConfig()` defaults (EDM, the "unet-digits" preset, class-conditional, batch 128,
    cosine LR) except out, steps, sample_every=0 and device=cpu; sampled with dpmpp_2m, 20 NFE,
    guidance scale 1 (the plain conditional model), labels seed % 10. `--unconditional` trains
    without labels, like the peer, to separate what conditioning contributes.
  * peer: its README `Trainer` example: Unet(dim=64, dim_mults=(1, 2, 4, 8)), GaussianDiffusion
    (timesteps=1000, sampling_timesteps=250 = DDIM with 250 NFE, other defaults: pred_v, sigmoid
    schedule), Trainer(train_batch_size=32, gradient_accumulate_every=2, train_lr=8e-5,
    ema_decay=0.995), fed the digits as a PNG folder (its Dataset reads **/*.png and maps
    [0, 1] -> [-1, 1] itself). Scaled to 8x8: image_size=8, channels=1 (the Trainer converts to
    'L'), and these four levels do fit 8x8 (8 -> 4 -> 2 -> 1, downsample factor 8 divides 8).
    Changed from the README: flash_attn=False and amp=False (CPU), calculate_fid=False (it
    downloads Inception weights), augment_horizontal_flip=False (its default flips, which turns
    digits into non-digits; ours does not augment), save_and_sample_every > steps (no sample
    grids or checkpoints during training). The peer is unconditional; ours uses the labels.
    `--peer-config small` swaps in Unet(dim=32, dim_mults=(1, 2)), which gets more steps.

Budget: CPU seconds of the training process *and its children* (user + sys over all threads;
the peer's DataLoader runs cpu_count() worker processes, whose CPU counts too), so the result
does not depend on other load on the machine. OMP_WAIT_POLICY defaults to PASSIVE here: with
GNU OpenMP's spinning default, 2 torch threads on a loaded 2-core machine ran 10-20x slower and
were billed for the spinning. Calibration times the whole training call, from scratch, with 5
steps (after one untimed 5-step run that pays the once-per-process costs) and with 35 steps:
the difference gives the CPU cost per step over 30 steady steps, the rest the fixed cost (data,
model build, final checkpoint and preview grid), and steps = (budget - fixed) / per_step. When
30 steps cost under 5% of the budget, a third run over ~5% of the budget refines per_step. The
real run's CPU and wall time are measured and written as they came out, overshoot included;
calibration is not charged to the budget.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

# GNU OpenMP's default busy-wait makes 2 torch threads on a busy 2-core machine 10-20x slower (the
# waiting thread spins on the core the working one needs) and bills the spinning as CPU time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402

PEER_CONFIGS = {"readme": dict(dim=64, dim_mults=(1, 2, 4, 8)), "small": dict(dim=32, dim_mults=(1, 2))}
CAL_STEPS = (5, 35)  # short and long timed runs: per-step cost = difference / 30
CAL_FRACTION = 0.05  # if 30 steps cost less than this share of the budget, measure over that many


def cpu_seconds() -> tuple[float, float]:
    """User + sys CPU seconds of this process with its reaped and live children, and of the
    children alone."""
    import psutil
    t = os.times()
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            ct = child.cpu_times()
            live += ct.user + ct.system
        except psutil.Error:  # exited meanwhile
            pass
    children = t.children_user + t.children_system + live
    return t.user + t.system + children, children


def timed(fn, *args):
    """fn(*args), CPU seconds (all), wall seconds, CPU seconds of child processes."""
    gc.collect()
    (c0, k0), w0 = cpu_seconds(), time.perf_counter()
    out = fn(*args)
    gc.collect()
    c1, k1 = cpu_seconds()
    return out, c1 - c0, time.perf_counter() - w0, k1 - k0


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ ours
def ours_side(args, out: Path) -> dict:
    from unifusion import models
    from unifusion.config import TrainConfig
    from unifusion.training.loop import train

    def run(steps: int, where: Path):
        cfg = TrainConfig(out=str(where), steps=steps, sample_every=0, device="cpu", data="digits-train",
                          seed=args.seed, class_conditional=not args.unconditional)
        return train(cfg, progress=False), cfg

    def sample(model):
        with torch.no_grad():
            x, cond = model.sample(seeds=range(args.n_samples), sampler="dpmpp_2m", nfe=20, cfg=1.0,
                                   return_cond=True)
        return x, (cond or {}).get("y")

    steps, cal = calibrate(run, args, out)
    shutil.rmtree(out / "run", ignore_errors=True)  # train() would append to an old run's log
    (_, cfg), train_cpu, train_wall, _ = timed(run, steps, out / "run")
    model = models.load(out / "run")
    (x, y), sample_cpu, sample_wall, _ = timed(sample, model)
    cfg_d = cfg.to_dict()
    summary = {k: cfg_d[k] for k in ("data", "process", "parametrization", "network", "batch_size", "lr",
                                     "lr_schedule", "warmup_steps", "ema_half_life", "class_conditional")}
    summary.update(sampler="dpmpp_2m", nfe=20, cfg_scale=1.0)
    return dict(x=x, y=y, nfe=20, steps=steps, cal=cal, train_cpu=train_cpu, train_wall=train_wall, train_child=0.0,
                sample_cpu=sample_cpu, sample_wall=sample_wall, params=n_params(model.net),
                config=summary)


# ------------------------------------------------------------------------------------ peer
def peer_side(args, out: Path) -> dict:
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet
    from unifusion import data

    folder = out / "train_png"
    if folder.exists():
        shutil.rmtree(folder)
    data.write_image_folder(data.digits(split="train"), folder)  # one subfolder per class
    unet_kw = PEER_CONFIGS[args.peer_config]
    diff_kw = dict(image_size=8, timesteps=1000, sampling_timesteps=250)
    trainer_kw = dict(train_batch_size=32, train_lr=8e-5, gradient_accumulate_every=2, ema_decay=0.995,
                      amp=False, calculate_fid=False, augment_horizontal_flip=False)

    def run(steps: int, where: Path):
        torch.manual_seed(args.seed)
        unet = Unet(**unet_kw, channels=1, flash_attn=False)
        diffusion = GaussianDiffusion(unet, **diff_kw)
        where.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(diffusion, str(folder), train_num_steps=steps, save_and_sample_every=steps + 1,
                          results_folder=str(where), **trainer_kw)
        assert len(trainer.ds) == 1500, f"the peer's Dataset found {len(trainer.ds)} images in {folder}"
        trainer.train()
        trainer.dl.close()  # shut the DataLoader workers down so their CPU time is counted
        return trainer

    def sample(ema_model, n, chunk=256):
        torch.manual_seed(args.seed)
        ema_model.eval()
        xs = [ema_model.sample(batch_size=min(chunk, n - s)) for s in range(0, n, chunk)]
        return torch.cat(xs).mul(2).sub(1).clamp(-1, 1)  # its samples are in [0, 1]

    steps, cal = calibrate(run, args, out)
    trainer, train_cpu, train_wall, train_child = timed(run, steps, out / "results")
    x, sample_cpu, sample_wall, _ = timed(sample, trainer.ema.ema_model, args.n_samples)
    summary = dict(unet={**unet_kw, "channels": 1}, diffusion={**diff_kw, "objective": "pred_v", "beta_schedule":
                   "sigmoid", "sampler": "ddim eta=0"}, trainer=trainer_kw,
                   num_workers=os.cpu_count(), ema_update_every=10, ema_update_after_step=100)
    return dict(x=x, y=None, nfe=diff_kw["sampling_timesteps"], steps=steps, cal=cal, train_cpu=train_cpu,
                train_wall=train_wall, train_child=train_child, sample_cpu=sample_cpu, sample_wall=sample_wall,
                params=n_params(trainer.ema.ema_model.model), config=summary)


# ----------------------------------------------------------------------------- shared
def calibrate(run, args, out: Path) -> tuple[int, dict]:
    """Steps such that run(steps) costs the budget, from timed runs of CAL_STEPS steps."""
    a, b = CAL_STEPS
    tmp = out / "calibration"
    # a first, unmeasured run pays the once-per-process costs (imports, kernel set-up, font cache:
    # ~3 CPU s for ours) that the real run, coming after calibration, does not pay again
    run(a, tmp / "first")
    _, ca, wa, _ = timed(run, a, tmp / f"steps{a}")
    _, cb, wb, _ = timed(run, b, tmp / f"steps{b}")
    per_step = max((cb - ca) / (b - a), 1e-6)
    budget = args.budget_cpu_min * 60
    if cb - ca < CAL_FRACTION * budget and a + CAL_FRACTION * budget / per_step > 2 * b:
        # cheap steps: the fixed cost's noise would swamp 30 of them; refine over more steps
        b = a + int(CAL_FRACTION * budget / per_step)
        _, cb, wb, _ = timed(run, b, tmp / f"steps{b}")
        per_step = max((cb - ca) / (b - a), 1e-6)
    shutil.rmtree(tmp, ignore_errors=True)
    fixed = max(ca - a * per_step, 0.0)
    steps = max(1, round((budget - fixed) / per_step))
    cal = dict(steps=[a, b], cpu_s=[ca, cb], wall_s=[wa, wb], per_step_cpu_s=per_step,
               per_step_wall_s=(wb - wa) / (b - a), fixed_cpu_s=fixed)
    print(f"calibration: {per_step:.4f} CPU s/step, {fixed:.2f} CPU s fixed -> {steps} steps for "
          f"{budget:.0f} CPU s", flush=True)
    return steps, cal


def cmd_train(args) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = (ours_side if args.side == "ours" else peer_side)(args, out)
    arrays = {"x": res["x"].float().numpy().astype(np.float32)}
    if res["y"] is not None:
        arrays["y"] = res["y"].numpy().astype(np.int64)
    np.savez(out / "samples.npz", **arrays)
    budget = args.budget_cpu_min * 60
    name = f"peer-{args.peer_config}" if args.side == "peer" else "ours-uncond" if args.unconditional else "ours"
    timing = dict(side=args.side, name=name,
                  steps=res["steps"], budget_cpu_s=budget, train_cpu_s=res["train_cpu"],
                  train_wall_s=res["train_wall"], train_cpu_children_s=res["train_child"],
                  budget_ratio=res["train_cpu"] / budget,
                  sample_cpu_s=res["sample_cpu"], sample_wall_s=res["sample_wall"], nfe=res["nfe"], n=args.n_samples,
                  params=res["params"], calibration=res["cal"], config=res["config"],
                  threads=args.threads, omp_wait_policy=os.environ["OMP_WAIT_POLICY"],
                  cpu_count=os.cpu_count(), torch=torch.__version__, seed=args.seed)
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    print(f"{timing['name']}: {res['steps']} steps, train {res['train_cpu']:.1f} CPU s "
          f"({100 * timing['budget_ratio']:.1f}% of budget), {res['train_wall']:.1f} wall s; "
          f"sampling {args.n_samples}: {res['sample_cpu']:.1f} CPU s, {res['sample_wall']:.1f} wall s; "
          f"{res['params']:,} params -> {out}")
    return 0


def plot_samples(rows: list[dict], path: Path, k: int = 100) -> None:
    """The first k samples of each side, side by side, titled with its FID."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 4.0))
    for ax, r in zip(np.atleast_1d(axes), rows):
        with np.load(Path(r["dir"]) / "samples.npz") as s:
            x = s["x"][:k, 0]
        side = int(np.ceil(np.sqrt(len(x))))
        tiles = np.ones((side * 9 + 1, side * 9 + 1))  # 8x8 digits, 1 px white gaps
        for i, im in enumerate(x):
            row, col = divmod(i, side)
            tiles[1 + 9 * row:9 + 9 * row, 1 + 9 * col:9 + 9 * col] = (im + 1) / 2
        ax.imshow(tiles, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        kind = "unconditional" if r["accuracy"] is None else "class-conditional, label = column"
        ax.set_title(f"{r['name']}: {r['params'] / 1e6:.2f}M params, {r['steps']} steps\n"
                     f"FID {r['fid']:.2f} (n={r['n']}), {r['nfe']} NFE\n{kind}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def cmd_report(args) -> int:
    import dataclasses
    from unifusion.evaluation import evaluate as E
    from unifusion.evaluation import features
    # the same reference and scores as `unifusion eval` (digits-CNN features of the training split)
    ref = E.reference("digits-train", {}, features.digits_features(), Path(args.dirs[0]).resolve().parent)

    def scores(x, y) -> dict:
        row = dataclasses.asdict(E.score(x, y, ref, dict(sampler="", nfe=0, grid="", cfg_scale=1.0, seconds=0.0)))
        return {k: row[k] for k in ("fid", "kid", "precision", "recall", "copy_rate", "accuracy")}

    test = ref.held_out
    rows = [dict(name="data: test split", n=len(test), **scores(test.x, test.y))]
    for d in map(Path, args.dirs):
        t = json.loads((d / "timing.json").read_text())
        with np.load(d / "samples.npz") as s:
            x = torch.from_numpy(s["x"])[:args.n]
            y = torch.from_numpy(s["y"])[:args.n] if "y" in s.files else None
        t["n"] = len(x)
        rows.append(dict(dir=str(d), **t, **scores(x, y)))
    cols = [("name", "side", "{}"), ("n", "n", "{}"), ("steps", "steps", "{}"), ("params", "params (M)", "{:.2f}"),
            ("train_cpu_s", "train CPU min", "{:.2f}"), ("budget_ratio", "% of budget", "{:.0f}"),
            ("train_wall_s", "train wall min", "{:.2f}"),
            ("fid", "FID", "{:.2f}"), ("kid", "KID x1e3", "{:.2f}"), ("precision", "precision", "{:.3f}"),
            ("recall", "recall", "{:.3f}"), ("copy_rate", "copy rate", "{:.3f}"),
            ("accuracy", "class acc", "{:.3f}"), ("nfe", "NFE", "{}"), ("sample_wall_s", "sample wall s", "{:.1f}")]
    scale = {"params": 1e-6, "train_cpu_s": 1 / 60, "train_wall_s": 1 / 60, "kid": 1e3, "budget_ratio": 100}
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [("-" if r.get(k) is None else fmt.format(r[k] * scale.get(k, 1))) for k, _, fmt in cols]
        print("| " + " | ".join(cells) + " |")
    print(f"\nFID/KID/precision/recall in the digits-CNN feature space vs the {len(ref.train)} training digits; "
          "copy rate in pixel space vs the same; the first row scores the 297 held-out test digits as if they "
          "were samples, a reference point (FID is biased upwards at small n, so compare rows of equal n).")
    path = Path(args.json) if args.json else Path(args.dirs[0]).resolve().parent / "report.json"
    path.write_text(json.dumps(rows, indent=1))
    grid = path.with_suffix(".png")
    plot_samples(rows[1:], grid)
    print(f"wrote {path} and {grid}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one side for a CPU budget, sample, write samples.npz + timing.json")
    t.add_argument("--side", choices=("ours", "peer"), required=True)
    t.add_argument("--budget-cpu-min", type=float, required=True, help="training budget in CPU minutes")
    t.add_argument("--out", required=True, help="output folder for this side")
    t.add_argument("--n-samples", type=int, default=1500)
    t.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    t.add_argument("--peer-config", choices=sorted(PEER_CONFIGS), default="readme",
                   help="readme: Unet(dim=64, dim_mults=(1,2,4,8)); small: Unet(dim=32, dim_mults=(1,2))")
    t.add_argument("--unconditional", action="store_true",
                   help="ours: train without labels (class_conditional=False), like the peer")
    t.add_argument("--seed", type=int, default=0, help="training seed (ours: TrainConfig.seed; peer: torch seed "
                   "for init, data order and sampling)")
    r = sub.add_parser("report", help="metrics of each side's samples; a markdown table and report.json")
    r.add_argument("dirs", nargs="+", help="output folders of `train`")
    r.add_argument("--json", help="where to write the report (default: next to the first folder)")
    r.add_argument("--n", type=int, default=None, help="score only each side's first N samples (equal n)")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
