"""The autoencoder family: a KL-regularised autoencoder (LDM, Rombach et al. 2022) trained by the one
loop, and the autoencoder object that latent diffusion encodes and decodes with.

Loss, per example (B,) (`terms` returns each part):

    rec          mean over pixels of |x_rec - x| (rec_loss "l1") or (x_rec - x)^2 ("l2")
  + perceptual_weight * perceptual_distance(x, x_rec)                     (unifusion.perceptual)
  + kl_weight * KL(q(z | x) || N(0, I)), the closed form summed over the latent's c*h*w dimensions
                and divided by the image's C*H*W pixels (so rec and KL are both per pixel: kl_weight
                1e-6 means what it means in LDM, whose losses are both sums per example)
  + on * (disc_weight * (-D(x_rec)) + hinge(D))                           (disc_weight > 0 only)

where z = mean + std * eps, eps from `random` (the loop draws it for the global batch from
(seed, step), so K ranks equal one rank). The discriminator shares the loop's one optimizer:
the generator term -D(x_rec) is computed with the discriminator's parameters detached
(functional_call), so its gradient reaches only the encoder and decoder; the hinge term
0.5 (relu(1 - D(x)) + relu(1 + D(x_rec.detach()))) reaches only the discriminator (Adam is
invariant to that term's scale, so it carries no weight). `on` is 0 before disc_start steps
and 1 after; both terms are computed from the first step on and multiplied by it, so DDP sees
every parameter used. The step count is the persistent buffer `passes` (training forward
passes; spec.training.passes_per_step of them per step = the run's gradient accumulation),
saved in checkpoints, so a resumed run switches the discriminator on at the same step. The
weight is fixed (LDM's adaptive weight, from the gradient norms at the decoder's last layer,
is not used).

Latent statistics and the normalisation convention (diffusers' and edm2's):

    z_n = (z - shift) * scale        z = z_n / scale + shift

per latent channel. Ours are measured after training (`measure_latent_statistics`): the
per-channel mean and std of the posterior MEANS of n training images under the EMA weights,
shift = mean, scale = sigma_data / std (sigma_data 0.5, the denoiser's), stored in the spec as
spec.training["latent"] = {"shift", "scale", "mean", "std", "n", "sigma_data"}. Stable Diffusion's
VAE has shift 0, scale 0.18215 (one number for all channels); SD3's shift 0.0609, scale 1.5305.

The autoencoder object (`load_autoencoder`): factor, latent_channels, image_channels, image_size,
shift, scale, encode_posterior(x) -> (mean, std), decode_raw(z), normalize / denormalize,
latent_shape, describe() and check_autoencoder; our model and the diffusers AutoencoderKL
wrapper (vae_diffusers.py) both provide it (`LatentCodec`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import networks
from ..networks.autoencoder import (
    AUTOENCODER_NETWORKS,
    DISCRIMINATORS,
    discriminator_layers,
)
from .base import Model
from .options import option
from .spec import ModelSpec

REC_LOSSES = ("l1", "l2")
STATS_N = 4096
NO_STATS = ("{where} has no latent statistics; run `unifusion autoencoder stats --checkpoint RUN` (a checkpoint "
            "mid-run has none; a finished `unifusion autoencoder train` writes them into <run>/model)")


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _channels(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, like.dtype).view(1, -1, *([1] * (like.ndim - 2)))


class LatentCodec:
    """The autoencoder interface shared by our model and the diffusers wrapper. A subclass sets
    or computes factor, latent_channels, image_channels, image_size (None: any size divisible by
    factor), shift, scale (c,), origin = {"kind", "path", "digest"}, and implements
    `_encode(x) -> (mean, std)` and `_decode(z) -> x` on the module's device in fp32."""

    kind = "unifusion"
    origin: dict | None = None

    # ---------------------------------------------------------------- normalisation
    def normalize(self, z: Tensor) -> Tensor:
        """z_n = (z - shift) * scale, per channel (module docstring)."""
        return (z - _channels(self.shift, z)) * _channels(self.scale, z)

    def denormalize(self, zn: Tensor) -> Tensor:
        """z = z_n / scale + shift."""
        return zn / _channels(self.scale, zn) + _channels(self.shift, zn)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """(c, H/f, W/f) of an image shape (C, H, W) (or (N, C, H, W)); raises for shapes it cannot take."""
        self.check_images(torch.empty((1, *tuple(image_shape)[-3:]), device="meta"))
        _, H, W = tuple(image_shape)[-3:]
        return (self.latent_channels, H // self.factor, W // self.factor)

    def check_images(self, x: Tensor) -> None:
        """One ValueError for images this autoencoder cannot encode."""
        name = self._name()
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"autoencoder {name} takes images (N, {self.image_channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        H, W = x.shape[-2:]
        if self.image_size and (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"autoencoder {name} was trained on {self.image_size}x{self.image_size} images and "
                             f"takes no other size, got {H}x{W}; resize the images (e.g. --image-size "
                             f"{self.image_size} for an image folder)")
        if H % self.factor or W % self.factor:
            raise ValueError(f"autoencoder {name} downsamples by {self.factor}: image sizes must be multiples of "
                             f"{self.factor}, got {H}x{W}")

    def check_latents(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"autoencoder {self._name()} decodes latents (N, {self.latent_channels}, h, w), got "
                             f"shape {tuple(z.shape)}")

    # ---------------------------------------------------------------- encode / decode
    @torch.no_grad()
    def encode_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (N, C, H, W) in [-1, 1] -> the posterior's raw (unnormalised) mean and std,
        each (N, c, H/f, W/f), in fp32 on the autoencoder's device."""
        self.check_images(x)
        return self._encode(x.to(self.device, torch.float32))

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents (N, c, h, w) -> images (N, C, h*f, w*f), fp32, unclamped."""
        self.check_latents(z)
        return self._decode(z.to(self.device, torch.float32)).float()

    # ---------------------------------------------------------------- identity
    def _name(self) -> str:
        return (self.origin or {}).get("path") or "(in memory)"

    def describe(self) -> dict:
        """What latents record about the autoencoder that made them (JSON-able)."""
        if not self.origin:
            raise ValueError("this autoencoder was not loaded from a folder, so it has no path and digest to "
                             "record; load it with load_autoencoder(path)")
        return {"kind": self.origin["kind"], "path": self.origin["path"], "digest": self.origin["digest"],
                "factor": int(self.factor), "latent_channels": int(self.latent_channels),
                "image_channels": int(self.image_channels), "image_size": self.image_size,
                "shift": [float(v) for v in self.shift], "scale": [float(v) for v in self.scale]}


# ------------------------------------------------------------------------------ the family
def _hinge(real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's hinge loss per example: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1 - real).flatten(1).mean(1) + F.relu(1 + fake).flatten(1).mean(1))


@dataclass
class AutoencoderOptions:
    kl_weight: float = option(1e-6, "weight of KL(q(z|x) || N(0, I)) per pixel (LDM's 1e-6)", minimum=0)
    rec_loss: str = option("l1", "reconstruction loss, l1 | l2 (mean over pixels)", choices=REC_LOSSES)
    perceptual_weight: float = option(0.0, "weight of the perceptual distance (unifusion.perceptual)", minimum=0)
    disc_weight: float = option(0.0, "weight of the patch discriminator's hinge-GAN term (0 = no discriminator)",
                                minimum=0)
    disc_start: int = option(0, "training step at which the discriminator switches on", minimum=0)


class AutoencoderModel(Model, LatentCodec):
    """The autoencoder family (module docstring)."""

    family = "autoencoder"
    options = AutoencoderOptions
    scores = "reconstructions"  # `unifusion eval`: PSNR, SSIM, rFID (evaluation/reconstruction.py)

    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.network != "auto" and not cfg.network.startswith("ae-"):
            raise ValueError(f"--family autoencoder takes an autoencoder preset (ae-f4, ae-f8), not --network "
                             f"{cfg.network}")

    @classmethod
    def upgrade_stored(cls, values: dict) -> dict:
        if values.get("network") == "unet-digits":  # the flat config's default, which meant ae-f4
            values["network"] = "auto"
        return values

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        return autoencoder_spec(cfg, source, data, made)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        t = spec.training
        self.net = networks.from_description(spec.network)
        self.kl_weight, self.rec_loss = float(t["kl_weight"]), t["rec_loss"]
        self.perceptual_weight, self.disc_weight = float(t["perceptual_weight"]), float(t["disc_weight"])
        self.disc_start = int(t["disc_start"]) * int(t["passes_per_step"])  # in training forward passes
        self.disc = networks.from_description(t["discriminator"]) if self.disc_weight > 0 else None
        # training forward passes so far: switches the discriminator on (persistent: checkpointed)
        self.register_buffer("passes", torch.zeros((), dtype=torch.int64))
        if self.perceptual_weight > 0:
            _perceptual()  # a clear error now rather than at the first step

    # ---------------------------------------------------------------- spec
    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        spec.network = networks.check_description(spec.network)
        if spec.network["class"] not in AUTOENCODER_NETWORKS:
            raise ValueError(f"the autoencoder family takes one of {sorted(AUTOENCODER_NETWORKS)}, got "
                             f"{spec.network['class']}: use --network ae-f4 or ae-f8")
        for name in ("process", "parametrization", "grid"):
            if getattr(spec, name) is not None:
                raise ValueError(f"an autoencoder has no {name} (it is not a denoiser); set it to null")
        if spec.calibrated or spec.conditioning.get("kind") != "none":
            raise ValueError("an autoencoder is unconditional and has no calibrated grids")
        shape, kw = list(spec.shape), spec.network["kwargs"]
        factor = 2 ** (len(kw["ch_mult"]) - 1)
        if len(shape) != 3 or shape[1] != shape[2] or shape[0] != kw["image_channels"] or shape[1] % factor:
            raise ValueError(f"autoencoder {spec.network['class']} with {kw['image_channels']} image channels and "
                             f"factor {factor} cannot take images of shape {shape}: they must be square, "
                             f"({kw['image_channels']}, H, H) with H a multiple of {factor}")
        t = spec.training or {}
        missing = sorted({"kl_weight", "rec_loss", "perceptual_weight", "disc_weight", "disc_start",
                          "passes_per_step", "sigma_data"} - set(t))
        if missing:
            raise ValueError(f"an autoencoder spec's training needs {missing}")
        if t["rec_loss"] not in REC_LOSSES:
            raise ValueError(f"rec_loss {t['rec_loss']!r} is unknown; choose one of {list(REC_LOSSES)}")
        for key in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start"):
            if not (isinstance(t[key], (int, float)) and 0 <= t[key] < math.inf):
                raise ValueError(f"{key} must be a finite number >= 0, got {t[key]!r}")
        if not (isinstance(t["passes_per_step"], int) and t["passes_per_step"] >= 1):
            raise ValueError(f"passes_per_step must be an integer >= 1, got {t['passes_per_step']!r}")
        if t["disc_weight"] > 0:
            disc = networks.check_description(t.get("discriminator"))
            if disc["class"] not in DISCRIMINATORS:
                raise ValueError(f"the discriminator must be one of {sorted(DISCRIMINATORS)}, got {disc['class']}")
            t["discriminator"] = disc
        latent = t.get("latent")
        if latent is not None:
            c = kw["latent_channels"]
            for key in ("shift", "scale", "mean", "std"):
                v = latent.get(key)
                if not (isinstance(v, list) and len(v) == c and all(math.isfinite(float(e)) for e in v)):
                    raise ValueError(f"latent statistics {key!r} must be {c} finite numbers, got {v!r}")
            if not all(float(s) > 0 for s in latent["scale"]):
                raise ValueError(f"latent statistics 'scale' must be > 0, got {latent['scale']}")

    # ---------------------------------------------------------------- the codec
    @property
    def factor(self) -> int:
        return self.net.factor

    @property
    def latent_channels(self) -> int:
        return self.net.latent_channels

    @property
    def image_channels(self) -> int:
        return self.net.image_channels

    @property
    def image_size(self) -> int:
        return int(self.spec.shape[-1])

    def _statistic(self, key: str) -> Tensor:
        latent = (self.spec.training or {}).get("latent")
        if latent is None:
            raise ValueError(NO_STATS.format(where=f"autoencoder {self._name()}"))
        return torch.tensor(latent[key], dtype=torch.float64)

    @property
    def shift(self) -> Tensor:
        return self._statistic("shift")

    @property
    def scale(self) -> Tensor:
        return self._statistic("scale")

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.net.encode(x)
        return mean, torch.exp(0.5 * logvar)

    def _decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z)

    # ---------------------------------------------------------------- training
    def random(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """eps ~ N(0, I) of the posterior sample z = mean + std * eps."""
        c, h, w = self.latent_channels, self.image_size // self.factor, self.image_size // self.factor
        return {"eps": torch.randn((n, c, h, w), generator=generator)}

    def terms(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The loss's parts, each (B,): rec, kl (unweighted, per pixel), perceptual (unweighted, 0
        when its weight is 0), adversarial (on * (disc_weight * gen + disc), 0 without a
        discriminator), gen, disc; and x_rec."""
        x = batch["x0"]
        eps = batch["eps"] if "eps" in batch else self.random(len(x), generator)["eps"]
        mean, logvar = self.net.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps.to(mean)
        x_rec = self.net.decode(z)
        diff = x_rec - x
        rec = (diff.abs() if self.rec_loss == "l1" else diff.pow(2)).flatten(1).mean(1)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1) / x[0].numel()
        zero = torch.zeros_like(rec)
        perceptual = _perceptual()(x, x_rec) if self.perceptual_weight > 0 else zero
        out = {"rec": rec, "kl": kl, "perceptual": perceptual, "adversarial": zero, "gen": zero, "disc": zero,
               "x_rec": x_rec}
        if self.disc is not None:
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            gen = -torch.func.functional_call(self.disc, frozen, (x_rec,)).flatten(1).mean(1)
            disc = _hinge(self.disc(x), self.disc(x_rec.detach()))
            on = (self.passes >= self.disc_start).to(rec.dtype)
            out.update(gen=gen, disc=disc, adversarial=on * (self.disc_weight * gen + disc))
        if self.training and torch.is_grad_enabled():
            self.passes += 1
        return out

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        t = self.terms(batch, generator)
        return (t["rec"] + self.kl_weight * t["kl"] + self.perceptual_weight * t["perceptual"]
                + t["adversarial"])

    @torch.no_grad()
    def preview_images(self, source, n: int = 8) -> Tensor:
        """The first n training images above their reconstructions from the posterior mean (the
        training loop's preview grid for this family), (2n, C, H, W) in [-1, 1]."""
        x = _examples(source, list(range(min(n, len(source)))))["x0"].to(self.device)
        return torch.cat([x, self.net(x).clamp(-1, 1)]).cpu()


def _examples(source, indices: list[int]) -> dict:
    from ..data import collate
    return source.batch(indices) if hasattr(source, "batch") else collate([source[i] for i in indices])


def _perceptual():
    try:
        from ..perceptual import perceptual_distance
    except ImportError:
        raise ValueError("--perceptual-weight needs unifusion.perceptual, which this installation lacks; train "
                         "with --perceptual-weight 0") from None
    return perceptual_distance


# ------------------------------------------------------------------------------ spec from a config
def autoencoder_spec(cfg, source, data: dict, made: dict) -> ModelSpec:
    """The spec `unifusion train --family autoencoder` trains: the preset (ae-f4 unless --network
    names another ae- preset) with image_channels from the data, the loss weights, and the
    discriminator when --disc-weight > 0."""
    o = cfg.options
    shape = tuple(source.shape)
    if getattr(source, "kind", "image") != "image" or len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"the autoencoder family trains on square images (C, H, H) in [-1, 1]; --data {cfg.data} "
                         f"holds {getattr(source, 'kind', '?')} examples of shape {shape}")
    preset = "ae-f4" if cfg.network == "auto" else cfg.network
    network = networks.describe(preset, **{"image_channels": shape[0], **cfg.network_args})
    if network["class"] not in AUTOENCODER_NETWORKS:
        raise ValueError(f"--family autoencoder takes an autoencoder preset (ae-f4, ae-f8), not --network {preset}")
    disc = None
    if o.disc_weight > 0:
        disc = networks.check_description({"class": "PatchDiscriminator", "kwargs": {
            "in_channels": shape[0], "base_channels": 32, "n_layers": discriminator_layers(shape[1])}})
    training = {"kl_weight": o.kl_weight, "rec_loss": o.rec_loss, "perceptual_weight": o.perceptual_weight,
                "disc_weight": o.disc_weight, "disc_start": o.disc_start, "passes_per_step": cfg.grad_accum,
                "discriminator": disc, "sigma_data": cfg.sigma_data}
    if made:
        training["made_from"] = made
    return ModelSpec(family="autoencoder", network=network, process=None, parametrization=None, grid=None,
                     data={**data, "range": [-1.0, 1.0]}, training=training).validate()


# ------------------------------------------------------------------------------ latent statistics
@torch.no_grad()
def measure_latent_statistics(ae: LatentCodec, source, n: int = STATS_N, sigma_data: float = 0.5,
                              batch_size: int = 256, progress: bool = True) -> dict:
    """Per-channel mean and std of the posterior means of the first n examples of `source`, and
    the normalisation they give: shift = mean, scale = sigma_data / std (module docstring)."""
    if n < 2:
        raise ValueError(f"latent statistics need n >= 2 images, got {n}")
    count = min(int(n), len(source))
    s1 = s2 = None
    k = 0
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc="latent statistics", unit="batch", disable=not progress or len(starts) < 2):
        x = _examples(source, list(range(start, min(count, start + batch_size))))["x0"]
        mean = ae.encode_posterior(x)[0].double().transpose(0, 1).flatten(1)  # (c, batch * h * w)
        s1 = mean.sum(1) if s1 is None else s1 + mean.sum(1)
        s2 = mean.pow(2).sum(1) if s2 is None else s2 + mean.pow(2).sum(1)
        k += mean.shape[1]
    mu = s1 / k
    std = (s2 / k - mu.pow(2)).clamp_min(0).sqrt()
    if not (std > 0).all() or not torch.isfinite(std).all():
        raise ValueError(f"latent channel(s) {(~(std > 0)).nonzero().flatten().tolist()} of the autoencoder are "
                         f"constant over {count} images, so they cannot be scaled to sigma_data; train it longer")
    return {"shift": mu.tolist(), "scale": (sigma_data / std).tolist(), "mean": mu.tolist(), "std": std.tolist(),
            "n": count, "sigma_data": float(sigma_data)}


def training_source(spec: ModelSpec):
    """The data an autoencoder was trained on (spec.data.source and options)."""
    from .. import data as datasets
    if not spec.data.get("source"):
        raise ValueError("the autoencoder's spec does not name its training data (spec.data.source)")
    return datasets.load(spec.data["source"], **(spec.data.get("options") or {}))


def check_stats_out(out: Path, weights: dict, ema: dict | None, overwrite: bool) -> None:
    """`out` may receive a model folder of these weights: it is new or empty, or already a model
    folder of exactly these weights (the same statistics written again); anything else (another
    model, older weights, other files) only with `overwrite`, and never a file."""
    from ..safeio import tensors_digest
    from . import io
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give the model folder to write")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    what = "files that are not a model folder"
    if (out / io.SPEC_FILE).is_file() and (out / io.WEIGHTS_FILE).is_file():
        try:
            _, have, have_ema, _ = io.read(out)
        except (ValueError, OSError):
            have = None
        same_ema = (have_ema is None) == (ema is None) and (ema is None or tensors_digest(have_ema) == tensors_digest(ema))
        if have is not None and same_ema and tensors_digest(have) == tensors_digest(weights):
            return
        what = "a model folder with other weights"
    raise ValueError(f"--out {out} already holds {what}; choose another --out, or pass --overwrite to replace its "
                     "model files")


def write_latent_statistics(path: str | Path, out: str | Path | None = None, n: int = STATS_N,
                            progress: bool = True, overwrite: bool = False) -> tuple[Path, dict]:
    """Measure the latent statistics of an autoencoder (a model folder, run or checkpoint; its EMA
    weights) and write them into a model folder's spec: the given model folder itself, else `out`
    (a model folder with the raw and EMA weights, checked by check_stats_out before anything is
    measured). Returns (folder, statistics)."""
    from . import build, io
    spec, weights, ema, info = io.read(path)
    if spec.family != "autoencoder":
        raise ValueError(f"{path} is a {spec.family} model, not an autoencoder")
    src = Path(info["where"])
    if out is not None and (src / io.SPEC_FILE).is_file() and Path(out).resolve() == src.resolve():
        out = None  # --out is the model folder itself: updated in place
    if out is None and not (src / io.SPEC_FILE).is_file():
        raise ValueError(f"{path} is not a model folder: give --out for the model folder to write")
    if out is not None:
        check_stats_out(Path(out), weights, ema, overwrite)
    model = build(spec)
    io.load_weights(model, ema if ema is not None else weights, info["where"])
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    stats = measure_latent_statistics(model, training_source(spec), n, float(spec.training["sigma_data"]),
                                      progress=progress)
    spec.training["latent"] = stats
    if out is None:
        return io.save_spec(src, spec), stats
    raw = build(spec)
    io.load_weights(raw, weights, info["where"])
    if overwrite:  # what was there goes, the spec first: a half-written folder is never a model
        for name in (io.SPEC_FILE, io.EMA_FILE, io.WEIGHTS_FILE):
            (Path(out) / name).unlink(missing_ok=True)
    return io.save(raw, out, ema) / io.SPEC_FILE, stats


# ------------------------------------------------------------------------------ loading
def _model_folder(p: Path) -> Path | None:
    """The model folder a path names: itself, or a finished run's <run>/model."""
    from .io import SPEC_FILE
    if (p / SPEC_FILE).is_file():
        return p
    if (p / "model" / SPEC_FILE).is_file():
        return p / "model"
    return None


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> LatentCodec:
    """The autoencoder object (module docstring) of a unifusion autoencoder (a model folder with
    latent statistics, or a finished run) or of a diffusers AutoencoderKL folder; eval mode,
    no gradients, fp32."""
    from . import io, vae_diffusers
    p = Path(path)
    if vae_diffusers.is_diffusers_folder(p):
        return vae_diffusers.load(p, device)
    folder = _model_folder(p)
    spec = ModelSpec.read(folder / io.SPEC_FILE) if folder else io.read(p)[0]
    if spec.family != "autoencoder":
        raise ValueError(f"{path} is a {spec.family} model, not an autoencoder; give an autoencoder (a run of "
                         "`unifusion autoencoder train` or a diffusers AutoencoderKL folder)")
    if folder is None or "latent" not in (spec.training or {}):
        raise ValueError(NO_STATS.format(where=str(path)))
    model = io.load(folder, device=device)
    used = folder / (io.EMA_FILE if model.info["weights"] == "ema" else io.WEIGHTS_FILE)
    model.origin = {"kind": "unifusion", "path": str(folder.resolve()), "digest": file_digest(used)}
    model.requires_grad_(False)
    return model.eval()


def check_autoencoder(ae: LatentCodec, recorded: dict) -> None:
    """Raise one ValueError when `ae` is not the autoencoder `recorded` (a describe() stored with
    latents or with a latent model) describes: its shape, its weights or its normalisation."""
    have = ae.describe()
    was = recorded.get("path", "?")
    for key in ("latent_channels", "factor", "image_channels"):
        if recorded.get(key) is not None and recorded[key] != have[key]:
            raise ValueError(f"these latents need an autoencoder with {key.replace('_', ' ')} {recorded[key]} "
                             f"({was}), but {have['path']} has {have[key]}; pass the original autoencoder or "
                             "re-encode with `unifusion encode`")
    a, b = str(recorded.get("digest", "")), have["digest"]
    if not a or not (a.startswith(b) or b.startswith(a)):
        raise ValueError(f"these latents were encoded with autoencoder {was} (digest {a[:16]}), not {have['path']} "
                         f"(digest {b[:16]}); re-encode with `unifusion encode` or pass the original")
    for key in ("shift", "scale"):
        if recorded.get(key) is not None and not torch.allclose(torch.tensor(recorded[key], dtype=torch.float64),
                                                                torch.tensor(have[key], dtype=torch.float64),
                                                                rtol=1e-6, atol=1e-9):
            raise ValueError(f"these latents were normalised with the {key} {recorded[key]} of autoencoder {was}, "
                             f"but {have['path']} now has {key} {have[key]} (its statistics were measured again); "
                             "re-encode with `unifusion encode`")
