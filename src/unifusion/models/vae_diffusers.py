"""A diffusers AutoencoderKL (e.g. the Stable Diffusion VAE) as a unifusion autoencoder.

A folder with config.json ("_class_name": "AutoencoderKL") and diffusion_pytorch_model.safetensors,
as `save_pretrained` writes it (or a pipeline folder whose vae/ subfolder is one), is loaded
locally (nothing is downloaded) in fp32 and answers the autoencoder interface of
models/autoencoder.py:

    factor          2 ** (len(block_out_channels) - 1)
    latent_channels config.latent_channels;  image_channels config.in_channels;  image_size None
    shift, scale    config.shift_factor (or 0) and config.scaling_factor (or 1), one number for every
                    channel, in diffusers' convention z_n = (z - shift) * scale (SD: 0, 0.18215;
                    SD3: 0.0609, 1.5305); a VAE whose config has per-channel latents_mean and
                    latents_std (as SDXL pipelines use them) gets shift = latents_mean and
                    scale = scaling_factor / latents_std
    encode_posterior  latent_dist.mean, latent_dist.std;   decode_raw  .decode(z).sample

diffusers is an optional dependency (pip install 'unifusion[diffusers]'); it is imported only here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .autoencoder import LatentCodec, file_digest

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"


def _config_path(p: Path) -> Path | None:
    """The diffusers config.json of a VAE folder (or of a pipeline folder's vae/), else None."""
    for folder in (p, p / "vae"):
        cfg = folder / CONFIG
        if cfg.is_file():
            try:
                d = json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(d, dict) and "_class_name" in d:
                return cfg
    return None


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a folder holding a diffusers model config (any class: load() names a wrong one)."""
    return Path(path).is_dir() and _config_path(Path(path)) is not None


class DiffusersAutoencoder(LatentCodec, nn.Module):
    """The autoencoder interface around a diffusers AutoencoderKL (module docstring)."""

    def __init__(self, vae: nn.Module, origin: dict):
        nn.Module.__init__(self)
        self.vae = vae
        cfg = vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels, self.image_channels, self.image_size = int(cfg.latent_channels), int(cfg.in_channels), None
        c, s = self.latent_channels, float(getattr(cfg, "scaling_factor", None) or 1.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None and len(mean) == c and len(std) == c:
            self.shift = torch.tensor(mean, dtype=torch.float64)
            self.scale = s / torch.tensor(std, dtype=torch.float64)
        else:
            self.shift = torch.full((c,), float(getattr(cfg, "shift_factor", None) or 0.0), dtype=torch.float64)
            self.scale = torch.full((c,), s, dtype=torch.float64)
        self.origin = origin

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample


def load(path: str | Path, device: str | torch.device = "cpu") -> DiffusersAutoencoder:
    """A diffusers AutoencoderKL folder as a DiffusersAutoencoder (eval mode, fp32, no gradients)."""
    p = Path(path)
    cfg_path = _config_path(p)
    if cfg_path is None:
        raise ValueError(f"{p} is not a diffusers model folder (no {CONFIG} with a _class_name)")
    folder = cfg_path.parent
    found = json.loads(cfg_path.read_text())["_class_name"]
    if found != "AutoencoderKL":
        raise ValueError(f"{folder} holds a diffusers {found}, not an AutoencoderKL; give the folder of the VAE "
                         "(config.json with \"_class_name\": \"AutoencoderKL\")")
    if not (folder / WEIGHTS).is_file():
        raise ValueError(f"{folder} has no {WEIGHTS} (unifusion reads safetensors only, never pickled .bin files); "
                         "convert it with diffusers: AutoencoderKL.from_pretrained(folder).save_pretrained(folder, "
                         "safe_serialization=True)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(f"{folder} is a diffusers AutoencoderKL and diffusers is not installed: "
                         "pip install 'unifusion[diffusers]'") from None
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                        torch_dtype=torch.float32, low_cpu_mem_usage=False)
    origin = {"kind": "diffusers", "path": str(folder.resolve()), "digest": file_digest(folder / WEIGHTS)}
    ae = DiffusersAutoencoder(vae.float(), origin).to(device)
    ae.requires_grad_(False)
    return ae.eval()
