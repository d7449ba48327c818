"""`unifusion eval` of a text-conditional model: prompt following, image quality and image-text
agreement, across classifier-free guidance scales.

Per CFG scale (--cfg-scales, e.g. 1,2,3,5):
  * GenEval-style tasks (evaluation/geneval.py) on shapes data: --geneval N prompts per task, once
    without and once with the attribute combinations held out of training (shapes.HELD_OUT), one
    sample per prompt (seed = the prompt's index); accuracy per task, overall, and the headline
    colour+shape accuracy of the main object, seen vs held-out;
  * FID / KID / precision / recall against the training data (the FID feature network of the data),
    of --n samples drawn from the captions of the first --n held-out images;
  * the image-text score: the mean cosine of each sample with its caption under the model's own
    text-image encoder (when it has an image tower).
The real held-out images scored as samples give the reference row (their own image-text score
too). Writes eval.json, eval.csv and cfg_text.png (accuracy and FID against the scale) to <run>/eval.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from ..safeio import atomic_path, atomic_write


def _sample(model, prompts: list[str], cfg: float, sampler: str, nfe: int, batch_size: int, seed0: int = 0,
            grid: str | None = None):
    with torch.no_grad():
        return model.sample(seeds=range(seed0, seed0 + len(prompts)), prompts=prompts, cfg=cfg, sampler=sampler,
                            nfe=nfe, batch_size=batch_size, grid=grid)


def image_text_score(model, x: torch.Tensor, captions: list[str], batch_size: int = 500) -> float | None:
    """Mean cosine of images with their captions under the model's text-image encoder, or None
    when the encoder has no image tower (a transformers text model)."""
    enc = model.cond.encoder()
    if not hasattr(enc, "model") or not hasattr(enc.model, "similarity"):
        return None
    vals = [enc.similarity(x[s:s + batch_size], captions[s:s + batch_size]) for s in range(0, len(x), batch_size)]
    return float(torch.cat(vals).mean())


def run_text(args, model, ref, out: Path, scales: list[float], sampler: str, nfe: int, grid: str | None = None) -> dict:
    """The evaluation of the module docstring; `ref` is evaluate.reference() of the model's data; `grid`:
    the noise grid (None: the model's own)."""
    from . import geneval
    from .evaluate import score
    from .. import data as datasets
    from .evaluate import held_out_spec
    spec = model.spec
    held = held_out_spec(spec.data.get("source"), spec.data.get("options") or {})
    if ref.held_out is None or held is None:
        raise ValueError("a text-conditional model is scored on the captions of held-out images; its data "
                         f"{spec.data.get('source')!r} has no held-out split")
    n = min(args.n, len(ref.held_out))
    captions = datasets.caption_list(datasets.load(held[0], **held[1]), n, what=f"held-out {held[0]}")
    shapes_data = ref.shapes
    suite = geneval.prompt_suite(args.geneval, seed=0) if shapes_data and args.geneval else None
    specs = suite["seen"] + suite["held_out"] if suite else []
    rows, records = [], []
    real = score(ref.held_out.x[:n].clamp(-1, 1), None, ref,
                 dict(sampler="held-out data", nfe=0, grid="-", cfg_scale=1.0, seconds=0.0))
    real_its = image_text_score(model, ref.held_out.x[:n], captions, args.batch_size)
    for w in scales:
        t0 = time.perf_counter()
        x = _sample(model, captions, w, sampler, nfe, args.batch_size, grid=grid)
        seconds = time.perf_counter() - t0
        row = score(x, None, ref, dict(sampler=sampler, nfe=nfe, grid=grid or spec.grid["name"], cfg_scale=w,
                                       seconds=seconds))
        rec = {"cfg": w, "fid": row.fid, "kid": row.kid, "precision": row.precision, "recall": row.recall,
               "image_text": image_text_score(model, x, captions, args.batch_size), "seconds": seconds}
        if specs:
            imgs = _sample(model, [s.text for s in specs], w, sampler, nfe, args.batch_size, seed0=10**6, grid=grid)
            split = geneval.seen_vs_held_out(geneval.score(imgs, specs), specs)
            rec["geneval"] = split
            if w == scales[0]:
                _grid(imgs, specs, out / "geneval_samples.png")
        rows.append(row)
        records.append(rec)
    _print(records, real, real_its, n, args.geneval)
    result = {"checkpoint": str(args.checkpoint), "step": model.info.get("step"), "n": n, "sampler": sampler,
              "nfe": nfe, "grid": grid or spec.grid["name"], "reference": {"fid": real.fid, "image_text": real_its},
              "scales": records}
    with atomic_path(out / "eval.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cfg", "fid", "kid", "precision", "recall", "image_text", "colour_shape_seen",
                    "colour_shape_held_out", "overall_seen", "overall_held_out"])
        for r in records:
            g = r.get("geneval")
            w.writerow([r["cfg"], r["fid"], r["kid"], r["precision"], r["recall"], r["image_text"],
                        *((g["seen"]["colour_shape"], g["held_out"]["colour_shape"], g["seen"]["overall"],
                           g["held_out"]["overall"]) if g else ("", "", "", ""))])
    if len(records) > 1:
        result["plot"] = str(plot(records, out / "cfg_text.png"))
    atomic_write(out / "eval.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.csv'}" + (f" and {result['plot']}" if "plot" in result else ""))
    return result


def _print(records, real, real_its, n, per_task) -> None:
    head = "| cfg | FID | image-text | colour+shape seen | held-out | overall seen | held-out |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in records:
        g = r.get("geneval")
        its = "-" if r["image_text"] is None else f"{r['image_text']:.3f}"
        gs = (f"{g['seen']['colour_shape']:.3f} | {g['held_out']['colour_shape']:.3f} | {g['seen']['overall']:.3f} | "
              f"{g['held_out']['overall']:.3f}") if g else "- | - | - | -"
        lines.append(f"| {r['cfg']:g} | {r['fid']:.3f} | {its} | {gs} |")
    its = "-" if real_its is None else f"{real_its:.3f}"
    lines.append(f"| held-out images | {real.fid:.3f} | {its} | | | | |")
    print("\n".join(lines))
    print(f"(FID of {n} samples from held-out captions; geneval: {per_task} prompts per task, seen and held-out "
          "combinations; the held-out row scores real held-out images as samples)")
    for r in records:
        if r.get("geneval"):
            from .geneval import format_table
            g = r["geneval"]
            print(f"cfg {r['cfg']:g}:\n" + format_table({"seen": g["seen"], "held-out": g["held_out"]}))


def _grid(x, specs, path: Path) -> None:
    """The first samples of each task (seen prompts), one row per task."""
    from .. import data as datasets
    from .geneval import TASKS
    pick = []
    for t in TASKS:
        pick += [i for i, s in enumerate(specs) if s.task == t and not s.held_out][:8]
    if pick:
        datasets.save_grid(x[pick], path, nrow=8)


def plot(records: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = [r["cfg"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    if records[0].get("geneval"):
        for key, style in (("seen", "-"), ("held_out", "--")):
            a.plot(w, [r["geneval"][key]["colour_shape"] for r in records], style, marker="o",
                   label=f"colour+shape, {key.replace('_', '-')}")
            a.plot(w, [r["geneval"][key]["overall"] for r in records], style, marker="s", label=f"overall, "
                   f"{key.replace('_', '-')}")
        a.set_ylim(0, 1)
        a.legend(fontsize=7)
    a.set_xlabel("CFG scale")
    a.set_ylabel("accuracy")
    b.plot(w, [r["fid"] for r in records], marker="o")
    b.set_xlabel("CFG scale")
    b.set_ylabel("FID")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
