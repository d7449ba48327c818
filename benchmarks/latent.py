"""Latent diffusion on `shapes`: the autoencoders, then latent vs pixel diffusion at equal CPU time.

Everything runs through the CLI (`unifusion autoencoder train`, `unifusion encode`, `unifusion
train`), one thread per process, one job at a time; CPU time is the children's user + system time
(resource.getrusage), so it counts what the work cost, not what the wall clock says.

  1. Autoencoders f4 and f8 (4 latent channels each, 32x32 RGB): trained for --ae-budget CPU
     seconds, then reconstruction PSNR, SSIM and rFID on --n held-out images (shapes-32-test),
     the posterior std relative to the latent spread, and encode throughput (images/s, wall and CPU).
  2. Latent vs pixel at equal CPU time: a pixel UNet (unet-32) trained for --budget CPU seconds;
     latent models on the f4 and f8 latents get --budget minus (their autoencoder's training +
     encoding the --latents training images). Each is sampled class-conditionally (dpmpp_2m,
     NFE 20, EMA weights) and scored in the shipped shapes classifier's feature space against
     held-out images: FID, KID, precision, recall, attribute accuracy (main object's shape and
     colour = the class asked for), plus ms/image to sample (decoding included).

    python benchmarks/latent.py                            # about an hour, one thread
    python benchmarks/latent.py --budget 120 --ae-budget 60 --n 300 --latents 5000   # a quick look
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from cpu_runs import cli_cpu as _cli, done as _done, record as _record, steps_for, train_cpu  # benchmarks/cpu_runs.py
from tables import table  # benchmarks/tables.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent



def autoencoder_rows(args, tmp: Path) -> tuple[list[dict], dict]:
    from unifusion.data import load
    from unifusion.evaluation.features import shapes_features
    from unifusion.evaluation.reconstruction import reconstruction_report
    from unifusion.models.autoencoder import load_autoencoder
    held_out = load(f"shapes-32-test:{args.n}").arrays()[0]
    rows, made = [], {}
    done = _done(tmp, ["ae"])["ae"]
    for f in (4, 8):
        if str(f) in done:  # measured by an earlier run into the same --keep folder
            rows.append(done[str(f)]["row"])
            made[f] = {k: Path(v) if k in ("ae", "latents") else v for k, v in done[str(f)]["made"].items()}
            continue
        train = ["autoencoder", "train", "--data", "shapes-32", "--network", f"ae-f{f}"]
        steps, per_step = steps_for(train, args.ae_budget, tmp)
        out = tmp / f"ae-f{f}"
        cpu = train_cpu(train, out, steps)
        ae = load_autoencoder(out)
        torch.set_num_threads(1)
        rep = reconstruction_report(ae, held_out, extractor=shapes_features())
        x = held_out[:512]
        mean, std = ae.encode_posterior(x)
        ratio = float(std.mean() / mean.std(dim=(0, 2, 3)).mean())
        lat = tmp / f"latents-f{f}"
        t0 = time.perf_counter()
        enc_cpu = _cli(["encode", "--autoencoder", str(out), "--data", f"shapes-32-train:{args.latents}",
                        "--out", str(lat), "--batch-size", "256"])
        wall = time.perf_counter() - t0
        made[f] = {"ae": out, "latents": lat, "ae_cpu": cpu, "encode_cpu": enc_cpu}
        rows.append({"row": f"f{f}, c4 ({ae.latent_shape((3, 32, 32))})", "steps": steps,
                     "train_cpu_min": cpu / 60, "psnr": rep["psnr"], "ssim": rep["ssim"], "rfid": rep["rfid"],
                     "std_ratio": ratio, "encode_img_s": args.latents / wall, "encode_cpu_img_s": args.latents / enc_cpu,
                     "params_m": sum(p.numel() for p in ae.parameters()) / 1e6})
        print(json.dumps(rows[-1], default=str), flush=True)
        _record(tmp, "ae", str(f), {"row": rows[-1], "made": made[f]})
    return rows, made


def diffusion_rows(args, made: dict, tmp: Path) -> list[dict]:
    from unifusion import models
    from unifusion.evaluation import evaluate as E
    rows = []
    runs = [("pixel (unet-32, 3x32x32)", ["train", "--data", "shapes-32", "--network", "unet-32"], 0.0)]
    for f, m in made.items():
        overhead = m["ae_cpu"] + m["encode_cpu"]
        runs.append((f"latent f{f} (unet-digits)", ["train", "--data", str(m["latents"]), "--network", "unet-digits",
                                                    "--network.model_channels", "32"], overhead))
    ref = None
    done = _done(tmp, ["diffusion"])["diffusion"]
    for name, train, overhead in runs:
        if name in done:  # measured by an earlier run into the same --keep folder
            rows.append(done[name])
            continue
        budget = args.budget - overhead
        if budget < 30:
            rows.append({"row": name, "note": f"autoencoder + encoding took {overhead / 60:.1f} of "
                                              f"{args.budget / 60:.1f} CPU-min: nothing left"})
            continue
        steps, per_step = steps_for(train, budget, tmp)
        out = tmp / name.split()[0] / name.split()[1]
        cpu = train_cpu(train, out, steps)
        model = models.load(out / "model")
        torch.set_num_threads(1)
        if ref is None:  # the image data and the shapes classifier's features, for pixel and latent alike
            spec = model.spec
            shape = spec.data.get("image_shape", spec.shape)
            ref = E.reference(spec.data["source"], spec.data.get("options", {}),
                              E.feature_extractor(shape, None, spec.data["source"]), tmp / "ref")
        row = E.evaluate(model, ref, "dpmpp_2m", 20, args.n, batch_size=250)
        t = time.perf_counter()
        model.sample(seeds=range(200), sampler="dpmpp_2m", nfe=20, batch_size=200)
        ms = 1000 * (time.perf_counter() - t) / 200
        rows.append({"row": name, "steps": steps, "ms_per_step": 1000 * per_step,
                     "train_cpu_min": cpu / 60, "overhead_cpu_min": overhead / 60,
                     "total_cpu_min": (cpu + overhead) / 60, "fid": row.fid, "kid": row.kid,
                     "precision": row.precision, "recall": row.recall, "accuracy": row.accuracy,
                     "copy_rate": row.copy_rate, "ms_per_image": ms})
        print(json.dumps(rows[-1], default=str), flush=True)
        _record(tmp, "diffusion", name, rows[-1])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=900, help="CPU seconds per diffusion model, autoencoder included")
    p.add_argument("--ae-budget", type=float, default=240, help="CPU seconds of autoencoder training")
    p.add_argument("--latents", type=int, default=20000, help="training images encoded for the latent models")
    p.add_argument("--n", type=int, default=1000, help="held-out images / samples scored")
    p.add_argument("--keep", default=None, help="keep the runs in this folder; a rerun into it skips the rows "
                                                "already measured there (done.json)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(args.keep) if args.keep else Path(t)
        ae_rows, made = autoencoder_rows(args, tmp)
        rows = diffusion_rows(args, made, tmp)
    print(f"\nautoencoders on shapes-32, {args.ae_budget / 60:.1f} CPU-min each (1 thread); "
          f"{args.n} held-out images")
    print(table(ae_rows, [("row", "autoencoder", 0), ("params_m", "params (M)", 2), ("steps", "steps", 0),
                          ("train_cpu_min", "train CPU-min", 2), ("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3),
                          ("rfid", "rFID", 3), ("std_ratio", "posterior std / latent std", 3),
                          ("encode_img_s", "encode img/s (wall)", 0), ("encode_cpu_img_s", "img/s per CPU-s", 0)]))
    print(f"\nlatent vs pixel at {args.budget / 60:.1f} CPU-min each (autoencoder training + encoding "
          f"{args.latents} images counted in the latent rows); dpmpp_2m NFE 20, {args.n} samples")
    print(table(rows, [("row", "model", 0), ("fid", "FID", 3), ("kid", "KID", 4), ("precision", "precision", 3),
                       ("recall", "recall", 3), ("accuracy", "attribute acc.", 3), ("copy_rate", "copy", 3),
                       ("steps", "steps", 0), ("ms_per_step", "ms/step", 1), ("overhead_cpu_min", "AE+encode CPU-min", 2),
                       ("train_cpu_min", "diffusion CPU-min", 2), ("total_cpu_min", "total CPU-min", 2),
                       ("ms_per_image", "ms/image", 2), ("note", "note", 0)]))
    if args.json:
        Path(args.json).write_text(json.dumps({"autoencoders": ae_rows, "diffusion": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
