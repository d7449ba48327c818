"""ModelSpec: everything needed to rebuild a model from its weights, as JSON.

A model folder is ``spec.json`` + ``weights.safetensors`` (+ ``ema.safetensors``); nothing else
is read to load it (no preset names, no code paths in strings). The spec holds

    family          which Model class (models.FAMILIES): "diffusion" covers every process x parametrization;
                    "cnf" the same denoiser trained by maximum likelihood; "flow-nice", "flow-realnvp",
                    "flow-glow" the coupling flows (models/flows.py: no process, parametrization, grid);
                    "autoencoder" a KL autoencoder (models/autoencoder.py: no process, parametrization, grid)
    network         {"class": name in networks.NETWORKS, "kwargs": every constructor argument}
    process         {"name": name in processes.PROCESSES, "kwargs": its arguments}
    parametrization {"name": name in parametrizations.PARAMETRIZATIONS, "kwargs": ...}
    sigma_min, sigma_max   default sampling range (None: the process's own range; inf: pure noise)
    grid            {"name": default grid ("native": the process's own), "kwargs": ...}
    conditioning    {"kind": "none"} | {"kind": "class", "num_classes", "drop", "class_names"}
                    | {"kind": "text", "drop", "encoder": the frozen text encoder's describe() (kind, path, digest,
                       width, pooled_dim, context_length), "preview_prompts": [captions of the preview grids]}
    data            {"kind": "pixel", "shape": [C, H, W] | [D], "range": [-1, 1], "levels": L | null}
                    (levels: discrete data on L levels, dequantized by the likelihood families)
                    | {"kind": "latent", "shape": [c, h, w] (one latent), "range": null, "levels": null,
                       "autoencoder": its describe() (path, digest, factor, latent_channels, shift, scale, ...),
                       "image_shape": [C, H, W], "image_range": [-1, 1], "source": the image data,
                       "options", "latents": the folder trained on}: sampling decodes with that autoencoder
    training        {"noise_density": {"name", "kwargs"}, "weighting": name, "sigma_data": float,
                       "sampling": {"name", "nfe", "chosen_by"}: the default sampler and NFE (a spec without it,
                       from before they were recorded, samples with DEFAULT_SAMPLING)}
                    | autoencoder: {"kl_weight", "rec_loss", "perceptual_weight", "disc_weight", "disc_start",
                      "passes_per_step", "discriminator": network description | null, "sigma_data",
                      "latent": {"shift", "scale", "mean", "std": [c floats], "n", "sigma_data"} once measured}
    calibrated      {"<sampler>@<nfe>": calibration dict}: grids fitted to this model by `unifusion
                    calibrate --save-to-model` or `train --calibrate`, the default grid for that (sampler, NFE)

The "student" family (models/fewstep.py) adds training["objective"]: how it was made (distill,
progressive, cd, ict; teacher, distance, N, ...) and its own "sampler" {"name", "nfe"}, the
default of `sample_defaults`; its grid is "levels" or "consistency".
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SPEC_VERSION = 1
CONDITIONING_KINDS = ("none", "class", "text")
TEXT_ENCODER_FIELDS = ("kind", "path", "digest", "width", "pooled_dim", "context_length")
DATA_KINDS = ("pixel", "latent")


def check_latent_data(data: dict) -> None:
    """The fields of latent data: the autoencoder (digest, latent_channels, factor) and an image
    shape that it maps to the latent shape."""
    ae, shape, image = data.get("autoencoder"), list(data.get("shape") or []), data.get("image_shape")
    if not (isinstance(ae, dict) and isinstance(ae.get("digest"), str) and ae.get("path")
            and all(isinstance(ae.get(k), int) and ae[k] >= 1 for k in ("latent_channels", "factor"))):
        raise ValueError("spec data kind 'latent' needs 'autoencoder': the autoencoder's describe() with path, "
                         f"digest, latent_channels and factor, got {ae!r}")
    if not (isinstance(image, list) and len(image) == 3 and all(isinstance(v, int) and v >= 1 for v in image)):
        raise ValueError(f"spec data kind 'latent' needs 'image_shape' [C, H, W], got {image!r}")
    f, c = ae["factor"], ae["latent_channels"]
    if shape != [c, image[1] // f, image[2] // f] or image[1] % f or image[2] % f:
        raise ValueError(f"spec data: latents of shape {shape} do not come from {image} images through an "
                         f"autoencoder with {c} latent channels and factor {f}")


# what `unifusion sample` / `eval` and model.sample() use for a model whose spec records no default sampler
# (every model trained before training["sampling"] existed); new models record theirs (sampling_record)
DEFAULT_SAMPLING = ("dpmpp_2m", 20)


def sampling_record(name: str, nfe: int, chosen_by: str) -> dict:
    """spec.training["sampling"]: a model's default sampler and NFE, and what chose them."""
    if not isinstance(name, str) or not name or not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"a default sampling needs a sampler name and an NFE >= 1, got {name!r} at {nfe!r}")
    return {"name": name, "nfe": int(nfe), "chosen_by": str(chosen_by)}


def calibration_key(sampler: str, nfe: int) -> str:
    return f"{sampler}@{nfe}"


def _named(value, what: str) -> dict:
    if not isinstance(value, dict) or "name" not in value or not set(value) <= {"name", "kwargs"}:
        raise ValueError(f"spec {what} must be {{'name': ..., 'kwargs': {{...}}}}, got {value!r}")
    return {"name": value["name"], "kwargs": dict(value.get("kwargs") or {})}


@dataclass
class ModelSpec:
    family: str = "diffusion"
    network: dict = field(default_factory=dict)
    process: dict | None = field(default_factory=lambda: {"name": "edm", "kwargs": {}})
    parametrization: dict | None = field(default_factory=lambda: {"name": "edm", "kwargs": {"sigma_data": 0.5}})
    sigma_min: float | None = None
    sigma_max: float | None = None
    grid: dict | None = field(default_factory=lambda: {"name": "native", "kwargs": {}})
    conditioning: dict = field(default_factory=lambda: {"kind": "none"})
    data: dict = field(default_factory=lambda: {"kind": "pixel", "shape": [], "range": [-1.0, 1.0]})
    training: dict = field(default_factory=dict)
    calibrated: dict = field(default_factory=dict)  # "sampler@nfe" -> a calibration (samplers/calibrate.py)
    version: int = SPEC_VERSION

    # ------------------------------------------------------------------ checks
    def validate(self) -> "ModelSpec":
        """Every name known and every argument accepted; raises ValueError naming the field. The
        fields every family shares are checked here, the rest by the family's check_spec."""
        from . import registry
        if self.version > SPEC_VERSION:
            raise ValueError(f"spec version {self.version} is newer than this unifusion reads ({SPEC_VERSION}); upgrade")
        family = registry.get(self.family)  # an unknown name says how to register it
        kind = self.conditioning.get("kind")
        if kind not in CONDITIONING_KINDS:
            raise ValueError(f"spec conditioning kind {kind!r} is unknown; choose one of {list(CONDITIONING_KINDS)}")
        if kind == "class" and not (isinstance(self.conditioning.get("num_classes"), int)
                                    and self.conditioning["num_classes"] >= 1):
            raise ValueError("spec conditioning 'class' needs num_classes >= 1")
        if kind == "text":
            enc = self.conditioning.get("encoder")
            missing = [k for k in TEXT_ENCODER_FIELDS if not isinstance(enc, dict) or k not in enc]
            if missing:
                raise ValueError(f"spec conditioning 'text' needs 'encoder': the text encoder's describe() with "
                                 f"{list(TEXT_ENCODER_FIELDS)}; missing {missing}")
        if self.data.get("kind") not in DATA_KINDS:
            raise ValueError(f"spec data kind {self.data.get('kind')!r} is unknown; choose one of {list(DATA_KINDS)}")
        if not self.data.get("shape"):
            raise ValueError("spec data needs the shape of one example, e.g. [1, 8, 8]")
        if self.data["kind"] == "latent":
            check_latent_data(self.data)
        levels = self.data.get("levels")
        if levels is not None and not (isinstance(levels, int) and levels >= 2):
            raise ValueError(f"spec data levels must be an integer >= 2 (or null for continuous data), got {levels!r}")
        family.check_spec(self)
        return self

    def check_denoiser_fields(self) -> None:
        """network, process, parametrization, grid, sigma range and calibrated grids: the fields of
        the families sampled through uf.sample (diffusion, cnf)."""
        from .. import networks, parametrizations, processes
        self.network = networks.check_description(self.network)
        self.process = _named(self.process, "process")
        self.parametrization = _named(self.parametrization, "parametrization")
        self.grid = _named(self.grid, "grid")
        processes.get(self.process["name"], **self.process["kwargs"])  # raises on unknown names/args
        parametrizations.get(self.parametrization["name"], **self.parametrization["kwargs"])
        lo, hi = self.sigma_range()
        if not 0 < lo < hi:
            raise ValueError(f"spec sigma range must satisfy 0 < sigma_min < sigma_max, got [{lo}, {hi}]")
        self.check_sampling()
        from ..samplers.calibrate import Calibration
        for key, cal in self.calibrated.items():
            c = Calibration.from_dict(cal, where=f"spec calibrated[{key!r}]")
            if key != calibration_key(c.sampler, c.nfe):
                raise ValueError(f"spec calibrated[{key!r}] holds a grid for {c.sampler} at NFE {c.nfe}")

    def sampling_defaults(self) -> tuple[str, int]:
        """(sampler, NFE) used when none is named: a few-step student's own (recorded in
        training["objective"]["sampler"], e.g. euler at K), else the model's recorded default
        (training["sampling"], chosen when it was trained), else DEFAULT_SAMPLING (older specs)."""
        train = self.training or {}
        own = train.get("objective", {}).get("sampler") or train.get("sampling")
        return (own["name"], int(own["nfe"])) if own else DEFAULT_SAMPLING

    def check_sampling(self) -> None:
        """training["sampling"], when recorded: a known sampler and an NFE >= 1."""
        rec = (self.training or {}).get("sampling")
        if rec is None:
            return
        from .. import samplers
        if not isinstance(rec, dict) or set(rec) != {"name", "nfe", "chosen_by"}:
            raise ValueError(f"spec training sampling must be {{'name', 'nfe', 'chosen_by'}}, got {rec!r}")
        sampling_record(rec["name"], rec["nfe"], rec["chosen_by"])
        if rec["name"] not in samplers.names():
            raise ValueError(f"spec training sampling: unknown sampler {rec['name']!r}; choose one of "
                             f"{samplers.names()}")

    def calibration(self, sampler: str, nfe: int | None, sigma_min: float | None = None,
                    sigma_max: float | None = None, options: dict | None = None):
        """The calibrated grid stored for (sampler, nfe), or None; with a sigma range (and sampler
        options), only one calibrated on that range (with those options): what default sampling uses."""
        from ..samplers.calibrate import Calibration
        cal = self.calibrated.get(calibration_key(sampler, nfe)) if nfe is not None else None
        cal = None if cal is None else Calibration.from_dict(cal)
        if cal is not None and sigma_min is not None and (sigma_min, sigma_max) != (cal.sigma_min, cal.sigma_max):
            return None  # calibrated for the model's own range only
        if cal is not None and options is not None and dict(cal.options) != options:
            return None  # a grid fitted with other sampler options is no better than a guess
        return cal

    def sigma_range(self) -> tuple[float, float]:
        """The default sampling range: the spec's values, else the process's own range."""
        from .. import processes
        lo, hi = processes.get(self.process["name"], **self.process["kwargs"]).sigma_range()
        return (lo if self.sigma_min is None else self.sigma_min,
                hi if self.sigma_max is None else self.sigma_max)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data["shape"])

    @property
    def num_classes(self) -> int:
        return int(self.conditioning.get("num_classes", 0)) if self.conditioning.get("kind") == "class" else 0

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("sigma_min", "sigma_max"):  # JSON has no inf: store it as the string "inf"
            if d[key] is not None and math.isinf(d[key]):
                d[key] = "inf"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec") -> "ModelSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a model spec is a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown spec field(s) {unknown}; valid fields are {sorted(known)}")
        d = dict(d)
        for key in ("sigma_min", "sigma_max"):
            if d.get(key) == "inf":
                d[key] = math.inf
        try:
            return cls(**d).validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def read(cls, path: str | Path) -> "ModelSpec":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}); restore it from the run's checkpoint state.json") from None
        return cls.from_dict(d, where=str(p))
