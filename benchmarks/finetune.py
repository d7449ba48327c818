"""Reward fine-tuning benchmark (issue 23): DDPO, GRPO (Flow-GRPO) and DRaFT-K at equal CPU time.

Part 1, the analytic check. The reference is *exact*: a flow-matching model on a 2-D Gaussian
mixture (5 anisotropic components on the unit circle) whose denoiser is the mixture's closed form
plus a residual MLP that starts at zero (the family `mixture-residual` below, registered in this
process: D = D_exact + c(sigma) F(x, sigma), c = sigma / sqrt(1 + sigma^2), so the residual shrinks
like the c_out of the EDM / flow parametrizations at low noise). The reward is the built-in
quadratic r(x) = -||x - (1, 0.3)||^2 / 2. The optimum of E[r] - beta KL is the tilted density
p* = p_ref exp(r / beta) / Z, again a Gaussian mixture (rewards.Quadratic.tilt), so exact samples
of it exist. Each method fine-tunes the residual for the same CPU budget (with an EMA of the
weights), sampling with its own policy sampler at NFE 40 (the flow-matching uniform-t grid); its
samples (n = 4000) are compared with exact samples of p* by sliced W2 (mean over 4 exact sets),
against the floor of exact vs exact sets of the same size. Also: E[r], the path KL to the reference
and the objective J = E[r] - beta KL against the optimum J* = beta log Z (with E_p*[r] and
KL(p* || p_ref), computed from the mixture).

Part 2, digits. A class-conditional EDM model (the default recipe, shortened) is fine-tuned for
the shipped classifier's log p(label | x) ("prompt alignment"; `--reward classifier`), each method
with `unifusion finetune` in a subprocess for the same CPU budget (os.wait4 gives the child's CPU
time and peak RSS). At 5 checkpoints: mean reward and class accuracy of 1000 samples (seeds 0..999,
label seed % 10, the method's own sampler at NFE 10), FID of those against the reference's samples
(same seeds, same sampler: the drift) and against the training digits (digits-classifier
features), and the path KL to the reference under one common sampler (flow_sde, NFE 10). Then
seconds per step and peak memory per method, with DRaFT-10 with and without gradient checkpointing.

    python benchmarks/finetune.py                # the full budgets (about 25 CPU-minutes, one thread)
    python benchmarks/finetune.py --quick        # a smoke test with tiny budgets (about 2 minutes)

Writes finetune.md / finetune.json into --out and the plots docs/finetune_toy.png and
docs/finetune_digits.png (with --docs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread setting)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import table  # noqa: E402

from unifusion import config as C  # noqa: E402
from unifusion import data as datasets  # noqa: E402
from unifusion import models, rewards  # noqa: E402
from unifusion.evaluation.metrics import fid, sliced_w2  # noqa: E402
from unifusion.evaluation.mixture import GaussianMixture  # noqa: E402
from unifusion.models import DiffusionModel  # noqa: E402
from unifusion.samplers import logprob as LP  # noqa: E402
from unifusion.training import finetune as FT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CENTER, SCALE, BETA = [1.0, 0.3], 1.0, 1.0


# ------------------------------------------------------------------------------ the exact reference
def mixture():
    """5 anisotropic Gaussians (stds 0.15..0.30) with equal weights, means on the unit circle."""
    K = 5
    ang = torch.arange(K) * 2 * math.pi / K
    means = torch.stack([ang.cos(), ang.sin()], 1).double()
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(K, 2, 2, generator=g, dtype=torch.float64))
    lam = (0.15 + 0.15 * torch.rand(K, 2, generator=g, dtype=torch.float64)) ** 2
    return torch.ones(K, dtype=torch.float64), means, Q @ torch.diag_embed(lam) @ Q.transpose(1, 2)


class MixtureResidual(DiffusionModel):
    """D = D_exact + c(sigma) F: the exact mixture denoiser (spec.training["mixture"]) plus a residual
    network, zero at the start (its output layer is zeroed), so the model starts as the exact reference."""
    family = "mixture-residual"

    def __init__(self, spec):
        super().__init__(spec)
        m = spec.training["mixture"]
        self.__dict__["gm"] = GaussianMixture(torch.tensor(m["weights"]), torch.tensor(m["means"]),
                                              torch.tensor(m["covs"]))

    def denoise(self, x, sigma, **cond):
        c = torch.where(torch.isinf(sigma), 1.0, sigma / (1 + sigma**2).sqrt()).to(x.dtype)[:, None]
        return self.gm.denoise(x.double(), sigma.double()).to(x.dtype) + c * super().denoise(x, sigma, **cond)


models.register("mixture-residual", MixtureResidual)


def toy_reference(folder: Path) -> Path:
    w, mu, S = mixture()
    cfg = C.from_dict({"data": "gmm", "network": "mlp-2d", "network_args": {"hidden": 128, "depth": 3, "emb_dim": 64},
                       "process": "flow", "parametrization": "x0", "noise_density": "uniform_t",
                       "class_conditional": False, "out": str(folder)})
    spec = C.model_spec(cfg, datasets.load("gmm"))
    spec.family = "mixture-residual"
    spec.training = {**spec.training, "mixture": {"weights": w.tolist(), "means": mu.tolist(), "covs": S.tolist()}}
    spec.data = {**spec.data, "range": None}  # no clipping: the mixture's tails reach beyond [-1, 1]
    torch.manual_seed(0)
    model = models.build(spec.validate())
    with torch.no_grad():
        model.net.out.weight.zero_()
        model.net.out.bias.zero_()
    return models.save(model, folder)


def toy_truth(n: int, sets: int):
    """Exact samples of p* (sets + 1 of n), the floor, and the optimum (E_p*[r], KL(p*||p_ref), J* = beta log Z)."""
    w, mu, S = mixture()
    gm = GaussianMixture(w, mu, S)
    r = rewards.Quadratic(torch.tensor(CENTER), SCALE)
    ps = GaussianMixture(*r.tilt(gm.weights, mu, S, BETA))
    exact = [ps.sample(n, torch.Generator().manual_seed(1000 + i))[0] for i in range(sets + 1)]
    floor = sum(sliced_w2(exact[i], exact[i + 1]) for i in range(sets)) / sets
    big = ps.sample(200_000, torch.Generator().manual_seed(7))[0]
    r_star = float(r(big).mean())
    kl_star = float((ps.log_prob(big) - gm.log_prob(big)).mean())
    return {"gm": gm, "ps": ps, "r": r, "exact": exact[:sets], "floor": floor, "r_star": r_star, "kl_star": kl_star,
            "J_star": r_star - BETA * kl_star, "ref_exact": gm.sample(n, torch.Generator().manual_seed(2000))[0]}


def toy_eval(path, cfg: FT.FinetuneConfig, truth: dict, n: int) -> dict:
    model = models.load(path)
    sig = FT._grid(model, cfg)
    pol = LP.policy(cfg.sampler, None if cfg.noise_level < 0 else cfg.noise_level)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(123))
    gm = truth["gm"]
    with torch.no_grad():
        roll = LP.rollout(model.denoise, x, LP.plan(sig, pol), generator=torch.Generator().manual_seed(9),
                          reference=lambda xx, s: gm.denoise(xx.double(), s.double()).to(xx.dtype))
    out = roll.sample.double()
    w2 = sum(sliced_w2(out, e) for e in truth["exact"]) / len(truth["exact"])
    reward, kl = float(truth["r"](out).mean()), float(roll.kl.sum(1).mean())
    return {"w2": w2, "ratio": w2 / truth["floor"], "reward": reward, "kl": kl, "J": reward - BETA * kl,
            "samples": out}


TOY_METHODS = {  # name -> (finetune options); every method maximises E[r] - beta KL with beta = 1
    "grpo": {"method": "grpo", "batch_size": 256, "group_size": 256, "updates": 8, "lr": 2e-3},
    "grpo, --kl step": {"method": "grpo", "batch_size": 256, "group_size": 256, "updates": 8, "lr": 2e-3, "kl": "step"},
    "ddpo": {"method": "ddpo", "batch_size": 256, "updates": 8, "lr": 2e-3},
    "draft-40 (full)": {"method": "draft", "sampler": "flow_sde", "draft_k": 40, "batch_size": 64, "lr": 3e-3},
    "draft-1": {"method": "draft", "sampler": "flow_sde", "draft_k": 1, "batch_size": 64, "lr": 1e-3},
}


def _steps_for(cfg_dict: dict, budget: float, pilot_dir: Path, run) -> int:
    """Steps that fit the CPU budget, from a 3-step pilot (its per-step CPU, without set-up)."""
    shutil.rmtree(pilot_dir, ignore_errors=True)
    run({**cfg_dict, "steps": 3, "out": str(pilot_dir), "checkpoint_every": 1000})
    recs = [json.loads(line) for line in (pilot_dir / "log.jsonl").read_text().splitlines()]
    per = (recs[-1]["cpu"] - recs[0]["cpu"]) / (len(recs) - 1)
    shutil.rmtree(pilot_dir, ignore_errors=True)
    return max(5, int(budget / per))


def part_toy(out: Path, budget: float, n: int, quick: bool) -> dict:
    ref = toy_reference(out / "toy-reference")
    truth = toy_truth(n, 4)
    base = {"model": str(ref), "reward": "quadratic", "reward_args": {"center": CENTER, "scale": SCALE},
            "kl_beta": BETA, "nfe": 40 if not quick else 12, "lr_schedule": "constant",
            "log_every": 1, "keep_checkpoints": 100}

    def run(d):
        FT.finetune(FT.FinetuneConfig.from_dict(d).validate(), progress=False)

    ref_cfg = FT.FinetuneConfig.from_dict({**base, **TOY_METHODS["grpo"]}).validate()
    ref_eval = toy_eval(ref, ref_cfg, truth, n)
    samples = {"reference": ref_eval.pop("samples")}
    rows = [{"method": "reference (exact mixture + zero residual)", "steps": 0, "cpu": 0.0, **ref_eval}]
    curves = {}
    for name, opts in TOY_METHODS.items():
        d = {**base, **opts}
        if quick:
            d["batch_size"] = min(d["batch_size"], 64)
            d["group_size"] = min(d.get("group_size", 8), d["batch_size"])
            d["draft_k"] = min(d.get("draft_k", 1), d["nfe"])
        steps = _steps_for(d, budget, out / "pilot", run)
        run_dir = out / "toy" / name.replace(",", "").replace(" --kl ", "-kl-").split()[0]
        shutil.rmtree(run_dir, ignore_errors=True)
        # Polyak averaging against the policy-gradient noise: an EMA whose half-life is a tenth of the run
        d = {**d, "steps": steps, "out": str(run_dir), "checkpoint_every": max(1, steps // 5),
             "ema_half_life": 0.1 * steps * d["batch_size"]}
        t0 = time.process_time()
        run(d)
        cpu = time.process_time() - t0
        cfg = FT.FinetuneConfig.from_dict(d).validate()
        log = {r["step"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}
        curve = [(0.0, ref_eval["w2"])]
        for ck in sorted((run_dir / "checkpoints").glob("step-*")):
            st = int(ck.name.split("-")[1])
            curve.append((log[st]["cpu"], toy_eval(ck, cfg, truth, n)["w2"]))
        final = toy_eval(run_dir / "model", cfg, truth, n)
        samples[name] = final.pop("samples")
        curves[name] = curve
        rows.append({"method": name, "steps": steps, "cpu": cpu, **final})
        print(f"toy {name}: {steps} steps, {cpu:.0f} CPU-s, W2 {final['w2']:.4f} ({final['ratio']:.2f}x floor)", flush=True)
    return {"rows": rows, "truth": {k: truth[k] for k in ("floor", "r_star", "kl_star", "J_star")},
            "curves": curves, "samples": samples, "p_star": truth["exact"][0], "budget": budget, "n": n}


# ------------------------------------------------------------------------------ digits
DIGITS_METHODS = {  # name -> CLI flags of `unifusion finetune` (the method's own defaults otherwise)
    "ddpo": ["--method", "ddpo", "--lr", "1e-4"],
    "grpo": ["--method", "grpo", "--lr", "1e-4", "--kl-beta", "0.01"],
    "draft-2": ["--method", "draft", "--draft-k", "2", "--lr", "1e-4"],
}
COMMON = ["--reward", "classifier", "--batch-size", "64", "--group-size", "8", "--nfe", "10", "--log-every", "1"]


def _cli(args: list[str]) -> dict:
    """Run `unifusion finetune ARGS` as a child; its CPU seconds, peak RSS (MiB) and wall seconds."""
    import tempfile
    t = time.time()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: the child never blocks on a full buffer
        p = subprocess.Popen([sys.executable, "-m", "unifusion", "finetune", *args], stdout=subprocess.DEVNULL,
                             stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        err = log.read()
    if p.returncode != 0:
        raise RuntimeError(f"unifusion finetune {' '.join(args)} failed: {err[-2000:]}")
    return {"cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024, "wall": time.time() - t}


def digits_reference(out: Path, steps: int, reuse: str | None) -> tuple[Path, float]:
    if reuse:
        return Path(reuse), 0.0
    run = out / "digits-reference"
    t0 = time.process_time()
    from unifusion.training.loop import train
    train(C.from_dict({"steps": steps, "warmup_steps": min(100, steps // 4), "sample_every": 0,
                       "checkpoint_every": steps, "out": str(run), "overwrite": True}), progress=False)
    return run, time.process_time() - t0


def _digits_samples(model, cfg: FT.FinetuneConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    sig = FT._grid(model, cfg)
    pol = LP.policy(cfg.sampler, None if cfg.noise_level < 0 else cfg.noise_level)
    y = torch.arange(n) % 10
    x = torch.randn((n,) + tuple(model.spec.shape), generator=torch.Generator().manual_seed(0)) * sig[0]
    with torch.no_grad():
        roll = LP.rollout(model.denoise, x, LP.plan(sig, pol), cond={"y": y}, generator=torch.Generator().manual_seed(1))
    return model.decode(roll.sample), y


def _path_kl(model, reference, n: int) -> float:
    """The path KL to the reference under the common sampler flow_sde (a = 0.7), NFE 10, n samples."""
    cfg = FT.FinetuneConfig(model="-", reward="-", sampler="flow_sde", nfe=10).validate()
    sig = FT._grid(model, cfg)
    y = torch.arange(n) % 10
    x = torch.randn((n,) + tuple(model.spec.shape), generator=torch.Generator().manual_seed(5)) * sig[0]
    with torch.no_grad():
        roll = LP.rollout(model.denoise, x, LP.plan(sig, LP.policy("flow_sde", 0.7)), cond={"y": y},
                          generator=torch.Generator().manual_seed(6), reference=reference.denoise)
    return float(roll.kl.sum(1).mean())


def part_digits(out: Path, budget: float, ref_steps: int, n: int, reuse: str | None, quick: bool) -> dict:
    from unifusion.evaluation.features import digits_accuracy, digits_features, extract
    ref_path, ref_cpu = digits_reference(out, ref_steps, reuse)
    reference = models.load(ref_path)
    fx = digits_features()
    train_x, _ = datasets.load("digits-train").arrays(None)
    f_train = extract(fx, train_x)
    reward = rewards.load("classifier", reference.spec)
    cache: dict = {}

    def ref_feats(cfg):
        key = (cfg.sampler, cfg.noise_level)
        if key not in cache:
            x, y = _digits_samples(reference, cfg, n)
            cache[key] = (extract(fx, x), x, y)
        return cache[key]

    def score(path, cfg) -> dict:
        model = models.load(path)
        x, y = _digits_samples(model, cfg, n)
        fr, _, _ = ref_feats(cfg)
        f = extract(fx, x)
        return {"reward": float(reward(x, {"y": y}).mean()), "accuracy": digits_accuracy(x, y, fx),
                "fid_ref": fid(f, fr), "fid_data": fid(f, f_train), "kl": _path_kl(model, reference, min(n, 500)),
                "grid": x[:40]}

    rows, curves, grids = [], {}, {}
    common = COMMON + (["--nfe", "6", "--batch-size", "32"] if quick else [])
    for name, flags in DIGITS_METHODS.items():
        args = ["--model", str(ref_path), *common, *flags]
        cfg = FT.FinetuneConfig.from_dict(_flags(args)).validate()
        pilot = out / "pilot"
        shutil.rmtree(pilot, ignore_errors=True)
        _cli([*args, "--steps", "3", "--out", str(pilot), "--checkpoint-every", "1000"])
        recs = [json.loads(line) for line in (pilot / "log.jsonl").read_text().splitlines()]
        per = (recs[-1]["cpu"] - recs[0]["cpu"]) / (len(recs) - 1)
        steps = max(5, int(budget / per))
        run_dir = out / "digits" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        usage = _cli([*args, "--steps", str(steps), "--out", str(run_dir), "--checkpoint-every", str(max(1, steps // 5)),
                      "--keep-checkpoints", "100"])
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        by_step = {r["step"]: r for r in log}
        base = score(ref_path, cfg)
        curve = [(0.0, base["reward"], base["fid_ref"])]
        for ck in sorted((run_dir / "checkpoints").glob("step-*")):
            st = int(ck.name.split("-")[1])
            s = score(ck, cfg)
            curve.append((by_step[st]["cpu"], s["reward"], s["fid_ref"]))
        final = score(run_dir / "model", cfg)
        grids[name] = final.pop("grid")
        grids.setdefault("reference (" + cfg.sampler + ")", base.pop("grid"))
        curves[name] = {"eval": curve, "log": [(r["cpu"], r["reward"]) for r in log]}
        rows.append({"method": name, "sampler": f"{cfg.sampler}" + (f" {cfg.noise_level:g}" if cfg.noise_level >= 0 else ""),
                     "beta": cfg.kl_beta, "steps": steps, "cpu": usage["cpu"],
                     "cpu_step": (log[-1]["cpu"] - log[0]["cpu"]) / max(1, len(log) - 1),
                     "wall_step": (log[-1]["time"] - log[0]["time"]) / max(1, len(log) - 1),
                     "mem": max(r["mem_mib"] for r in log), "rss": usage["rss"],
                     "ref_reward": base["reward"], "ref_accuracy": base["accuracy"], "ref_fid_data": base["fid_data"],
                     **final})
        print(f"digits {name}: {steps} steps, {usage['cpu']:.0f} CPU-s, reward {base['reward']:.4f} -> "
              f"{final['reward']:.4f}, FID vs reference {final['fid_ref']:.3f}", flush=True)
    memory = []
    k = "6" if quick else "10"
    for name, flags in {f"draft-{k}, checkpointing": ["--method", "draft", "--draft-k", k],
                        f"draft-{k}, no checkpointing": ["--method", "draft", "--draft-k", k,
                                                         "--grad-checkpointing", "false"]}.items():
        run_dir = out / "memory" / name.split(",")[1].strip().replace(" ", "-")
        shutil.rmtree(run_dir, ignore_errors=True)
        usage = _cli(["--model", str(ref_path), *common, *flags, "--lr", "1e-4", "--steps", "4", "--out", str(run_dir)])
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        memory.append({"method": name, "cpu_step": (log[-1]["cpu"] - log[0]["cpu"]) / 3,
                       "wall_step": (log[-1]["time"] - log[0]["time"]) / 3, "mem": max(r["mem_mib"] for r in log),
                       "rss": usage["rss"]})
    return {"rows": rows, "memory": memory, "curves": curves, "grids": grids, "budget": budget, "n": n,
            "reference": str(ref_path), "reference_cpu": ref_cpu}


def _flags(args: list[str]) -> dict:
    out, i = {}, 0
    while i < len(args):
        out[args[i][2:].replace("-", "_")] = args[i + 1]
        i += 2
    return out


# ------------------------------------------------------------------------------ report
def report(toy: dict, dig: dict) -> str:
    t = toy["truth"]
    lines = [f"### Analytic check: 2-D mixture, exact reference, beta = {BETA}, equal CPU ({toy['budget']:.0f} s per "
             f"method)", "",
             f"optimum: E_p*[r] = {t['r_star']:.4f}, KL(p* || p_ref) = {t['kl_star']:.4f}, J* = {t['J_star']:.4f}; "
             f"sliced-W2 floor (exact vs exact, n = {toy['n']}) = {t['floor']:.4f}, goal <= {2 * t['floor']:.4f}", "",
             table(toy["rows"], [("method", "method", 0), ("steps", "steps", 0), ("cpu", "CPU-s", 0),
                                 ("w2", "sliced W2 to p*", 4), ("ratio", "x floor", 2), ("reward", "E[r]", 4),
                                 ("kl", "path KL", 4), ("J", "J = E[r] - beta KL", 4)]), ""]
    d = dig["rows"]
    lines += [f"### Digits: class-conditional EDM, reward log p(label | x), equal CPU ({dig['budget']:.0f} s per method)",
              "", f"reference: {dig['reference']} ({dig['reference_cpu']:.0f} CPU-s of training); n = {dig['n']} samples "
              "per row; FID in digits-classifier features", "",
              table(d, [("method", "method", 0), ("sampler", "sampler", 0), ("beta", "beta", 3), ("steps", "steps", 0),
                        ("ref_reward", "reward before", 4), ("reward", "reward after", 4),
                        ("ref_accuracy", "accuracy before", 3), ("accuracy", "accuracy after", 3),
                        ("kl", "path KL (flow_sde)", 2), ("fid_ref", "FID vs reference samples", 3),
                        ("ref_fid_data", "FID vs data before", 3), ("fid_data", "FID vs data after", 3)]), "",
              table(d + dig["memory"], [("method", "method", 0), ("cpu_step", "CPU-s / step", 3),
                                        ("wall_step", "wall s / step (shared machine)", 3),
                                        ("mem", "step memory MiB", 0), ("rss", "process peak RSS MiB", 0)]), "",
              "step memory: the resident set's peak during the steps over its level before step 0 (log.jsonl "
              "`mem_mib`); the process peak includes torch, the classifier and the data (~450 MiB)"]
    return "\n".join(lines)


def plots(toy: dict, dig: dict, docs: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(toy["curves"])
    fig, axes = plt.subplots(1, 2 + len(names), figsize=(4 * (2 + len(names)), 3.8))
    ax = axes[0]
    for name in names:
        c = toy["curves"][name]
        ax.plot([p[0] for p in c], [p[1] for p in c], marker="o", label=name)
    ax.axhline(2 * toy["truth"]["floor"], color="k", ls="--", lw=1, label="2x floor (goal)")
    ax.set_yscale("log")
    ax.set_xlabel("CPU seconds")
    ax.set_ylabel("sliced W2 to exact p*")
    ax.legend(fontsize=7)
    for ax, (title, pts) in zip(axes[1:], [("p* (exact)", toy["p_star"])] + [(n, toy["samples"][n]) for n in names]):
        pts = pts[:2000]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-2, 2.2)
        ax.set_ylim(-2, 2)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(docs / "finetune_toy.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, c in dig["curves"].items():
        log = c["log"]
        k = max(1, len(log) // 40)
        xs = [log[i][0] for i in range(0, len(log) - k + 1, k)]
        ys = [sum(r for _, r in log[i:i + k]) / k for i in range(0, len(log) - k + 1, k)]
        axes[0].plot(xs, ys, label=name)
        axes[1].plot([p[0] for p in c["eval"]], [p[1] for p in c["eval"]], marker="o", label=name)
        axes[2].plot([p[1] for p in c["eval"]], [p[2] for p in c["eval"]], marker="o", label=name)
    axes[0].set(xlabel="CPU seconds", ylabel="batch reward (training, smoothed)")
    axes[1].set(xlabel="CPU seconds", ylabel="mean reward (1000 samples)")
    axes[2].set(xlabel="mean reward", ylabel="FID vs reference samples (drift)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "finetune_digits.png", dpi=90)
    plt.close(fig)
    from unifusion.data import save_grid
    rows = [g[:40] for g in dig["grids"].values()]
    save_grid(torch.cat(rows), docs / "finetune_digits_samples.png", nrow=40)


def _store(out: Path, name: str, result: dict) -> dict:
    """A part's results: the tensors (samples, image grids) in <name>.npz, the rest in <name>.json."""
    import numpy as np
    arrays = {}

    def split(v, key):
        if isinstance(v, torch.Tensor):
            arrays[key] = v.detach().cpu().numpy()
            return {"__array__": key}
        if isinstance(v, dict):
            return {k: split(x, f"{key}/{k}") for k, x in v.items()}
        return v
    (out / f"{name}.json").write_text(json.dumps(split(result, name), indent=1))
    np.savez(out / f"{name}.npz", **arrays)
    return result


def _stored(out: Path, name: str) -> dict | None:
    import numpy as np
    if not (out / f"{name}.json").is_file():
        return None
    arrays = np.load(out / f"{name}.npz")

    def join(v):
        if isinstance(v, dict):
            return torch.from_numpy(arrays[v["__array__"]]) if set(v) == {"__array__"} else {k: join(x) for k, x in v.items()}
        return v
    return join(json.loads((out / f"{name}.json").read_text()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/finetune-bench")
    p.add_argument("--toy-cpu", type=float, default=150.0, help="CPU seconds per method on the toy")
    p.add_argument("--digits-cpu", type=float, default=150.0, help="CPU seconds per method on digits")
    p.add_argument("--reference-steps", type=int, default=600, help="training steps of the digits reference")
    p.add_argument("--reference", default=None, help="reuse this digits run as the reference")
    p.add_argument("--n", type=int, default=4000, help="toy samples per evaluation")
    p.add_argument("--digits-n", type=int, default=1000, help="digits samples per evaluation")
    p.add_argument("--docs", action="store_true", help="write the plots to docs/")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    p.add_argument("--parts", default="toy,digits", help="the parts to run; the others are read from --out")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.toy_cpu, a.digits_cpu, a.reference_steps, a.n, a.digits_n = 6.0, 6.0, 40, 1000, 200
    t0, w0 = time.process_time(), time.time()
    parts = set(a.parts.split(","))
    if "toy" in parts:
        _store(out, "toy", part_toy(out, a.toy_cpu, a.n, a.quick))
    if "digits" in parts:
        _store(out, "digits", part_digits(out, a.digits_cpu, a.reference_steps, a.digits_n, a.reference, a.quick))
    toy, dig = _stored(out, "toy"), _stored(out, "digits")
    if toy is None or dig is None:
        print(f"the other part is not in {out} yet; run it with --parts (the report needs both)")
        return
    text = report(toy, dig)
    text += (f"\n\nbenchmark total: {(time.process_time() - t0) / 60:.1f} CPU-min in this process (+ the finetune "
             f"children's, in the CPU-s columns), {(time.time() - w0) / 60:.1f} min wall on a shared machine")
    print(text)
    (out / "finetune.md").write_text(text + "\n")
    docs = ROOT / "docs" if a.docs else out
    plots(toy, dig, docs)


if __name__ == "__main__":
    main()
