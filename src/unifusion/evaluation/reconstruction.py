"""How well an autoencoder reconstructs: PSNR, SSIM and rFID (what `unifusion eval` reports for one).

    psnr(x, y), ssim(x, y)              per image (N,), images in [-1, 1] mapped to [0, 1]
    reconstruction_report(ae, images)   {"psnr", "ssim", "rfid", "n"}: the means over the images of
                                        x_rec = decode(posterior mean of x), clamped to [-1, 1]

PSNR = 10 log10(1 / MSE) on [0, 1] (inf for a perfect reconstruction). SSIM is Wang et al. (2004):
Gaussian window (11 x 11, sigma 1.5; the largest odd size that fits for images smaller than 11
pixels), 'valid' filtering, C1 = 0.01^2, C2 = 0.03^2, averaged over positions and channels.
rFID is the Frechet distance between the reconstructions' and the originals' features in the
data's feature network (evaluate.feature_extractor: shapes CNN, digits CNN, Inception-v3 when
given), so it measures what reconstruction loses in the statistics a sample FID sees.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..safeio import atomic_write
from . import features as fx
from . import metrics


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr / ssim compare two image batches (N, C, H, W) of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    return (x + 1) / 2, (y + 1) / 2


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image (N,), images in [-1, 1] read as [0, 1]."""
    a, b = _pair(x, y)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def gaussian_window(size: int, sigma: float) -> Tensor:
    """The normalised 2-D Gaussian (size, size), float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image (N,) (module docstring), images in [-1, 1] read as [0, 1]."""
    a, b = _pair(x, y)
    C = a.shape[1]
    size = min(window, *a.shape[-2:])
    size -= 1 - size % 2  # odd
    w = gaussian_window(size, sigma).expand(C, 1, size, size)

    def blur(t: Tensor) -> Tensor:  # per channel, 'valid'
        return F.conv2d(t, w, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruct(ae, images: Tensor, batch_size: int = 256, progress: bool = False) -> Tensor:
    """decode_raw(posterior mean) of every image, clamped to [-1, 1], on the CPU."""
    out = []
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="reconstruct", unit="batch", disable=not progress or len(starts) < 2):
        mean, _ = ae.encode_posterior(images[s:s + batch_size])
        out.append(ae.decode_raw(mean).clamp(-1, 1).cpu())
    return torch.cat(out)


def reconstruction_report(ae, images: Tensor, batch_size: int = 256, extractor=None, progress: bool = False) -> dict:
    """{"psnr", "ssim", "rfid", "n"} of the autoencoder on `images` (N, C, H, W) in [-1, 1]; rfid is
    None without a feature network (`extractor`)."""
    x = torch.as_tensor(images).float()
    if len(x) < 2:
        raise ValueError(f"a reconstruction report needs at least 2 images, got {len(x)}")
    rec = reconstruct(ae, x, batch_size, progress)
    rfid = None
    if extractor is not None:
        fa, fb = fx.extract(extractor, rec), fx.extract(extractor, x)
        rfid = metrics.frechet_distance(*metrics.feature_stats(fa), *metrics.feature_stats(fb))
    return {"psnr": float(psnr(x, rec).mean()), "ssim": float(ssim(x, rec).mean()), "rfid": rfid, "n": len(x)}


def run_reconstruction(args, model) -> dict:
    """`unifusion eval --checkpoint AE`: the report on held-out images (training images when the
    data has no held-out split), printed as a table and written to <run>/eval/eval.json."""
    from .. import data as datasets
    from ..models.io import run_folder
    from .evaluate import feature_extractor, held_out_spec, in_memory
    spec = model.spec
    if args.nll:
        raise ValueError("--nll: an autoencoder has no likelihood to score (its eval reports the PSNR, SSIM and rFID "
                         "of reconstructions); drop --nll")
    source, options = spec.data.get("source"), spec.data.get("options") or {}
    if not source:
        raise ValueError("the autoencoder's spec does not name its training data (spec.data.source)")
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "eval"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for eval.json")
    held = held_out_spec(source, options)
    data, which = ((datasets.load(held[0], **held[1]), f"held-out {held[0]}") if held else
                   (datasets.load(source, **options), f"training {source} (no held-out split known)"))
    x = in_memory(data, args.n).x[:args.n]
    note = ""
    try:
        extractor = feature_extractor(spec.shape, args.inception, data_spec=source)
    except (ValueError, OSError) as e:  # no feature network for these images: PSNR and SSIM only
        extractor, note = None, f"; no rFID: {e}"
    r = reconstruction_report(model, x, args.batch_size, extractor, progress=True)
    f = model.factor
    kind = f"{spec.network['class']} f{f}, c={model.latent_channels}"
    print(f"autoencoder: {model.info.get('where')} (step {model.info.get('step')}, {kind}, {model.info['weights']} "
          f"weights); images: {which}; features: {extractor.name if extractor else '-'}{note}")
    rfid = "-" if r["rfid"] is None else f"{r['rfid']:.3f}"
    print("| autoencoder | latent | n | psnr | ssim | rfid |\n|---|---|---|---|---|---|\n"
          f"| {spec.network['class']} f{f} | {model.latent_channels}x{spec.shape[1] // f}x{spec.shape[2] // f} | "
          f"{r['n']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {rfid} |")
    finite = {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in r.items()}  # JSON has no inf
    result = {"checkpoint": str(args.checkpoint), "step": model.info.get("step"), "images": which,
              "features": extractor.name if extractor else None, "reconstruction": finite}
    atomic_write(out / "eval.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'eval.json'}")
    return result
