"""Few-step generation on digits: FID against NFE for a rectified-flow teacher and every few-step
route from it, with the CPU cost of each stage (issue 11's measurement).

Stages (in this process, one thread; CPU time is time.process_time of the stage):

  teacher      rectified flow (--process flow --parametrization velocity, logit-normal t),
               class-conditional, default digits network
  couplings    `unifusion couple` from the teacher with its best sampler at NFE 20
  2-RF         --reflow on those couplings, --init-from the teacher
  2-RF+distill couplings from 2-RF (its Euler at NFE 20), then --objective distill K = 1 and 2,
               --init-from 2-RF (the RF paper's recipe)
  2-RF+distill --objective distill K = 1 and 2 --init-from 2-RF on the teacher's couplings (those 2-RF
  (teacher     was trained on: no second couplings stage, and targets of the teacher's quality
  couplings)   instead of 2-RF's)
  progressive  --objective progressive 16 -> 8 -> 4 -> 2 -> 1 from the teacher, each round a short
               run initialised from its teacher
  CD           --objective cd, teacher Heun steps, N = 18 (from scratch: the consistency
               parametrization shares no meaning with the teacher's velocity output), with the
               online network as its target (iCT's choice) and with the CM paper's EMA target
               network (--target-ema, default 0.95)
  iCT          --objective ict (pseudo-Huber, lognormal curriculum), from scratch
  searched     the greedy level search (evaluation/level_search.py, `unifusion eval
               --search-levels`) of each 2-call sampler: the level between the first and 0 picked
               by FID on seeds 1,000,000.. (n samples), disjoint from the seeds 0..n-1 every row
               reports; stored in the model folder's spec as its default grid at NFE 2

Rows: the teacher with its best sampler (of euler, heun, dpmpp_2m, ipndm) at NFE 1, 2, 4, 8, 20
and 50 (the last is "the teacher given more steps"); 2-RF Euler at 1, 2, 4; both 2-RF+distill
routes at K (Euler rows use the K-step grid the students use, t = 1, (K-1)/K, ..., 1/K, not the
native uniform-t grid, whose last level at sigma_min wastes a call at small K); each progressive
round at its K; CD (both targets) and iCT at 1 and 2; every 2-call student again with its
searched level ("+ searched level" rows; their student CPU-min include the search). Columns: FID,
class accuracy and copy
rate (evaluation/evaluate.py's `evaluate`, the same as `unifusion eval`: digits-classifier
features, n samples, seeds 0..n-1), the CPU minutes of teacher / couplings / student training
behind the row and their sum, and the sampling cost (seconds per 1000 samples, one thread).
"break-even" is the number of samples after which the student's extra training (couplings +
student) has paid for itself against the teacher at the fewest NFE that matches its FID ("-"
where no teacher row matches it, or one matches it at no more calls).

Writes fewstep.md (the table), fewstep.json (rows) and fewstep.png (FID vs NFE, one line per
method, a star per searched level) into --out, and the runs under --out/runs (each searched
model folder's spec holds its searched grid).

    python benchmarks/fewstep.py                 # the full budgets (about 45 min, one thread)
    python benchmarks/fewstep.py --quick         # a smoke test with tiny budgets (< 3 minutes)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread setting)

DATA = "digits-train"
FLOW = {"process": "flow", "parametrization": "velocity", "noise_density": "logit_normal"}
CONSISTENCY = {"process": "edm", "parametrization": "consistency"}
TEACHER_SAMPLERS = ("euler", "heun", "dpmpp_2m", "ipndm")
TEACHER_NFES = (1, 2, 4, 8, 20, 50)
TEACHER_PAIRS = "2-RF + distill (teacher couplings)"
SEARCHED = " + searched level"  # the method name of a row on its searched level
SEARCH_SEED = 1_000_000  # evaluation.level_search.SEARCH_SEED: the search's seeds, disjoint from the rows' 0..n-1


def stage(fn, *args, **kwargs):
    """(fn(*args, **kwargs), CPU seconds of this process while it ran)."""
    t0 = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - t0


def train(out: Path, steps: int, quiet: bool, **kw) -> Path:
    from unifusion import config as C
    from unifusion.training import loop as L
    cfg = C.from_dict({"data": DATA, "out": str(out), "overwrite": True, "steps": steps, "threads": 1,
                       "warmup_steps": min(200, max(1, steps // 10)), "checkpoint_every": max(steps, 1),
                       "sample_every": 0, "log_every": 50, **kw})
    res = L.train(cfg, progress=not quiet)
    return Path(res["model"])


def couple(model: Path, out: Path, sampler: str, nfe: int, n: int) -> Path:
    from unifusion import cli
    shutil.rmtree(out, ignore_errors=True)
    if cli.main(["couple", "--checkpoint", str(model), "--sampler", sampler, "--nfe", str(nfe), "--n", str(n),
                 "--out", str(out), "--shard-size", "5000"]) != 0:
        raise RuntimeError(f"unifusion couple from {model} failed (see above)")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fewstep-bench", help="output folder (runs, table, plot)")
    p.add_argument("--teacher-steps", type=int, default=2400, help="training steps of the teacher")
    p.add_argument("--couplings", type=int, default=10000, help="couplings drawn per couplings stage")
    p.add_argument("--reflow-steps", type=int, default=3600, help="training steps of 2-RF")
    p.add_argument("--distill-steps", type=int, default=600, help="training steps of each distilled student")
    p.add_argument("--pd-steps", type=int, default=400, help="training steps of each progressive round")
    p.add_argument("--pd-start", type=int, default=16, help="the teacher's steps in the first progressive round")
    p.add_argument("--cd-steps", type=int, default=2400, help="training steps of consistency distillation")
    p.add_argument("--ict-steps", type=int, default=2400, help="training steps of improved consistency training")
    p.add_argument("--target-ema", type=float, default=0.95, help="the EMA target's decay of the second CD run")
    p.add_argument("--finetune-lr", type=float, default=5e-4, help="learning rate of the runs initialised from a model")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluated setting")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the script (< 3 minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.couplings, args.reflow_steps, args.distill_steps = 40, 256, 10, 10
        args.pd_steps, args.pd_start, args.cd_steps, args.ict_steps, args.n = 8, 4, 10, 10, 200
    torch.set_num_threads(1)
    from unifusion import models
    from unifusion.evaluation import level_search
    from unifusion.evaluation.evaluate import (
        evaluate,
        feature_extractor,
        real_data_row,
        reference,
    )
    from unifusion.models.fewstep import step_levels
    from unifusion.safeio import atomic_write

    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    quiet = args.quick
    ref = reference(DATA, {}, feature_extractor((1, 8, 8)), out / "eval-cache")
    rows: list[dict] = []

    def score(method, path, sampler, nfe, cost, step_grid=False, grid=None):
        """One row; step_grid: Euler on the model's K-step grid (fewstep.step_levels: K + 1 levels of its
        grid less the last, e.g. t = 1, 1/2 for K = 2), the grid the distilled students use, instead of
        its native grid (whose last level sits at sigma_min, a call wasted at small K); grid: a searched
        Calibration. Otherwise the model's own grid (named: a stored search does not change these rows)."""
        model = models.load(path)
        grid = torch.as_tensor(step_levels(model.spec, nfe)) if step_grid else grid
        r = evaluate(model, ref, sampler, nfe, args.n, grid=grid if grid is not None else model.spec.grid["name"])
        if step_grid:
            sampler = f"{sampler} (K-step grid)"
        elif grid is not None:
            sampler = f"{sampler} (searched: {', '.join(f'{s:.3g}' for s in grid.sigmas[:-1].tolist())})"
        row = {"method": method, "nfe": nfe, "sampler": sampler, "fid": r.fid, "accuracy": r.accuracy,
               "copy_rate": r.copy_rate, "sample_s_per_1k": r.seconds / r.n * 1000,
               **{f"{k}_min": v / 60 for k, v in cost.items()}}
        row["total_min"] = sum(cost.values()) / 60
        rows.append(row)
        print(f"{method:>22} NFE {nfe:>2} {sampler:>11}: FID {r.fid:8.3f}  acc {r.accuracy or 0:.3f}  "
              f"copy {r.copy_rate:.4f}  cost {row['total_min']:.2f} CPU-min", flush=True)
        return row

    def searched(method, path, sampler, cost):
        """The row of `path` at NFE 2 on its searched level (picked on seeds SEARCH_SEED.., stored in
        its model folder); the search's CPU time joins the student's cost."""
        model = models.load(path)
        cal, cpu = stage(level_search.search_levels, model, 2, ref=ref, sampler=sampler, n=args.n)
        level_search.store(path, cal)
        print(level_search.summary(cal), flush=True)
        return score(method + SEARCHED, path, sampler, 2, {**cost, "student": cost["student"] + cpu}, grid=cal)

    # ---- the teacher, its best sampler per NFE
    teacher, t_cpu = stage(train, runs / "teacher", args.teacher_steps, quiet, **FLOW)
    cost0 = {"teacher": t_cpu, "couplings": 0.0, "student": 0.0}
    samplers = TEACHER_SAMPLERS[:2] if args.quick else TEACHER_SAMPLERS
    best = {}
    for nfe in TEACHER_NFES:
        trials = []
        for s in samplers:
            try:
                trials.append(score("teacher", teacher, s, nfe, cost0, step_grid=s == "euler"))
            except ValueError:  # the sampler needs more calls than this budget (e.g. heun at 2)
                continue
            rows.pop()
        best[nfe] = min(trials, key=lambda r: r["fid"])
        best[nfe]["method"] = "teacher (best sampler)"
        rows.append(best[nfe])
    t_sampler = best[20]["sampler"].split()[0]  # (on its native grid: couple takes no grid)

    # ---- couplings and 2-RF
    pairs, c_cpu = stage(couple, teacher, runs / "couplings", t_sampler, 20, args.couplings)
    rf2, r_cpu = stage(train, runs / "2rf", args.reflow_steps, quiet, **FLOW, data=str(pairs), reflow=True,
                       init_from=str(teacher), lr=args.finetune_lr)
    cost_rf = {"teacher": t_cpu, "couplings": c_cpu, "student": r_cpu}
    for nfe in (1, 2, 4):
        score("2-RF (euler)", rf2, "euler", nfe, cost_rf, step_grid=True)
    searched("2-RF (euler)", rf2, "euler", cost_rf)

    # ---- 2-RF + distill: couplings of 2-RF, then K-step students
    pairs2, c2_cpu = stage(couple, rf2, runs / "couplings-2rf", "euler", 20, args.couplings)
    for k in (1, 2):
        st, d_cpu = stage(train, runs / f"2rf-distill-{k}", args.distill_steps, quiet, **FLOW, data=str(pairs2),
                          objective="distill", student_steps=k, init_from=str(rf2), lr=args.finetune_lr)
        cost = {"teacher": t_cpu, "couplings": c_cpu + c2_cpu, "student": r_cpu + d_cpu}
        score("2-RF + distill", st, "euler", k, cost)
        if k == 2:
            searched("2-RF + distill", st, "euler", cost)

    # ---- 2-RF + distill on the teacher's own couplings (those 2-RF trained on): no second couplings stage
    for k in (1, 2):
        st, d_cpu = stage(train, runs / f"2rf-distill-teacher-{k}", args.distill_steps, quiet, **FLOW, data=str(pairs),
                          objective="distill", student_steps=k, init_from=str(rf2), lr=args.finetune_lr)
        cost = {"teacher": t_cpu, "couplings": c_cpu, "student": r_cpu + d_cpu}
        score(TEACHER_PAIRS, st, "euler", k, cost)
        if k == 2:
            searched(TEACHER_PAIRS, st, "euler", cost)

    # ---- progressive distillation: pd_start -> pd_start / 2 -> ... -> 1
    prev, pd_cpu, k = teacher, 0.0, args.pd_start // 2
    first = True
    while k >= 1:
        extra = {"student_steps": k} if first else {}
        prev, cpu = stage(train, runs / f"progressive-{k}", args.pd_steps, quiet, **FLOW, objective="progressive",
                          teacher=str(prev), init_from=str(prev), lr=args.finetune_lr, **extra)
        pd_cpu += cpu
        score("progressive", prev, "euler", k, {"teacher": t_cpu, "couplings": 0.0, "student": pd_cpu})
        if k == 2:
            searched("progressive", prev, "euler",
                     {"teacher": t_cpu, "couplings": 0.0, "student": pd_cpu})
        k, first = k // 2, False

    # ---- consistency models
    for name, mu in (("CD (heun teacher)", 0.0), (f"CD (heun teacher, EMA target {args.target_ema:g})",
                                                  args.target_ema)):
        cd, cd_cpu = stage(train, runs / ("cd" if not mu else "cd-ema"), args.cd_steps, quiet, **CONSISTENCY,
                           objective="cd", teacher=str(teacher), teacher_solver="heun", target_ema=mu)
        cost = {"teacher": t_cpu, "couplings": 0.0, "student": cd_cpu}
        for nfe in (1, 2):
            score(name, cd, "consistency", nfe, cost)
        searched(name, cd, "consistency", cost)
    ict, ict_cpu = stage(train, runs / "ict", args.ict_steps, quiet, **CONSISTENCY, objective="ict")
    cost = {"teacher": 0.0, "couplings": 0.0, "student": ict_cpu}
    for nfe in (1, 2):
        score("iCT", ict, "consistency", nfe, cost)
    searched("iCT", ict, "consistency", cost)

    # ---- break-even against the teacher at the fewest NFE that matches each student's FID
    for r in rows:
        r["break_even"] = None
        if r["method"].startswith("teacher"):
            continue
        match = [b for b in (best[n] for n in TEACHER_NFES) if b["fid"] <= r["fid"]]
        if match and match[0]["nfe"] > r["nfe"]:  # else the teacher matches it at as few calls: nothing saved
            saved = (match[0]["sample_s_per_1k"] - r["sample_s_per_1k"]) / 1000  # CPU s per sample
            extra = (r["couplings_min"] + r["student_min"]) * 60
            r["break_even"] = math.ceil(extra / saved) if saved > 0 else None
            r["matched_teacher_nfe"] = match[0]["nfe"]
    floor = real_data_row(ref)
    text = table(rows, floor, args)
    print("\n" + text)
    atomic_write(out / "fewstep.md", text + "\n")
    atomic_write(out / "fewstep.json", json.dumps({"args": vars(args), "rows": rows,
                                                   "held_out": dataclasses.asdict(floor) if floor else None}, indent=1))
    plot(rows, floor, out / "fewstep.png")
    print(f"wrote {out / 'fewstep.md'}, {out / 'fewstep.json'} and {out / 'fewstep.png'}")
    return {"rows": rows, "out": str(out)}


def table(rows: list[dict], floor, args) -> str:
    head = ("| method | NFE | sampler | FID | accuracy | copy rate | teacher CPU-min | couplings CPU-min | "
            "student CPU-min | total CPU-min | sampling s / 1k | break-even samples |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        be = "-" if r.get("break_even") is None else f"{r['break_even']:,} (vs NFE {r['matched_teacher_nfe']})"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['sampler']} | {r['fid']:.3f} | "
                     f"{'-' if r['accuracy'] is None else format(r['accuracy'], '.3f')} | {r['copy_rate']:.4f} | "
                     f"{r['teacher_min']:.2f} | {r['couplings_min']:.2f} | {r['student_min']:.2f} | "
                     f"{r['total_min']:.2f} | {r['sample_s_per_1k']:.2f} | {be} |")
    t20 = next(r for r in rows if r["method"].startswith("teacher") and r["nfe"] == 20)
    notes = [f"\nn = {args.n} samples per row (seeds 0..n-1, classes seed % 10), digits-classifier features; "
             + (f"held-out digits score FID {floor.fid:.3f} at n = {floor.n}." if floor else "")
             + f" Searched levels: picked by FID on seeds {SEARCH_SEED:,}..{SEARCH_SEED + args.n - 1:,}."]
    for k, bound in ((1, 2.0), (2, 1.3)):
        students = [r for r in rows if r["nfe"] == k and not r["method"].startswith("teacher")]
        if students:
            b = min(students, key=lambda r: r["fid"])
            notes.append(f"target at NFE {k}: FID <= {bound} x teacher@20 ({bound * t20['fid']:.3f}); best student "
                         f"{b['method']} {b['fid']:.3f} ({b['fid'] / t20['fid']:.2f}x), copy rate {b['copy_rate']:.4f} "
                         f"vs the teacher's {t20['copy_rate']:.4f}")
    return "\n".join(lines + notes)


def plot(rows: list[dict], floor, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unifusion.safeio import atomic_path
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    methods = list(dict.fromkeys(r["method"] for r in rows if not r["method"].endswith(SEARCHED)))
    colours = {m: (plt.cm.tab10(i % 10) if i < 10 else plt.cm.Dark2(i % 8)) for i, m in enumerate(methods)}
    for method in methods:
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", ms=4, color=colours[method], label=method)
    for r in rows:  # a searched level: a star in its method's colour
        if r["method"].endswith(SEARCHED):
            base = r["method"][:-len(SEARCHED)]
            ax.plot([r["nfe"]], [r["fid"]], marker="*", ms=11, ls="none", color=colours.get(base, "k"),
                    markeredgecolor="k", markeredgewidth=0.5, label=r["method"])
    if floor is not None:
        ax.axhline(floor.fid, color="k", ls=":", lw=1, label=f"held-out data (n={floor.n})")
    nfes = sorted({r["nfe"] for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="NFE (denoiser calls)", ylabel="FID (digits features)",
           title="Few-step digits: FID vs NFE")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
