"""Typed configuration: the one place where names become classes.

A run is a `TrainConfig`. It comes from defaults, then an optional YAML file, then `--key value`
overrides (dashes or underscores); an unknown key is an error that suggests the nearest valid
one. Three keys hold keyword arguments: `network_args`, `process_args` and `density_args`, set
in YAML as mappings or on the command line as `--network.model_channels 32`,
`--process.sigma_max 50`, `--density.p_mean -1.0`.

`model_spec(cfg, source)` turns a config and its data into the ModelSpec saved with the model.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import densities, parametrizations, processes

GROUPS = ("data", "model", "optimisation", "run")
NOISE_DENSITIES = tuple(densities.DENSITIES)
WEIGHTINGS = ("native", "edm", "snr", "min_snr5", "uniform")
# keys a resumed run may change: they do not alter what is being learned
RESUME_SAFE = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "sample_sampler",
               "sample_nfe", "device", "resume", "out", "num_workers", "threads", "max_bad_steps", "overwrite",
               "sharding", "compile", "channels_last", "calibrate"}
AUTO_NETWORK = "auto"  # the family picks the network for the data
PREFIXES = {"network": "network_args", "process": "process_args", "density": "density_args"}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}


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
    keep_size: bool = opt(False, "data", "image folders and tar shards: keep each image's own size (train them "
                                         "packed: --pack-tokens)")
    max_area: int = opt(0, "data", "image folders and tar shards: keep each image's own size, scaled down (aspect "
                                   "ratio kept) to at most this many pixels (0 = no cap; implies --keep-size)")
    num_workers: int = opt(0, "data", "DataLoader worker processes decoding images (0 = in the main process)")
    reflow: bool = opt(False, "data", "train on the data's noise-data couplings (from `unifusion couple`) instead "
                                      "of fresh noise: k-rectified flow; an error when the data has none")
    # ---- model: what every family shares (a family's own options are in cfg.options, see models/options.py)
    family: str = opt("diffusion", "model", "model family (unifusion.models.registry): diffusion (every process x "
                                            "parametrization), cnf, flow-nice, flow-realnvp, flow-glow, autoencoder, "
                                            "or one registered by a plugin; `train --family X --help` shows its options")
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
    network: str = opt(AUTO_NETWORK, "model", "network preset (networks.PRESETS); auto = the family's default for "
                                              "the data's shape (vectors: mlp-2d, 8x8 images: unet-digits, larger "
                                              "images: unet-32, latents: fitted to their channels); its arguments can "
                                              "be changed")
    network_args: dict = opt({}, "model", "network arguments over the preset's, e.g. --network.model_channels 32")
    init_from: str = opt("", "model", "start from this model's weights (a run, checkpoint or model folder; its EMA "
                                      "when it has one), e.g. the teacher of a reflow; the networks must match")
    class_conditional: bool = opt(True, "model", "condition on labels when the data has them (the cnf and "
                                                 "coupling-flow families are unconditional and ignore labels)")
    cond_drop: float = opt(0.1, "model", "label (or caption) dropout for classifier-free guidance")
    text_encoder: str = opt("", "model", "condition on the data's captions through this frozen text encoder: a run of "
                                         "`unifusion encoder train` or a transformers CLIPTextModel / T5EncoderModel "
                                         "folder (the network gets its tokens and pooled vector)")
    text_pooled: bool = opt(True, "model", "with --text-encoder: also add the encoder's pooled vector to the noise "
                                           "embedding (SDXL / SD3); false: the tokens through attention only (SD 1.x)")
    sigma_min: float = opt(0.0, "model", "default sampling sigma_min (0 = the process's own range)")
    sigma_max: float = opt(0.0, "model", "default sampling sigma_max (0 = the process's own; inf = pure noise)")
    grid: str = opt("auto", "model", "default sampling grid (auto = the grid measured most accurate for the process, "
                                     "benchmarks/defaults.py; native = the process's own discretization)")
    sampler: str = opt("auto", "model", "default sampler, recorded in the model: what `sample`, `eval` and "
                                        "model.sample() use when none is named (auto = the sampler measured best "
                                        "for the process on its default grid, benchmarks/defaults.py; a few-step "
                                        "student keeps its own)")
    nfe: int = opt(0, "model", "default denoiser calls, recorded with the sampler (0 = the process's measured "
                               "default with --sampler auto, else 20)")
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
    compile: str = opt("off", "optimisation", "torch.compile the model for training: off | default (or true) | "
                                              "reduce-overhead (the compiled forward and backward replayed as CUDA "
                                              "graphs: for small networks, CUDA only) | max-autotune")
    channels_last: bool = opt(False, "optimisation", "convolutional networks (UNet, autoencoder) in the channels_last "
                                                     "memory format: faster convolutions on CUDA tensor cores, the same "
                                                     "results up to rounding")
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
    sample_sampler: str = opt("dpmpp_2m", "run", "sampler of the preview grids (with --sample-nfe 20, the defaults: "
                                                 "the model's own default sampler and NFE)")
    sample_nfe: int = opt(20, "run", "denoiser calls of the preview grids")
    calibrate: bool = opt(False, "run", "after training, fit the grid of the model's default sampler and NFE to the "
                                        "model (as `unifusion calibrate --save-to-model`) and store it in its spec, "
                                        "where default sampling uses it; a resumed run whose model already holds it "
                                        "keeps it")
    log_every: int = opt(10, "run", "log the loss every N steps")
    resume: bool = opt(False, "run", "continue the run in --out from its latest checkpoint and stored config")
    overwrite: bool = opt(False, "run", "delete an existing run in --out and start a new one")
    device: str = opt("auto", "run", "auto | cpu | cuda")

    # the family's own options (a dataclass of models/options.py fields); set from `family`
    options: Any = field(default=None, repr=True, metadata={"group": None, "help": ""})

    def __post_init__(self):
        if self.options is None:
            self.options = options_class(self.family)()

    def validate(self) -> "TrainConfig":
        from . import models, samplers
        from .models.options import check_values
        from .samplers import grids
        _choice("family", self.family, models.registry.names())
        if type(self.options) is not options_class(self.family):
            raise ValueError(f"the options given are not --family {self.family}'s")
        _choice("process", self.process, processes.PROCESSES)
        _choice("parametrization", self.parametrization, parametrizations.PARAMETRIZATIONS)
        _choice("noise_density", self.noise_density, NOISE_DENSITIES)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("sharding", self.sharding, ("ddp", "fsdp"))
        self.compile = compile_mode(self.compile)
        _choice("compile", self.compile, COMPILE_MODES)
        if self.channels_last and self.sharding == "fsdp":
            raise ValueError("--channels-last is not supported with --sharding fsdp (its shards are flat); use ddp")
        if self.sharding == "fsdp" and self.precision == "fp16":
            raise ValueError("--sharding fsdp trains in --precision fp32 or bf16 (fp16 needs a loss scaler "
                             "over sharded gradients, not supported); use bf16")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("sample_sampler", self.sample_sampler, samplers.names())
        _choice("grid", self.grid, list(grids.GRIDS) + ["native", "auto"])
        _choice("sampler", self.sampler, samplers.names() + ["auto"])
        if self.calibrate and self.sampler != "auto":
            how = samplers.get(self.sampler)
            if how.stochastic or how.adaptive:
                raise ValueError(f"--calibrate fits the grid of a deterministic fixed-step sampler; --sampler "
                                 f"{self.sampler} is {'stochastic' if how.stochastic else 'adaptive'}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "sample_nfe",
                     "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        stds = posthoc_stds(self.posthoc_stds)
        if len(stds) < 1 or not all(0 < v < math.sqrt(1 / 12) for v in stds):
            raise ValueError(f"--posthoc-stds must be relative stds in (0, 0.288), e.g. 0.05,0.10; got {self.posthoc_stds!r}")
        for name in ("posthoc_every", "sample_every", "warmup_steps", "image_size", "channels", "num_workers", "max_area",
                     "threads", "weight_decay", "grad_clip", "sigma_min", "sigma_max", "nfe"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "sigma_data", "ema_half_life", "shift"):
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
        if self.network != AUTO_NETWORK:
            from . import networks
            every = {**networks.PRESETS, **networks.AUTOENCODER_PRESETS}
            if self.network not in every:
                raise ValueError(f"--network {self.network!r} is not a preset; choose auto or one of {sorted(every)}")
        check_values(self.options, flag)
        for family in models.registry.chain(self.family):  # the family's own checks, then its extensions'
            family.check_options(self)
        return self

    def to_dict(self) -> dict:
        """The flat key -> value mapping of config.json and checkpoints: the shared keys and the
        family's own (YAML files and flags use the same names)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "options"}
        out.update(dataclasses.asdict(self.options))
        return out


def options_class(family: str):
    """The dataclass of `--family family`'s own options (models/registry.py); a family that is not
    registered gets an empty one here, and validate() names the valid families."""
    from . import models
    try:
        return models.registry.options_class(family)
    except ValueError:
        return _NO_OPTIONS


@dataclass
class _NoOptions:
    pass


_NO_OPTIONS = _NoOptions


def posthoc_stds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--posthoc-stds: cannot read {text!r}; give comma-separated numbers, e.g. 0.05,0.10") from None


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compile_mode(value) -> str:
    """--compile as a mode: true / false (flags, YAML and the boolean key of older stored configs) are
    'default' / 'off'; other values as given (validate checks them)."""
    low = str(value).lower()
    return "default" if low in ("true", "1", "yes") else "off" if low in ("false", "0", "no") else str(value)


def flag(key: str) -> str:
    """A config key as its command-line flag: batch_size -> --batch-size."""
    return "--" + key.replace("_", "-")


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"{flag(key)} {value!r} is not valid; choose one of {sorted(valid)}")


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


def _shared_types() -> dict[str, type]:
    return {f.name: _TYPES[f.type] for f in fields(TrainConfig) if f.name != "options"}


def from_dict(values: dict, base: TrainConfig | None = None, stored: bool = False) -> TrainConfig:
    """Apply `values` on top of `base` (defaults). The family (from `values`, else the base's)
    decides which keys exist besides the shared ones; an unknown key raises with a suggestion, a
    key of another family names that family. `stored`: values read from a run's stored config,
    where an older unifusion kept every family's keys in one flat mapping: keys of other families
    (which that run ignored) are dropped, and the family's `upgrade_stored` hook may rename values."""
    from . import models
    from .models.options import option_type
    values = normalise(values)
    cfg = copy.deepcopy(base) if base is not None else TrainConfig()
    family = str(values.get("family", cfg.family))
    if family != cfg.family or type(cfg.options) is not options_class(family):
        previous = dataclasses.asdict(cfg.options)
        cfg.family = family
        opts = options_class(family)()
        for f in fields(opts):  # an option both families have keeps its value
            if f.name in previous:
                setattr(opts, f.name, previous[f.name])
        cfg.options = opts
    if stored:
        try:
            values = models.registry.get(family).upgrade_stored(dict(values))
        except ValueError:
            pass  # an unknown family: validate() says so
    shared = _shared_types()
    own = {f.name: option_type(f) for f in fields(cfg.options)}
    for key, value in values.items():
        if key in shared:
            value = _coerce(key, compile_mode(value) if key == "compile" else value, shared[key])
            if shared[key] is dict:  # arguments merge into the base's
                value = {**getattr(cfg, key), **value}
            setattr(cfg, key, value)
        elif key in own:
            setattr(cfg.options, key, _coerce(key, value, own[key]))
        elif stored and _known_key(key):
            continue  # another family's key in an older flat config: that run never used it
        else:
            owners = [n for n in models.registry.owner_of(key) if n != family]
            if owners:
                raise ValueError(f"{flag(key)} is an option of --family {' / '.join(owners)}, not of --family "
                                 f"{family}; drop it, or train that family")
            near = difflib.get_close_matches(key, list(shared) + list(own), n=1)
            hint = f"; did you mean {flag(near[0])}?" if near else "; see unifusion train --help"
            raise ValueError(f"unknown config key {flag(key)}{hint}")
    return cfg.validate()


def _known_key(key: str) -> bool:
    from . import models
    return bool(models.registry.owner_of(key)) or key in LEGACY_KEYS


# keys an older unifusion stored for every run, whatever its family
LEGACY_KEYS = {"objective", "teacher", "student_steps", "distance", "cm_steps", "teacher_solver", "dequantization",
               "ode_tol", "ode_steps", "kl_weight", "rec_loss", "perceptual_weight", "disc_weight", "disc_start"}


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
    return from_dict({**values, **(overrides or {})})


def stored_config(stored: dict) -> TrainConfig:
    """A run's stored config (config.json or a checkpoint's) as today's TrainConfig."""
    return from_dict(stored, stored=True)


def unsafe_changes(cfg: TrainConfig, stored: dict | TrainConfig, keys=None) -> list[str]:
    """The keys (of `keys`, default all) where cfg differs from a stored run's config and that a
    resumed run may not change (not in RESUME_SAFE)."""
    before = (stored if isinstance(stored, TrainConfig) else stored_config(stored)).to_dict()
    now = cfg.to_dict()
    return sorted(k for k in (keys if keys is not None else now)
                  if k in now and k not in RESUME_SAFE and before.get(k) != now[k])


def resumed(stored: dict, given: dict) -> TrainConfig:
    """The stored config of a run with the given keys applied; only RESUME_SAFE keys may change. How the
    run was started (--overwrite, --resume) is not part of it: a run begun with --overwrite resumes."""
    base = stored_config({**stored, "overwrite": False, "resume": False})
    changed = from_dict(given, base)
    differ = unsafe_changes(changed, base, normalise(given))
    if differ:
        before = base.to_dict()
        raise ValueError(f"--resume continues the stored run, whose {', '.join(flag(k) for k in differ)} "
                         f"cannot change (stored: {', '.join(repr(before[k]) for k in differ)}); "
                         f"only {', '.join(flag(k) for k in sorted(RESUME_SAFE - {'resume', 'overwrite'}))} may; "
                         "start a new run in another --out instead")
    return dataclasses.replace(changed, resume=True)


def help_text(family: str | None = None) -> str:
    """Every key with type, default and description (for `unifusion train --help`): the shared
    keys by group, then the families' own options (only `family`'s when it is given), each under
    the family that declares it; a family extending another's command line (the students'
    --objective under --family diffusion) is shown with it."""
    from . import models

    def entry(f):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return (f"  {flag(f.name):<22} {_type_name(f):<5} (default {default!r})\n"
                f"  {'':<22} {f.metadata['help']}")
    lines = []
    for group in GROUPS:
        lines.append(f"{group}:")
        lines += [entry(f) for f in fields(TrainConfig) if f.metadata.get("group") == group]
    for name in ([family] if family else models.registry.names()):
        if models.registry.get(name).extends and not family:
            continue  # listed with the family it extends
        for cls in models.registry.chain(name):
            if cls.options is None:
                continue
            lines.append(f"family {name}:" if cls.family == name else
                         f"family {name}, options of the {cls.family} family (it extends {name}):")
            lines += [entry(f) for f in fields(cls.options)]
    return "\n".join(lines)


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def save(cfg: TrainConfig, path: Path) -> None:
    from .safeio import atomic_write
    atomic_write(path, json.dumps(cfg.to_dict(), indent=1))


def data_options(cfg: TrainConfig) -> dict:
    """The options of streamed image sources (folders, WebDataset tar shards), passed only there."""
    from .data.couplings import is_couplings
    if is_couplings(cfg.data) or not (Path(cfg.data).is_dir() or ".tar" in str(cfg.data)):
        if cfg.image_size or cfg.channels or cfg.skip_corrupt or cfg.keep_size or cfg.max_area:
            raise ValueError("--image-size / --channels / --skip-corrupt / --keep-size / --max-area apply only to "
                             f"image folders and tar shards, and --data {cfg.data!r} is neither")
        return {}
    out = {"image_size": cfg.image_size or None, "channels": cfg.channels or None, "skip_corrupt": cfg.skip_corrupt}
    if cfg.keep_size or cfg.max_area:  # only then, so the options of fixed-size runs stay as they were
        out.update({"keep_size": True, "max_area": cfg.max_area or None})
    return out


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


def model_spec(cfg: TrainConfig, source):
    """The ModelSpec a config trains on this data source: the generic data record and how the run
    was started, then the family's own spec_from_config (models.registry.for_config picks it)."""
    from . import models
    from .data import levels
    from .models.io import check_same_shape, read_spec
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
        _check_couplings_shape(cfg, source)
    if cfg.init_from:
        made["init_from"] = str(cfg.init_from)
        check_same_shape(read_spec(cfg.init_from, "--init-from"), source.shape, f"--init-from {cfg.init_from}",
                         str(cfg.data))
    family = models.registry.for_config(cfg.family, cfg.options)
    return family.spec_from_config(cfg, source, data, made)


def _check_couplings_shape(cfg: TrainConfig, source) -> None:
    """Couplings stand for the data their teacher was trained on: its shape must be theirs."""
    ref = getattr(source, "reference", None)
    if ref and ref[0] and getattr(source, "kind", None) != "latent":
        from . import data as datasets
        try:
            shape = tuple(datasets.load(ref[0], **(ref[1] or {})).shape)
        except (ValueError, OSError):
            shape = None  # the teacher's data moved: nothing to compare against (training does not need it)
        if shape is not None and shape != tuple(source.shape):
            raise ValueError(f"--data {cfg.data} holds couplings of shape {tuple(source.shape)}, but they stand for "
                             f"{ref[0]} of shape {shape}: couplings from a model of another shape")
