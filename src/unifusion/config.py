"""Typed configuration: the one place where names become classes.

A run is a `TrainConfig`. It comes from defaults, then an optional YAML file, then `--key value`
overrides (dashes or underscores); an unknown key is an error that suggests the nearest valid
one. Three keys hold keyword arguments: `network_args`, `process_args` and `density_args`, set
in YAML as mappings or on the command line as `--network.model_channels 32`,
`--process.sigma_max 50`, `--density.p_mean -1.0`.

`model_spec(cfg, source)` turns a config and its data into the ModelSpec saved with the model.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import densities, parametrizations, processes

GROUPS = ("data", "model", "optimisation", "run")
NOISE_DENSITIES = tuple(densities.DENSITIES)
WEIGHTINGS = ("native", "edm", "snr", "min_snr5", "uniform")
# keys a resumed run may change: they do not alter what is being learned
RESUME_SAFE = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "sample_sampler",
               "sample_nfe", "device", "resume", "out", "num_workers", "threads", "max_bad_steps", "overwrite",
               "sharding"}
DEFAULT_NETWORK = "unet-digits"
PREFIXES = {"network": "network_args", "process": "process_args", "density": "density_args"}


def opt(default, group: str, help: str):
    kw = {"default_factory": dict} if default == {} else {"default": default}
    return field(metadata={"group": group, "help": help}, **kw)


@dataclass
class TrainConfig:
    # ---- data
    data: str = opt("digits-train", "data", "toy name, digits[-train|-test], an image folder, WebDataset tar "
                                            "shards (a .tar, a folder of them, or shards-{000..009}.tar) or an .npz file")
    image_size: int = opt(0, "data", "image folders and tar shards: resize + center-crop to this size (0 = keep)")
    channels: int = opt(0, "data", "image folders and tar shards: 1 or 3 (0 = infer)")
    skip_corrupt: bool = opt(False, "data", "image folders and tar shards: skip unreadable files / damaged "
                                            "shards instead of failing")
    num_workers: int = opt(0, "data", "DataLoader worker processes decoding images (0 = in the main process)")
    reflow: bool = opt(False, "data", "train on the data's noise-data couplings (from `unifusion couple`) instead "
                                      "of fresh noise: k-rectified flow; an error when the data has none")
    # ---- model
    family: str = opt("diffusion", "model", "model family: diffusion (every process x parametrization), cnf "
                                            "(the same denoiser trained by maximum likelihood), flow-nice, "
                                            "flow-realnvp, flow-glow (coupling flows; --network.X sets their "
                                            "arguments), autoencoder (a KL autoencoder, LDM-style: see `unifusion "
                                            "autoencoder train`)")
    dequantization: str = opt("uniform", "model", "likelihood families on discrete data: uniform | variational "
                                                  "(coupling flows only)")
    ode_tol: float = opt(1e-3, "model", "cnf: RK45 tolerance of the training solve")
    ode_steps: int = opt(0, "model", "cnf: fixed RK4 steps of the training solve instead (0 = adaptive RK45)")
    kl_weight: float = opt(1e-6, "model", "autoencoder: weight of KL(q(z|x) || N(0, I)) per pixel (LDM's 1e-6)")
    rec_loss: str = opt("l1", "model", "autoencoder: reconstruction loss, l1 | l2 (mean over pixels)")
    perceptual_weight: float = opt(0.0, "model", "autoencoder: weight of the perceptual distance (unifusion.perceptual)")
    disc_weight: float = opt(0.0, "model", "autoencoder: weight of the patch discriminator's hinge-GAN term "
                                           "(0 = no discriminator)")
    disc_start: int = opt(0, "model", "autoencoder: training step at which the discriminator switches on")
    process: str = opt("edm", "model", "noise process: " + ", ".join(sorted(processes.PROCESSES)))
    process_args: dict = opt({}, "model", "process arguments, e.g. --process.sigma_max 50 (VE), "
                                          "--process.schedule cosine (DDPM)")
    parametrization: str = opt("edm", "model", "what the network predicts: "
                               + ", ".join(sorted(parametrizations.PARAMETRIZATIONS)))
    sigma_data: float = opt(0.5, "model", "data std for EDM preconditioning and the 'edm' weighting")
    noise_density: str = opt("lognormal", "model", "training noise levels p(sigma): " + ", ".join(NOISE_DENSITIES))
    density_args: dict = opt({}, "model", "noise-density arguments, e.g. --density.p_mean -1.0")
    weighting: str = opt("native", "model", "loss weight lambda(sigma): " + ", ".join(WEIGHTINGS))
    shift: float = opt(1.0, "model", "SD3 time shift, used by the logit_normal density and the sd3 grid")
    network: str = opt(DEFAULT_NETWORK, "model", "network preset (networks.PRESETS); its arguments can be changed")
    network_args: dict = opt({}, "model", "network arguments over the preset's, e.g. --network.model_channels 32")
    init_from: str = opt("", "model", "start from this model's weights (a run, checkpoint or model folder; its EMA "
                                      "when it has one), e.g. the teacher of a reflow; the networks must match")
    objective: str = opt("denoise", "model", "what the model learns: denoise (the diffusion / flow-matching loss) | "
                                             "distill (onto couplings: --data from `unifusion couple`) | progressive "
                                             "(halve a --teacher's Euler steps) | cd (consistency distillation of a "
                                             "--teacher) | ict (improved consistency training): few-step students, "
                                             "see models/fewstep.py")
    teacher: str = opt("", "model", "progressive, cd: the teacher (a run, checkpoint or model folder)")
    student_steps: int = opt(0, "model", "distill: the student's steps K (0 = 1); progressive: K, where the teacher "
                                         "takes 2K (0 = half a distilled teacher's steps)")
    distance: str = opt("auto", "model", "few-step objectives: l2 | pseudo_huber | perceptual (auto = pseudo_huber "
                                         "for cd and ict, l2 otherwise)")
    cm_steps: int = opt(18, "model", "cd: the discretisation's N (karras, rho 7)")
    teacher_solver: str = opt("heun", "model", "cd: the teacher's ODE step, euler | heun")
    class_conditional: bool = opt(True, "model", "condition on labels when the data has them (the cnf and "
                                                 "coupling-flow families are unconditional and ignore labels)")
    cond_drop: float = opt(0.1, "model", "label dropout for classifier-free guidance")
    sigma_min: float = opt(0.0, "model", "default sampling sigma_min (0 = the process's own range)")
    sigma_max: float = opt(0.0, "model", "default sampling sigma_max (0 = the process's own; inf = pure noise)")
    grid: str = opt("native", "model", "default sampling grid (native = the process's own discretization)")
    # ---- optimisation
    steps: int = opt(2400, "optimisation", "training steps (the default run: about 4 minutes on 2 CPU cores)")
    batch_size: int = opt(128, "optimisation", "global batch: over all ranks and accumulation steps")
    grad_accum: int = opt(1, "optimisation", "gradient accumulation steps")
    lr: float = opt(2e-3, "optimisation", "peak learning rate (AdamW)")
    lr_schedule: str = opt("cosine", "optimisation", "constant | cosine (after warmup)")
    warmup_steps: int = opt(200, "optimisation", "linear learning-rate warmup steps")
    weight_decay: float = opt(0.0, "optimisation", "AdamW weight decay")
    grad_clip: float = opt(1.0, "optimisation", "max gradient norm (0 = off)")
    ema_half_life: float = opt(20000.0, "optimisation", "EMA half-life in training samples (EDM2)")
    posthoc_every: int = opt(0, "optimisation", "post-hoc EMA: save snapshots of two power-function EMAs every N "
                                                "steps to <out>/posthoc (0 = off; `unifusion ema` reconstructs any length)")
    posthoc_stds: str = opt("0.05,0.10", "optimisation", "post-hoc EMA: the relative stds of the two tracked profiles")
    precision: str = opt("fp32", "optimisation", "fp32 | bf16 | fp16 (fp16 only on GPU)")
    compile: bool = opt(False, "optimisation", "torch.compile the model for training")
    sharding: str = opt("ddp", "optimisation", "ddp | fsdp: under torchrun, replicate the model on every rank (DDP) or "
                                              "shard parameters, gradients and optimizer state per block (FSDP2; fp32 "
                                              "or bf16); one process runs unsharded either way. Checkpoints are the "
                                              "same full-weight files, so a run may resume under the other")
    grad_checkpointing: bool = opt(False, "optimisation", "recompute activations in backward to save memory")
    max_bad_steps: int = opt(10, "optimisation", "abort after this many non-finite losses in a row")
    threads: int = opt(0, "optimisation", "CPU threads per process (0 = auto, see README; OMP_NUM_THREADS wins)")
    # ---- run
    out: str = opt("runs/digits", "run", "run folder (one run per folder)")
    seed: int = opt(0, "run", "seed of weights, data order and every random draw")
    checkpoint_every: int = opt(500, "run", "checkpoint every N steps")
    keep_checkpoints: int = opt(3, "run", "how many checkpoints to keep")
    sample_every: int = opt(800, "run", "preview grid every N steps (0 = only at the end)")
    sample_sampler: str = opt("dpmpp_2m", "run", "sampler of the preview grids")
    sample_nfe: int = opt(20, "run", "denoiser calls of the preview grids")
    log_every: int = opt(10, "run", "log the loss every N steps")
    resume: bool = opt(False, "run", "continue the run in --out from its latest checkpoint and stored config")
    overwrite: bool = opt(False, "run", "delete an existing run in --out and start a new one")
    device: str = opt("auto", "run", "auto | cpu | cuda")

    def validate(self) -> "TrainConfig":
        from . import models, samplers
        from .samplers import grids
        _choice("family", self.family, models.FAMILIES)
        _choice("dequantization", self.dequantization, ("uniform", "variational"))
        if self.dequantization == "variational" and self.family not in models.flows.COUPLING_FAMILIES:
            raise ValueError(f"--dequantization variational is for the coupling flows (flow-nice, flow-realnvp, "
                             f"flow-glow), not --family {self.family}")
        if self.family in models.flows.COUPLING_FAMILIES and self.network != DEFAULT_NETWORK:
            raise ValueError(f"--network picks a denoiser preset; --family {self.family} has its own invertible "
                             f"network: set its arguments with --network.NAME VALUE (e.g. --network.hidden 64)")
        _choice("rec_loss", self.rec_loss, ("l1", "l2"))
        ae_preset = self.network.startswith("ae-")
        if self.family == "autoencoder" and self.network != DEFAULT_NETWORK and not ae_preset:
            raise ValueError(f"--family autoencoder takes an autoencoder preset (ae-f4, ae-f8), not --network "
                             f"{self.network}")
        if self.family != "autoencoder" and ae_preset:
            raise ValueError(f"--network {self.network} is an autoencoder; train it with --family autoencoder "
                             "(`unifusion autoencoder train`)")
        _choice("process", self.process, processes.PROCESSES)
        _choice("parametrization", self.parametrization, parametrizations.PARAMETRIZATIONS)
        _choice("noise_density", self.noise_density, NOISE_DENSITIES)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("sharding", self.sharding, ("ddp", "fsdp"))
        if self.sharding == "fsdp" and self.precision == "fp16":
            raise ValueError("--sharding fsdp trains in --precision fp32 or bf16 (fp16 needs a loss scaler "
                             "over sharded gradients, not supported); use bf16")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("sample_sampler", self.sample_sampler, samplers.names())
        _choice("grid", self.grid, list(grids.GRIDS) + ["native"])
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "sample_nfe",
                     "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        stds = posthoc_stds(self.posthoc_stds)
        if len(stds) < 1 or not all(0 < v < math.sqrt(1 / 12) for v in stds):
            raise ValueError(f"--posthoc-stds must be relative stds in (0, 0.288), e.g. 0.05,0.10; got {self.posthoc_stds!r}")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start", "posthoc_every", "sample_every",
                     "ode_steps", "warmup_steps", "image_size", "channels", "num_workers", "threads",
                     "weight_decay", "grad_clip", "sigma_min", "sigma_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "sigma_data", "ema_half_life", "shift", "ode_tol"):
            if not getattr(self, name) > 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"{flag(name)} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.cond_drop <= 1:
            raise ValueError(f"--cond-drop must be in [0, 1], got {self.cond_drop}")
        if self.channels not in (0, 1, 3):
            raise ValueError(f"--channels must be 0 (infer), 1 or 3, got {self.channels}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        if self.shift != 1 and self.noise_density not in ("logit_normal",) and self.grid not in ("native", "sd3"):
            raise ValueError("--shift applies to the logit_normal noise density and the sd3 grid; "
                             "use --noise-density logit_normal and/or --grid sd3")
        models.fewstep.check_config(self)  # --objective and its keys (may set the preview's sampler)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def posthoc_stds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--posthoc-stds: cannot read {text!r}; give comma-separated numbers, e.g. 0.05,0.10") from None


def flag(key: str) -> str:
    """A config key as its command-line flag: batch_size -> --batch-size."""
    return "--" + key.replace("_", "-")


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"{flag(key)} {value!r} is not valid; choose one of {sorted(valid)}")


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}


def _coerce(key: str, value, typ):
    if typ is dict:
        if isinstance(value, str):  # --network-args '{hidden: 32}' from the command line
            value = _scalar(value)
        if not isinstance(value, dict):
            raise ValueError(f"{flag(key)} expects a mapping like '{{name: value}}', got {value!r}; or "
                             f"write one flag per argument: --{key.split('_')[0]}.NAME VALUE")
        return {str(k): _scalar(v) for k, v in value.items()}
    if isinstance(value, str) and typ is not str:
        if typ is bool:
            low = value.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{flag(key)} expects true/false, got {value!r}")
            return low in ("true", "1", "yes")
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"{flag(key)} expects {typ.__name__}, got {value!r}") from None
    # YAML `steps: true` is a bool, and bool is an int in Python: refuse it for numbers
    if typ in (int, float) and isinstance(value, bool):
        raise ValueError(f"{flag(key)} expects {typ.__name__}, got the boolean {value!r}")
    if typ is float and isinstance(value, int):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ):
        raise ValueError(f"{flag(key)} expects {typ.__name__}, got {value!r}")
    return value


def _scalar(v):
    """A command-line argument value as YAML reads it (32 -> int, 1e-3 -> float, [1, 2] -> list)."""
    if not isinstance(v, str):
        return v
    import yaml
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def normalise(values: dict) -> dict:
    """Dashes to underscores; `network.X: v` into `network_args: {X: v}` (likewise process., density.)."""
    out: dict = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        head, dot, rest = key.partition(".")
        if dot and head in PREFIXES:
            out.setdefault(PREFIXES[head], {})[rest] = _scalar(value)
        else:
            out[key] = value
    return out


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Apply `values` on top of `base` (defaults); unknown keys raise with a suggestion."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    types = {f.name: _TYPES[f.type] for f in fields(TrainConfig)}
    for key, value in normalise(values).items():
        if key not in types:
            near = difflib.get_close_matches(key, list(types), n=1)
            hint = f"; did you mean {flag(near[0])}?" if near else "; see unifusion train --help"
            raise ValueError(f"unknown config key {flag(key)}{hint}")
        value = _coerce(key, value, types[key])
        if types[key] is dict:  # arguments merge into the base's
            value = {**getattr(cfg, key), **value}
        setattr(cfg, key, value)
    return cfg.validate()


def read_yaml(path: str) -> dict:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"config file {path!r} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of key: value")
    return values


def load(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file (if any) <- overrides."""
    values = read_yaml(path) if path else {}
    cfg = from_dict(values)
    return from_dict(overrides or {}, cfg)


def unsafe_changes(cfg: TrainConfig, stored: dict, keys=None) -> list[str]:
    """The keys (of `keys`, default all) where cfg differs from a stored run's config and that a
    resumed run may not change (not in RESUME_SAFE)."""
    return sorted(k for k in (keys if keys is not None else cfg.to_dict())
                  if k not in RESUME_SAFE and stored.get(k) != getattr(cfg, k))


def resumed(stored: dict, given: dict) -> TrainConfig:
    """The stored config of a run with the given keys applied; only RESUME_SAFE keys may change."""
    base = from_dict({k: v for k, v in stored.items() if k in {f.name for f in fields(TrainConfig)}})
    changed = from_dict(given, base)
    differ = unsafe_changes(changed, base.to_dict(), normalise(given))
    if differ:
        raise ValueError(f"--resume continues the stored run, whose {', '.join(flag(k) for k in differ)} "
                         f"cannot change (stored: {', '.join(repr(getattr(base, k)) for k in differ)}); "
                         f"only {', '.join(flag(k) for k in sorted(RESUME_SAFE - {'resume', 'overwrite'}))} may; "
                         "start a new run in another --out instead")
    return dataclasses.replace(changed, resume=True)


def help_text() -> str:
    """Every key with type, default and description, grouped (for `unifusion train --help`)."""
    lines = []
    for group in GROUPS:
        lines.append(f"{group}:")
        for f in fields(TrainConfig):
            if f.metadata["group"] != group:
                continue
            default = f.default if f.default is not dataclasses.MISSING else {}
            lines.append(f"  {flag(f.name):<22} {f.type:<5} (default {default!r})\n"
                         f"  {'':<22} {f.metadata['help']}")
    return "\n".join(lines)


def save(cfg: TrainConfig, path: Path) -> None:
    from .safeio import atomic_write
    atomic_write(path, json.dumps(cfg.to_dict(), indent=1))


def data_options(cfg: TrainConfig) -> dict:
    """The options of streamed image sources (folders, WebDataset tar shards), passed only there."""
    from .data.couplings import is_couplings
    if is_couplings(cfg.data) or not (Path(cfg.data).is_dir() or ".tar" in str(cfg.data)):
        if cfg.image_size or cfg.channels or cfg.skip_corrupt:
            raise ValueError("--image-size / --channels / --skip-corrupt apply only to image folders and tar "
                             f"shards, and --data {cfg.data!r} is neither")
        return {}
    return {"image_size": cfg.image_size or None, "channels": cfg.channels or None, "skip_corrupt": cfg.skip_corrupt}


# ------------------------------------------------------------------------------ the model spec
def latent_data(cfg: TrainConfig, source) -> dict:
    """spec.data of a model trained on a latents folder (data/latents.py): the latent shape, the
    autoencoder's describe() (sampling decodes with it), and the image data it was encoded from
    (what evaluation scores decoded samples against)."""
    image_data, image_options = source.reference
    return {"kind": "latent", "shape": list(source.shape), "range": None, "levels": None,
            "autoencoder": dict(source.autoencoder), "image_shape": list(source.image_shape),
            "image_range": [-1.0, 1.0], "source": image_data, "options": dict(image_options),
            "latents": str(Path(cfg.data).expanduser().resolve())}


def latent_network_args(preset: str, shape) -> dict:
    """A denoiser preset fitted to latents of `shape` (c, h, w): in_channels = c (UNet, DiT) and
    input_size = h (DiT's fixed patch grid); explicit --network.X arguments still win."""
    import inspect

    from . import networks
    if preset not in networks.PRESETS:
        return {}
    takes = inspect.signature(networks.PRESETS[preset][0].__init__).parameters
    fitted = {"in_channels": int(shape[0]), "input_size": int(shape[-1])} if len(shape) == 3 else {}
    return {k: v for k, v in fitted.items() if k in takes}


def model_spec(cfg: TrainConfig, source):
    """The ModelSpec a config trains on this data source."""
    from . import networks
    from .data import levels
    from .models import ModelSpec, flows
    data_range = [-1.0, 1.0] if getattr(source, "kind", "image") in ("image", "vector") else None
    data = {"kind": "pixel", "shape": list(source.shape), "range": data_range, "levels": levels(source),
            "source": str(cfg.data), "options": data_options(cfg)}
    made = {}  # how the model was made, beyond the config: couplings, initial weights
    couplings = getattr(source, "index", {}).get("format") == "unifusion-couplings"
    if getattr(source, "kind", None) == "latent" and getattr(source, "autoencoder", None):  # latents, or a latent
        data = latent_data(cfg, source)                                                  # teacher's couplings
    elif getattr(source, "reference", None) and source.reference[0]:  # couplings: scored against the teacher's data
        data["source"], data["options"] = source.reference[0], dict(source.reference[1])
    if couplings:
        made["couplings"] = {"folder": str(cfg.data), "teacher": source.index.get("teacher"),
                             "sampler": source.index.get("sampler")}
    if cfg.init_from:
        made["init_from"] = str(cfg.init_from)
    if made:  # couplings, teachers and initial weights come from a model of this data's shape
        from .models.fewstep import check_made_from
        check_made_from(cfg, source)
    if cfg.family == "autoencoder":  # an encoder/decoder (+ discriminator); no process, no noise levels
        from .models.autoencoder import autoencoder_spec
        return autoencoder_spec(cfg, source, data, made)
    if cfg.family in flows.COUPLING_FAMILIES:  # an invertible network; no process, no noise levels
        arch = flows.COUPLING_FAMILIES[cfg.family].architecture
        return ModelSpec(family=cfg.family, network=networks.describe_flow(arch, source.shape, **cfg.network_args),
                         process=None, parametrization=None, grid=None, data=data,
                         training={"dequantization": cfg.dequantization, **({"made_from": made} if made else {})}
                         ).validate()
    process = processes.get(cfg.process, **cfg.process_args)
    net_args = dict(cfg.network_args)
    if data["kind"] == "latent":  # the autoencoder decides the channels: the preset follows them
        net_args = {**latent_network_args(cfg.network, source.shape), **net_args}
    if cfg.grad_checkpointing:
        net_args["gradient_checkpointing"] = True
    param_kwargs = {"sigma_data": cfg.sigma_data} if cfg.parametrization == "edm" else {}
    density_kwargs = dict(cfg.density_args)
    if cfg.noise_density == "logit_normal" and cfg.shift != 1:
        density_kwargs.setdefault("shift", cfg.shift)
    densities.make(cfg.noise_density, process, **density_kwargs)  # unknown arguments fail here, before step 0
    grid = {"name": cfg.grid, "kwargs": {}}
    if cfg.shift != 1 and cfg.grid in ("native", "sd3"):
        grid = {"name": "sd3", "kwargs": {"shift": cfg.shift}}
    lo, hi = process.sigma_range()
    # a process whose time starts at sigma = 0 (flow) samples down to EDM's 0.002
    sigma_min = cfg.sigma_min or (lo if lo > 0 else 0.002)
    sigma_max = cfg.sigma_max or hi
    num_classes = source.num_classes if cfg.class_conditional and cfg.family == "diffusion" else 0
    conditioning = ({"kind": "class", "num_classes": num_classes, "drop": cfg.cond_drop,
                     "class_names": source.class_names} if num_classes else {"kind": "none"})
    training = {"noise_density": {"name": cfg.noise_density, "kwargs": density_kwargs},
                "weighting": cfg.weighting, "sigma_data": cfg.sigma_data}
    if cfg.family == "cnf":
        training = {"dequantization": cfg.dequantization, "ode_tol": cfg.ode_tol, "ode_steps": cfg.ode_steps}
    if made:
        training["made_from"] = made
    spec = ModelSpec(
        family=cfg.family, network=networks.describe(cfg.network, **net_args),
        process={"name": cfg.process, "kwargs": process.kwargs()},
        parametrization={"name": cfg.parametrization, "kwargs": param_kwargs},
        sigma_min=float(sigma_min), sigma_max=float(sigma_max), grid=grid, conditioning=conditioning,
        data=data, training=training,
    ).validate()
    if cfg.objective != "denoise":  # a few-step student of this denoiser: its family, grid and recipe
        from .models.fewstep import student_spec
        return student_spec(cfg, source, spec)
    return spec
