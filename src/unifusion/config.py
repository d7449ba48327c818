"""Typed configuration: the one place where names become classes.

A run is a `TrainConfig`. It comes from defaults, then an optional YAML file, then `--key value`
overrides (dashes or underscores); an unknown key is an error that suggests the nearest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from . import losses, parametrizations, processes


@dataclass
class TrainConfig:
    # what to learn
    data: str = "digits-train"          # toy name, "digits[-train|-test]", an image folder or a .npz file
    image_size: int = 0                 # image folders: resize + center-crop to this (0 = keep)
    channels: int = 0                   # image folders: 1 or 3 (0 = infer)
    skip_corrupt: bool = False          # image folders: skip unreadable files (counted) instead of failing
    process: str = "edm"                # processes.PROCESSES
    parametrization: str = "edm"        # parametrizations.PARAMETRIZATIONS
    sigma_data: float = 0.5             # EDM preconditioning / weighting
    noise_density: str = "lognormal"    # lognormal | uniform_t | logit_normal | discrete
    weighting: str = "native"           # losses.weighting names
    network: str = "unet-digits"        # networks.PRESETS
    class_conditional: bool = True      # use labels when the data has them
    cond_drop: float = 0.1              # label dropout for classifier-free guidance
    # optimisation
    steps: int = 2400                   # the default run: about 4.5 minutes on 2 CPU cores
    batch_size: int = 128               # global: over all ranks and accumulation
    grad_accum: int = 1
    lr: float = 2e-3
    lr_schedule: str = "cosine"         # constant | cosine (after warmup)
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max gradient norm; 0 = off
    ema_half_life: float = 20000.0      # in training samples (EDM2)
    precision: str = "fp32"             # fp32 | bf16 | fp16 (fp16 only on GPU)
    compile: bool = False
    grad_checkpointing: bool = False
    max_bad_steps: int = 10             # abort after this many non-finite losses in a row
    # bookkeeping
    out: str = "runs/digits"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 800             # sample grid every N steps (0 = only at the end)
    sample_sampler: str = "dpmpp_2m"
    sample_nfe: int = 20
    log_every: int = 10
    resume: bool = False
    device: str = "auto"                # auto | cpu | cuda

    def validate(self) -> "TrainConfig":
        _choice("process", self.process, processes.PROCESSES)
        _choice("parametrization", self.parametrization, parametrizations.PARAMETRIZATIONS)
        _choice("noise_density", self.noise_density, NOISE_DENSITIES)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "sample_nfe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.cond_drop <= 1:
            raise ValueError(f"cond_drop must be in [0, 1], got {self.cond_drop}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


NOISE_DENSITIES = ("lognormal", "uniform_t", "logit_normal", "discrete")


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {sorted(valid)}")


def _coerce(key: str, value, typ):
    if isinstance(value, str) and typ is not str:
        if typ is bool:
            low = value.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key} expects true/false, got {value!r}")
            return low in ("true", "1", "yes")
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"{key} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is not str and not isinstance(value, typ):
        raise ValueError(f"{key} expects {typ.__name__}, got {value!r}")
    return value


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Apply `values` on top of `base` (defaults); unknown keys raise with a suggestion."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    types = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type] for f in fields(TrainConfig)}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in types:
            near = difflib.get_close_matches(key, list(types), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(types)}"
            raise ValueError(f"unknown config key {raw_key!r}{hint}")
        setattr(cfg, key, _coerce(key, value, types[key]))
    return cfg.validate()


def load(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file (if any) <- overrides."""
    values = {}
    if path:
        import yaml
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {path!r} does not exist")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of key: value")
    cfg = from_dict(values)
    return from_dict(overrides or {}, cfg)


def save(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=1))


def make_process(cfg: TrainConfig) -> processes.Process:
    return processes.get(cfg.process)


def make_parametrization(cfg: TrainConfig) -> parametrizations.Parametrization:
    if cfg.parametrization == "edm":
        return parametrizations.EDMPrecond(cfg.sigma_data)
    return parametrizations.get(cfg.parametrization)


def make_noise_density(cfg: TrainConfig, process: processes.Process) -> losses.NoiseDensity:
    if cfg.noise_density == "lognormal":
        return losses.LogNormal()
    if cfg.noise_density == "uniform_t":
        return losses.UniformT(process)
    if cfg.noise_density == "logit_normal":
        return losses.LogitNormalT()
    return losses.DiscreteUniform(process)
