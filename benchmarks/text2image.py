"""Text-to-image in miniature on `shapes-t2i` (32x32 RGB, 1-2 objects, plain background; the
attribute combinations shapes.HELD_OUT never appear in training): text encoders, then
text-conditional latent diffusion, with prompt following measured on seen and held-out
combinations. Everything runs through the CLI, one thread per process, one job at a time; CPU time
is the children's user + system time (benchmarks/cpu_runs.py), so "equal CPU time" holds even on a
shared machine.

  1. Text-image encoders, CLIP and SigLIP loss, --enc-steps each: retrieval recall@1/5 (image->text,
     text->image) and zero-shot attribute accuracy (colour, shape, size, position words) on
     --n held-out images (`unifusion eval` of the encoder).
  2. The KL autoencoder (f4, 4x8x8 latents; --ae-steps) and the --latents training images encoded
     (captions stored with the latents).
  3. Text-conditional latent diffusion at equal CPU time (--ldm-budget CPU seconds of training
     each, steps from a pilot): the SD 1.x-style cross-attention UNet and SD3's MM-DiT (rectified
     flow, logit-normal t with shift 3, on the same latents) with the CLIP encoder and caption
     dropout 0.1; then the UNet with the SigLIP encoder, and with caption dropout 0.5; then the
     UNet attending to the caption at 8x8 as well as 4x4, with and without the pooled vector.
  4. Each model scored by `unifusion eval` across CFG scales --cfg-scales: GenEval-style tasks
     (--geneval prompts per task, seen and held-out), FID of --n samples from held-out captions,
     the image-text score under the model's own encoder (comparable between rows with the same encoder).

    python benchmarks/text2image.py --keep runs/t2i-bench          # about 1.5 CPU-hours
    python benchmarks/text2image.py --keep /tmp/q --enc-steps 100 --ae-steps 100 --latents 2000 \\
        --ldm-budget 60 --n 100 --geneval 8 --cfg-scales 1,3        # a quick look
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpu_runs import QUIET, cli_cpu, done, record, steps_for, train_cpu  # benchmarks/cpu_runs.py
from tables import table  # benchmarks/tables.py (the script's folder is on sys.path)

DATA = "shapes-t2i-32-train"
ENCODER = ["--width", "96", "--layers", "2", "--batch-size", "128", "--lr", "1e-3", "--weight-decay", "0.05",
           "--ema-half-life", "10000"]


def _eval(model: Path, out: Path, extra: list[str]) -> dict:
    cpu = cli_cpu(["eval", "--checkpoint", str(model), "--out", str(out), *extra])
    r = json.loads((out / "eval.json").read_text())
    r["eval_cpu_s"] = cpu
    return r


def encoders(args, tmp: Path) -> dict:
    rows = {}
    for loss in ("clip", "siglip"):
        key = f"enc-{loss}"
        if key in done(tmp, ["enc"])["enc"]:
            rows[loss] = done(tmp)["enc"][key]
            continue
        out = tmp / key
        cpu = train_cpu(["encoder", "train", "--data", f"{DATA}:{args.latents}", "--loss", loss, *ENCODER], out,
                        args.enc_steps, warmup=min(100, args.enc_steps // 10))
        r = _eval(out / "model", out / "eval", ["--n", str(args.n)])
        row = {"loss": loss, "steps": args.enc_steps, "train_cpu_min": cpu / 60,
               "i2t_r1": r["retrieval"]["image_to_text"]["r@1"], "i2t_r5": r["retrieval"]["image_to_text"]["r@5"],
               "t2i_r1": r["retrieval"]["text_to_image"]["r@1"], "t2i_r5": r["retrieval"]["text_to_image"]["r@5"],
               **{f"zs_{k}": v for k, v in r["zero_shot"].items()}, "model": str(out / "model")}
        print(json.dumps(row), flush=True)
        record(tmp, "enc", key, row)
        rows[loss] = row
    return rows


def latents(args, tmp: Path) -> dict:
    d = done(tmp, ["ae"])["ae"]
    if "made" in d:
        return d["made"]
    ae = tmp / "ae"
    cpu = cli_cpu(["autoencoder", "train", "--data", f"{DATA}:{args.latents}", "--steps", str(args.ae_steps),
                   "--out", str(ae), "--overwrite", *QUIET])
    r = _eval(ae / "model", ae / "eval", ["--n", str(min(args.n, 1000))])
    lat = tmp / "latents"
    enc_cpu = cli_cpu(["encode", "--autoencoder", str(ae / "model"), "--data", f"{DATA}:{args.latents}",
                       "--batch-size", "256", "--out", str(lat), "--overwrite"])
    made = {"ae": str(ae / "model"), "latents": str(lat), "ae_cpu_min": cpu / 60, "encode_cpu_min": enc_cpu / 60,
            **{k: r["reconstruction"][k] for k in ("psnr", "ssim", "rfid")}}
    print(json.dumps(made), flush=True)
    record(tmp, "ae", "made", made)
    return made


def runs(enc: dict) -> list[tuple[str, list[str]]]:
    clip, siglip = enc["clip"]["model"], enc["siglip"]["model"]
    unet = ["--network", "auto", "--network.model_channels", "32"]
    mmdit = ["--network", "mmdit-s", "--process", "flow", "--parametrization", "velocity", "--noise-density",
             "logit_normal", "--shift", "3"]
    return [("UNet cross-attn, CLIP, drop 0.1", [*unet, "--text-encoder", clip, "--cond-drop", "0.1"]),
            ("MM-DiT, CLIP, drop 0.1", [*mmdit, "--text-encoder", clip, "--cond-drop", "0.1"]),
            ("UNet cross-attn, SigLIP, drop 0.1", [*unet, "--text-encoder", siglip, "--cond-drop", "0.1"]),
            ("UNet cross-attn, CLIP, drop 0.5", [*unet, "--text-encoder", clip, "--cond-drop", "0.5"]),
            # the caption through attention at both levels (8x8 and 4x4), with and without the pooled vector
            ("UNet cross-attn 8+4, CLIP, drop 0.1", [*unet, "--network.attn_resolutions", "[8,4]",
                                                    "--text-encoder", clip, "--cond-drop", "0.1"]),
            ("UNet cross-attn 8+4, no pooled, CLIP, drop 0.1", [*unet, "--network.attn_resolutions", "[8,4]",
                                                               "--text-pooled", "false", "--text-encoder", clip,
                                                               "--cond-drop", "0.1"])]


def diffusion(args, tmp: Path, enc: dict, made: dict) -> list[dict]:
    rows = []
    for name, flags in runs(enc)[:args.runs]:
        key = name
        if key in done(tmp, ["ldm"])["ldm"]:
            rows.append(done(tmp)["ldm"][key])
            continue
        train = ["train", "--data", made["latents"], "--batch-size", "128", "--lr", "1e-3", *flags]
        steps, per_step = steps_for(train, args.ldm_budget, tmp)
        out = tmp / ("ldm-" + "".join(c if c.isalnum() else "-" for c in name.lower()))
        cpu = train_cpu(train, out, steps)
        r = _eval(out / "model", out / "eval", ["--n", str(args.n), "--geneval", str(args.geneval),
                                               "--cfg-scales", args.cfg_scales])
        per_cfg = []
        for s in r["scales"]:
            g = s.get("geneval") or {}
            per_cfg.append({"cfg": s["cfg"], "fid": s["fid"], "image_text": s["image_text"],
                            "cs_seen": g.get("seen", {}).get("colour_shape"),
                            "cs_held": g.get("held_out", {}).get("colour_shape"),
                            "overall_seen": g.get("seen", {}).get("overall"),
                            "overall_held": g.get("held_out", {}).get("overall"),
                            "tasks_seen": g.get("seen", {}).get("accuracy"),
                            "tasks_held": g.get("held_out", {}).get("accuracy")})
        best = max(per_cfg, key=lambda p: (p["cs_held"] or 0) + (p["cs_seen"] or 0))
        row = {"run": name, "steps": steps, "ms_per_step": 1000 * per_step, "train_cpu_min": cpu / 60,
               "eval_cpu_min": r["eval_cpu_s"] / 60, "per_cfg": per_cfg, "best": best,
               "reference_fid": r["reference"]["fid"], "reference_image_text": r["reference"]["image_text"],
               "model": str(out / "model")}
        print(json.dumps({k: v for k, v in row.items() if k != "per_cfg"}, default=str), flush=True)
        record(tmp, "ldm", key, row)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for i, r in enumerate(rows):
        w = [p["cfg"] for p in r["per_cfg"]]
        c = f"C{i}"
        axes[0].plot(w, [p["cs_seen"] for p in r["per_cfg"]], "-o", color=c, label=r["run"])
        axes[0].plot(w, [p["cs_held"] for p in r["per_cfg"]], "--s", color=c)
        axes[1].plot(w, [p["fid"] for p in r["per_cfg"]], "-o", color=c)
    axes[0].set(xlabel="CFG scale", ylabel="colour+shape accuracy", ylim=(0, 1),
                title="solid: seen combinations, dashed: held-out")
    axes[1].set(xlabel="CFG scale", ylabel="FID (shapes features)", title="FID of samples from held-out captions")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", required=True, help="the runs' folder; a rerun into it skips what done.json records")
    p.add_argument("--enc-steps", type=int, default=600, help="text encoder training steps (batch 128)")
    p.add_argument("--ae-steps", type=int, default=800, help="autoencoder training steps")
    p.add_argument("--latents", type=int, default=20000, help="training images (encoders, autoencoder, latents)")
    p.add_argument("--ldm-budget", type=float, default=600, help="CPU seconds of training per diffusion model")
    p.add_argument("--runs", type=int, default=6, help="how many of the diffusion configurations to run")
    p.add_argument("--n", type=int, default=500, help="held-out images / samples for retrieval and FID")
    p.add_argument("--geneval", type=int, default=40, help="prompts per GenEval task, seen and held-out each")
    p.add_argument("--cfg-scales", default="1,2,3,4.5,6", help="CFG scales scored")
    p.add_argument("--plot", default="docs/t2i_cfg.png", help="accuracy and FID against the CFG scale")
    args = p.parse_args(argv)
    tmp = Path(args.keep)
    tmp.mkdir(parents=True, exist_ok=True)
    enc = encoders(args, tmp)
    made = latents(args, tmp)
    rows = diffusion(args, tmp, enc, made)
    print(f"\ntext-image encoders on {DATA}:{args.latents}, {args.enc_steps} steps of batch 128 each (1 thread); "
          f"{args.n} held-out images")
    print(table(list(enc.values()), [("loss", "loss", 0), ("train_cpu_min", "train CPU-min", 1),
                                     ("i2t_r1", "image->text R@1", 3), ("i2t_r5", "R@5", 3),
                                     ("t2i_r1", "text->image R@1", 3), ("t2i_r5", "R@5", 3),
                                     ("zs_colour", "zero-shot colour", 3), ("zs_shape", "shape", 3),
                                     ("zs_size", "size", 3), ("zs_position", "position", 3)]))
    print(f"\nautoencoder f4 ({args.ae_steps} steps, {made['ae_cpu_min']:.1f} CPU-min): PSNR {made['psnr']:.2f} dB, "
          f"SSIM {made['ssim']:.3f}, rFID {made['rfid']:.2f}; {args.latents} images encoded in "
          f"{made['encode_cpu_min']:.1f} CPU-min")
    print(f"\ntext-conditional latent diffusion, {args.ldm_budget / 60:.1f} CPU-min of training each; best CFG "
          "by colour+shape accuracy (seen + held-out)")
    flat = [{"run": r["run"], "steps": r["steps"], "ms": r["ms_per_step"], **{k: r["best"][k] for k in (
        "cfg", "cs_seen", "cs_held", "overall_seen", "overall_held", "fid", "image_text")}} for r in rows]
    print(table(flat, [("run", "model", 0), ("steps", "steps", 0), ("ms", "CPU-ms/step", 0), ("cfg", "best CFG", 1),
                       ("cs_seen", "colour+shape seen", 3), ("cs_held", "held-out", 3),
                       ("overall_seen", "GenEval overall seen", 3), ("overall_held", "held-out", 3),
                       ("fid", "FID", 2), ("image_text", "image-text", 3)]))
    for r in rows:
        print(f"\n{r['run']}: per CFG scale (reference: held-out images FID {r['reference_fid']:.2f}, image-text "
              f"{r['reference_image_text']:.3f})")
        print(table(r["per_cfg"], [("cfg", "CFG", 1), ("cs_seen", "colour+shape seen", 3), ("cs_held", "held-out", 3),
                                   ("overall_seen", "overall seen", 3), ("overall_held", "held-out", 3),
                                   ("fid", "FID", 2), ("image_text", "image-text", 3)]))
        tasks = r["best"]["tasks_seen"] or {}
        if tasks:
            held = r["best"]["tasks_held"] or {}
            print("tasks at the best CFG (seen / held-out): " + ", ".join(
                f"{t} {v:.2f}/{held.get(t, float('nan')):.2f}" for t, v in tasks.items()))
    if rows and args.plot:
        plot(rows, Path(args.plot))
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
