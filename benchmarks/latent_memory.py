"""Memory while training on 200,000 latents, and the encode throughput of an autoencoder.

1. Encode throughput: `--encode-n` images of `--data` through `--autoencoder` with the code of
   `unifusion encode` (data/latents.py: batches of --batch-size, fp32, no gradients, shards written),
   in images per second (reading/drawing the images included, as a user sees it); and on those
   latents the ratio of the mean posterior std to the std of the posterior means (both normalised).
2. The 200,000 latents: SYNTHETIC by default. They are written by the same shard writer
   (data/shards.py, the latents index of data/latents.py, with that autoencoder's describe()) but
   hold N(0, 0.5^2) values instead of encodings, because encoding 200,000 images on 2 CPU cores
   would take longer than the measurement itself; memory does not depend on the values. With
   --encode-all they are real encodings of the first --n images (the data must have that many:
   shapes-32-train:200000, say).
3. A tiny denoiser (unet-digits at width 8, fitted to the latent channels) trains --steps steps of
   batch --train-batch on them in this process (the loop of `unifusion train`), while a thread
   samples /proc/self/status every 0.2 s. The defaults see 800 x 256 = 204,800 latents: one epoch.

Printed: RSS (and its two parts: anonymous memory, i.e. the heap, which must stay flat, and
file-backed pages of the memory-mapped shards, which the kernel may reclaim at any time) at 0, 25,
50, 75 and 100 % of the training time, and the peak RSS of the training phase (VmHWM after a reset
of the high-water mark where the kernel allows it, else the largest sample).

    python benchmarks/latent_memory.py --autoencoder runs/ae --data shapes-32-train:200000
    python benchmarks/latent_memory.py --autoencoder runs/ae --data digits-train --n 20000 --steps 50  # smoke
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


class Sampler(threading.Thread):
    """(seconds, training step from the run's log, status()) every `every` seconds."""

    def __init__(self, log: Path, every: float = 0.2):
        super().__init__(daemon=True)
        self.log, self.every, self.samples, self.stop = log, every, [], threading.Event()

    def step(self) -> int:
        try:
            lines = self.log.read_text().splitlines()
            return json.loads(lines[-1])["step"] if lines else 0
        except (OSError, ValueError, KeyError):
            return 0

    def run(self):
        t0 = time.perf_counter()
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - t0, self.step(), status()))
            time.sleep(self.every)


def reset_peak() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_synthetic(out: Path, header: dict, n: int, per_shard: int, seed: int = 0) -> None:
    from unifusion.data import latents, shards
    shape, k = tuple(header["shape"]), header["num_classes"]

    def make(indices, tick):
        g = torch.Generator().manual_seed(seed * 1_000_003 + indices[0])
        arrays = {"mean": 0.5 * torch.randn((len(indices), *shape), generator=g),
                  "std": torch.full((len(indices), *shape), 1e-3), "index": torch.tensor(indices)}
        if k:
            arrays["y"] = torch.randint(0, k, (len(indices),), generator=g)
        tick(len(indices))
        return arrays

    shards.write_shards(out, fmt=latents.FORMAT, what="latents", command="benchmarks/latent_memory.py",
                        prefix="latents", start_key="first_index", count=n, per_shard=per_shard, header=header,
                        make=make, check_resume=lambda old: None, record_bytes=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True, help="a unifusion autoencoder or a diffusers AutoencoderKL folder")
    p.add_argument("--data", default="shapes-32-train", help="the image data (its shape sets the latent shape)")
    p.add_argument("--n", type=int, default=200_000, help="latents trained on")
    p.add_argument("--encode-n", type=int, default=2048, help="images encoded for the throughput")
    p.add_argument("--encode-all", action="store_true", help="encode the --n latents instead of synthetic ones")
    p.add_argument("--batch-size", type=int, default=64, help="images per autoencoder call")
    p.add_argument("--per-shard", type=int, default=4096)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one); its throughput/, latents/ "
                                               "and run/ are replaced")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from unifusion import config as C
    from unifusion import data as datasets
    from unifusion.data import latents
    from unifusion.models.autoencoder import load_autoencoder
    from unifusion.training import loop as L

    work = Path(args.out or tempfile.mkdtemp(prefix="latent-memory-"))
    for sub in ("throughput", "latents", "run"):  # this script's own outputs of an earlier run: measured afresh
        shutil.rmtree(work / sub, ignore_errors=True)
    ae = load_autoencoder(args.autoencoder)
    source = datasets.load(args.data)
    name = latents.source_name(args.data)

    # ---- 1. encode throughput
    n_enc = min(args.encode_n, len(source))
    t0 = time.perf_counter()
    latents.encode_latents(ae, source, work / "throughput", data=name, count=n_enc, per_shard=args.per_shard,
                           batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    print(f"encode: {n_enc} images {tuple(source.shape)} -> latents {tuple(ae.latent_shape(source.shape))} in "
          f"{seconds:.1f} s = {n_enc / seconds:.0f} images/s (batch {args.batch_size}, {args.threads} thread(s), "
          f"autoencoder {args.autoencoder})")

    enc = latents.LatentSource(work / "throughput")
    means = enc.arrays()[0]
    stds = torch.stack([enc.posterior(i)[1] for i in range(len(enc))])
    ratio = float(stds.mean() / means.std())
    print(f"posterior std / spread of the latents (both normalised): mean std {float(stds.mean()):.4g} / std of the "
          f"means {float(means.std()):.4g} = {ratio:.3g} (why training on the mean loses little: data/latents.py)")

    # ---- 2. the latents
    folder = work / "latents"
    t0 = time.perf_counter()
    if args.encode_all:
        latents.encode_latents(ae, source, folder, data=name, count=args.n, per_shard=args.per_shard,
                               batch_size=args.batch_size)
        how = "encoded"
    else:
        write_synthetic(folder, latents.latents_header(ae, source, name), args.n, args.per_shard)
        how = "synthetic (same writer and index; N(0, 0.5^2) values)"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"latents: {args.n} {how}, {size:.0f} MiB in {len(list(folder.glob('*.safetensors')))} shards, "
          f"{time.perf_counter() - t0:.1f} s")

    # ---- 3. training while sampling the memory
    del source
    cfg = C.from_dict({"data": str(folder), "network": "unet-digits", "network_args": {"model_channels": 8},
                       "steps": args.steps, "batch_size": args.train_batch, "checkpoint_every": args.steps,
                       "sample_every": 0, "sample_nfe": 2, "log_every": max(1, args.steps // 20),
                       "threads": args.threads, "out": str(work / "run"), "overwrite": True})
    before = status()
    exact_peak = reset_peak()
    sampler = Sampler(work / "run" / "log.jsonl")
    sampler.start()
    t0 = time.perf_counter()
    L.train(cfg, progress=False)
    train_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    after = status()
    samples = sampler.samples
    seen = args.steps * args.train_batch
    print(f"training: {args.steps} steps x batch {args.train_batch} = {seen} latents "
          f"({seen / args.n:.2f} epochs) in {train_s:.1f} s (final preview and model folder included); RSS before "
          f"training {before['VmRSS']} MiB")
    print("| at step | RSS MiB | anonymous MiB | file-backed (mmap) MiB |\n|---|---|---|---|")
    points = []
    for frac in (0.05, 0.25, 0.5, 0.75, 1.0):  # the first sample whose logged step reached it
        target = max(1, round(frac * args.steps))
        hit = next(((t, k, st) for t, k, st in samples if k >= target), None)
        if hit is not None:
            points.append(hit)
            print(f"| {hit[1]} ({hit[0]:.0f} s) | {hit[2]['VmRSS']} | {hit[2]['RssAnon']} | {hit[2]['RssFile']} |")
    print(f"| after the final outputs ({train_s:.0f} s) | {after['VmRSS']} | {after['RssAnon']} | {after['RssFile']} |")
    peak = after["VmHWM"] if exact_peak else max(st["VmRSS"] for _, _, st in samples)
    steady = [st["RssAnon"] for _, k, st in samples if args.steps * 0.25 <= k < args.steps] or [after["RssAnon"]]
    growth = steady[-1] - steady[0]
    print(f"peak RSS of the training phase: {peak} MiB ({'VmHWM' if exact_peak else 'largest sample'}); anonymous "
          f"memory from 25% of the steps to the last: {min(steady)}..{max(steady)} MiB (growth {growth:+d} MiB)")
    print(json.dumps({"encode_images_per_s": n_enc / seconds, "posterior_std_ratio": ratio, "latents": args.n, "latents_kind": how,
                      "peak_rss_mib": peak, "anon_growth_mib": growth}))


if __name__ == "__main__":
    main()
