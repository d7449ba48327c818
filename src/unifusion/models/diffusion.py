"""The denoiser family: every process x parametrization of DESIGN §1 as one Model.

    loss   = lambda(sigma) || D(x_0 + sigma n, sigma, cond) - x_0 ||^2,  sigma ~ p(sigma)
    sample = uf.sample on D from the spec's own sigma range and native grid (a flow model starts
             at t = 1 exactly: sigma_max = inf, the first step taken from pure noise)
    log_likelihood = the PF-ODE with the divergence (likelihood.py)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import densities, losses, networks, parametrizations, processes
from .. import samplers as S
from ..guidance import classifier_free
from . import conditioning, packing
from .base import Model, seed_noise
from .spec import ModelSpec

LIKELIHOOD_SIGMA_MAX = 1e3  # where the PF-ODE prior N(0, sigma^2 I) stands in for an infinite sigma_max


class DiffusionModel(Model):
    family = "diffusion"
    options = packing.PackingOptions  # --pack-tokens (models/packing.py)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.net = networks.from_description(spec.network)
        self.cond = conditioning.build(spec.conditioning, getattr(self.net, "emb_dim", 0))
        self.process = processes.get(spec.process["name"], **spec.process["kwargs"])
        self.param = parametrizations.get(spec.parametrization["name"], **spec.parametrization["kwargs"])
        train = spec.training or {}
        nd = train.get("noise_density", {"name": "lognormal", "kwargs": {}})
        self.density = densities.make(nd["name"], self.process, **nd.get("kwargs", {}))
        sigma_data = spec.parametrization["kwargs"].get("sigma_data", train.get("sigma_data", 0.5))
        self.weight = losses.weighting(train.get("weighting", "native"), self.param, sigma_data)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        spec.check_denoiser_fields()

    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.network.startswith("ae-"):
            raise ValueError(f"--network {cfg.network} is an autoencoder; train it with --family autoencoder "
                             "(`unifusion autoencoder train`)")
        packing.check_options(cfg)

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        spec = with_sampling(denoiser_spec(cfg, source, data, made, family=cls.family), cfg)
        return packing.with_packing(spec, cfg, source)

    def data_source(self, source):
        if self.cond.kind == "text":  # captions in the items
            from ..data.source import captioned
            source = captioned(source)
        if "packing" in (self.spec.training or {}):  # token-budget batches of slots (data/packing.py)
            source = packing.packed_source(self, source)
        return source

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """D(x, sigma, **cond) = E[x_0 | x] in the sigma-domain: what every sampler takes."""
        return parametrizations.denoise(self.net, self.process, self.param, x, sigma,
                                        **self.cond.net_kwargs(cond, x.shape[0]))

    # ------------------------------------------------------------------ training
    def random(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """sigma ~ p(sigma), unit noise, and the condition-dropout mask, in this order."""
        out = {"sigma": self.density.sample(n, generator),
               "noise": torch.randn((n,) + self.spec.shape, generator=generator)}
        if self.cond.kind != "none" and getattr(self.cond, "p_drop", 0) > 0:
            out["drop"] = torch.rand(n, generator=generator) < self.cond.p_drop
        return out

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        x0 = batch["x0"]
        drops = self.cond.kind != "none" and getattr(self.cond, "p_drop", 0) > 0
        missing = [k for k in ("sigma", "noise") + (("drop",) if drops else ()) if k not in batch]
        draws = self.random(len(x0), generator) if missing else {}  # generator None: the global RNG
        sigma = batch.get("sigma", draws.get("sigma")).to(x0.device, x0.dtype)
        noise = batch.get("noise", draws.get("noise")).to(x0.device, x0.dtype)
        cond = batch.get("cond") or {} if self.cond.kind != "none" else {}  # unconditional: labels unused
        if self.cond.kind != "none":
            if not cond:
                raise ValueError(f"this model is {self.cond.kind}-conditional but the batch has no 'cond'; "
                                 "train on labelled data or with --class-conditional false")
            drop = batch.get("drop", draws.get("drop"))
            if drop is not None:
                cond = self.cond.drop(cond, drop)
        if "size" in batch:  # a packed batch of variable-size images (models/packing.py)
            return packing.packed_loss(self, batch, sigma, noise, cond)
        return losses.denoising_loss(self.denoise, x0, sigma, self.weight, noise=noise, **cond)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int | None = None, seeds=None, noise: Tensor | None = None, sampler: str | None = None,
               nfe: int | None = None, steps: int | None = None, cond: dict | None = None, cfg: float = 1.0,
               grid=None, sigma_min: float | None = None, sigma_max: float | None = None,
               batch_size: int = 256, generator_seed: int = 0, progress: bool = False,
               return_cond: bool = False, grid_options: dict | None = None, temperature: float = 1.0,
               decode: bool = True, prompts: list[str] | None = None, size: tuple[int, int] | None = None,
               **options):
        """Samples in data space, one per seed (default seeds 0..n-1).

        The starting noise of sample i is unit noise from its own generator seeded with seeds[i]
        (or row i of `noise`), so with a deterministic sampler a sample depends only on its seed
        and condition, never on the batch it was drawn in. sampler and NFE default to the model's own
        (spec.sampling_defaults(): recorded when it was trained; dpmpp_2m at 20 for older models), a
        named sampler without nfe or steps to the model's NFE. Range and grid default to the spec's; the
        grid to one calibrated to this model for (sampler, nfe) when the spec stores one (`unifusion
        calibrate --save-to-model`, `train --calibrate`). cond defaults to the conditioning's default
        (class: seed % K); cfg is the classifier-free guidance scale (1: conditional, 0: unconditional); temperature
        scales the starting noise (1: the model's own distribution).
        With return_cond=True returns (x, cond). decode=False returns a latent model's latents
        (normalised, undecoded; e.g. for couplings in latent space) instead of images.
        prompts: a text-conditional model's captions, one per seed (or one for all); "" is the
        null caption (unconditional).
        size: (height, width) in data pixels, for a transformer (any multiple of its patch; latent models: of
        patch x the autoencoder factor); None: the trained size (several: the most frequent).
        """
        seeds = self._seeds(n, seeds, noise)
        shape = packing.sample_shape(self, size) if size is not None or "sizes" in self.spec.data else self.spec.shape
        if prompts is not None:
            if self.cond.kind != "text":
                raise ValueError("prompts need a text-conditional model (trained with --text-encoder); this one is "
                                 + ("class-conditional: use --label" if self.cond.kind == "class" else "unconditional"))
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if len(prompts) == 1:
                prompts = prompts * len(seeds)
            if len(prompts) != len(seeds):
                raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds: give one prompt, or one per seed")
            cond = {"caption": prompts}
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        lo, hi = self.spec.sigma_range()
        sigma_min = lo if sigma_min is None else sigma_min
        sigma_max = hi if sigma_max is None else sigma_max
        own, own_nfe = self.spec.sampling_defaults()
        sampler = sampler or own
        if nfe is None and steps is None:
            nfe = own_nfe
        if grid is None and steps is None:  # a grid stored for the pair (calibrated, or searched levels)
            grid = self.stored_grid(sampler, nfe, sigma_min, sigma_max, options)
        grid = grid if grid is not None else self.spec.grid["name"]
        grid_options = grid_options if grid_options is not None else (
            self.spec.grid["kwargs"] if isinstance(grid, str) and grid == self.spec.grid["name"] else {})
        if math.isinf(sigma_max):  # the first step is D at sigma = inf: a parametrization without a limit there
            parametrizations.limit_at_infinity(self.param, self.process)  # is one clear error, not NaN samples
        if cfg != 1 and self.cond.kind == "none":
            raise ValueError(f"--cfg {cfg} needs a conditional model; this one is unconditional")
        if cond is None:
            cond = self.cond.default(seeds)
        device = self.device
        outs = []
        chunks = range(0, len(seeds), batch_size)
        for start in tqdm(chunks, desc="sample", unit="batch", disable=not progress or len(chunks) < 2):
            chunk = seeds[start:start + batch_size]
            z = (noise[start:start + len(chunk)].to(torch.float32) if noise is not None
                 else seed_noise(shape, chunk))
            z = z.to(device) * (temperature * (1.0 if math.isinf(sigma_max) else sigma_max))
            c = self.cond.prepare({k: v[start:start + len(chunk)] for k, v in (cond or {}).items()}, device)
            null = self.cond.prepare(self.cond.null(len(chunk), device), device) if cfg != 1 else None
            den = self.denoise if cfg == 1 else classifier_free(self.denoise, cfg, null)
            gen = torch.Generator(device=device).manual_seed(generator_seed + start)
            x = S.sample(den, z, sampler, nfe=nfe, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                         grid=grid, generator=gen, cond=c, process=self.process, grid_options=grid_options,
                         progress=progress and len(chunks) == 1, **options)  # one batch: a bar over its calls
            outs.append((self.decode(x) if decode or self.spec.data.get("kind") != "latent" else x).cpu())
        x = torch.cat(outs)
        return (x, cond) if return_cond else x

    def sampler_options(self, sampler: str) -> dict:
        """The sampler options sample() adds on its own (a few-step student's consistency floor)."""
        return {}

    def stored_grid(self, sampler: str, nfe: int | None, sigma_min: float | None = None,
                    sigma_max: float | None = None, options: dict | None = None):
        """The grid stored in the spec for (sampler, nfe) (`unifusion calibrate --save-to-model`,
        `train --calibrate`, `unifusion eval --search-levels`) when it was made for this sigma range
        (None: the model's own) and these sampler options (with the ones sample() adds), else None."""
        lo, hi = self.spec.sigma_range()
        return self.spec.calibration(sampler, nfe, lo if sigma_min is None else sigma_min,
                                     hi if sigma_max is None else sigma_max,
                                     {**self.sampler_options(sampler), **(options or {})})

    # ------------------------------------------------------------------ calibration
    def calibration_pair(self, sampler: str | None = None, nfe: int | None = None) -> tuple[str, int]:
        """(sampler, NFE) that calibrate() fits: the given ones, else the model's default; ValueError
        when that sampler has no grid to fit (stochastic or adaptive) or the NFE is out of range."""
        from ..samplers.calibrate import MAX_NFE
        own, own_nfe = self.spec.sampling_defaults()
        sampler, nfe = sampler or own, own_nfe if nfe is None else nfe
        how = S.get(sampler)
        if how.stochastic or how.adaptive:
            raise ValueError(f"calibration fits the grid of a deterministic fixed-step sampler; {sampler} is "
                             f"{'stochastic' if how.stochastic else 'adaptive'}: name one (e.g. dpmpp_2m)")
        if not 1 <= nfe <= MAX_NFE:
            raise ValueError(f"a calibrated grid is for 1..{MAX_NFE} denoiser calls, not {nfe}")
        return sampler, nfe

    def calibrate(self, sampler: str | None = None, nfe: int | None = None, *, n_ref: int = 64, n_val: int = 64,
                  fit_labels: list[int] | None = None, val_labels: list[int] | None = None, seed: int = 0,
                  method: str = "auto", reference: dict | None = None, progress: bool = False):
        """The grid of `sampler` at `nfe` (default: the model's own pair) fitted to this model over its
        own sigma range (samplers.calibrate: reference solves of n_ref noises, n_val held out); a
        class-conditional model's noises cycle through fit_labels / val_labels (default: every class).
        reference: the dopri5 options of the reference solves (samplers.calibrate). Store the result as
        spec.calibrated[calibration_key(sampler, nfe)] = cal.to_dict()."""
        from ..samplers.calibrate import calibrate
        sampler, nfe = self.calibration_pair(sampler, nfe)
        k, device = self.spec.num_classes, self.device
        labels = {"fit": list(fit_labels or range(k)), "val": list(val_labels or range(k))}

        def cond(split: str, n: int):  # labels cycle through the split's label set
            return {"y": torch.tensor([labels[split][i % len(labels[split])] for i in range(n)], device=device)}

        def den(x, sigma, **c):  # solver state in float64, the network in its own float32
            return self.denoise(x.float(), sigma.float(), **c).double()

        lo, hi = self.spec.sigma_range()
        return calibrate(den, self.spec.shape, sampler, nfe, sigma_min=lo, sigma_max=hi, n_ref=n_ref, n_val=n_val,
                         cond=cond if k else None, process=self.process, seed=seed, method=method, device=device,
                         reference=reference, progress=progress)

    def decode(self, x: Tensor) -> Tensor:
        """Sigma-domain samples -> data space (pixel data: clipped to its range; latent data:
        decoded to images by the spec's autoencoder)."""
        return decode_samples(self, x)

    @staticmethod
    def _seeds(n, seeds, noise) -> list[int]:
        if seeds is None:
            count = n if n is not None else (len(noise) if noise is not None else None)
            if count is None:
                raise ValueError("give n, seeds or noise")
            seeds = range(count)
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("nothing to sample: n must be >= 1 (or give at least one seed)")
        if noise is not None and len(noise) != len(seeds):
            raise ValueError(f"noise holds {len(noise)} rows for {len(seeds)} seeds")
        return seeds

    # ------------------------------------------------------------------ likelihood
    def log_likelihood(self, x: Tensor, cond: dict | None = None, divergence: str = "hutchinson",
                       probes: int = 1, generator: torch.Generator | None = None, rtol: float = 1e-5,
                       atol: float = 1e-5, return_nfe: bool = False):
        """log p(x) in nats per example through the PF-ODE (float64 state), from the spec's
        sigma_min to its sigma_max (at most LIKELIHOOD_SIGMA_MAX); conditional models default to
        the null condition, i.e. the unconditional density."""
        from ..likelihood import log_likelihood
        lo, hi = self.spec.sigma_range()
        if cond is None and self.cond.kind != "none":
            cond = self.cond.null(len(x), x.device)

        def den(xx, sigma, **c):
            return self.denoise(xx.float(), sigma.float(), **c).double()

        lp, nfe = log_likelihood(den, x.double(), lo, min(hi, LIKELIHOOD_SIGMA_MAX), cond=cond,
                                 divergence=divergence, probes=probes, rtol=rtol, atol=atol, generator=generator)
        return (lp, nfe) if return_nfe else lp


# ---------------------------------------------------------------------- spec from a config
def with_sampling(spec: ModelSpec, cfg) -> ModelSpec:
    """The spec with its default sampler and NFE recorded (training["sampling"]): --sampler / --nfe, or
    with --sampler auto the process's measured default (processes.Process.default_sampling)."""
    from .spec import DEFAULT_SAMPLING, sampling_record
    if cfg.sampler == "auto":
        name, nfe = processes.get(spec.process["name"], **spec.process["kwargs"]).default_sampling
        chosen_by = "auto (benchmarks/defaults.py)" + (", --nfe" if cfg.nfe else "")
    else:
        name, nfe, chosen_by = cfg.sampler, DEFAULT_SAMPLING[1], "--sampler" + (", --nfe" if cfg.nfe else "")
    spec.training = {**spec.training, "sampling": sampling_record(name, cfg.nfe or nfe, chosen_by)}
    return spec.validate()


def denoiser_spec(cfg, source, data: dict, made: dict, family: str, conditional: bool = True,
                  training: dict | None = None) -> ModelSpec:
    """The spec of a denoiser family (diffusion; cnf and the students build on it): the network
    (--network auto follows the data, networks.default_preset; on latents a preset follows their
    channels), process, parametrization, sampling range and grid, conditioning (class labels when
    `conditional`, the data has them and --class-conditional), and the training recipe (noise
    density and weighting unless `training` is given)."""
    process = processes.get(cfg.process, **cfg.process_args)
    preset, net_args = cfg.network, {}
    if preset == "auto":
        preset, net_args = networks.default_preset(source.shape)
    elif data["kind"] == "latent":  # the autoencoder decides the channels: the preset follows them
        net_args = networks.fitted_args(preset, source.shape)
    text = text_conditioning(cfg, source, conditional) if cfg.text_encoder else None
    if text is not None:  # the network attends to the encoder's tokens
        if "context_dim" not in networks.describe(preset)["kwargs"]:
            raise ValueError(f"--network {preset} ({networks.describe(preset)['class']}) cannot attend to text; with "
                             "--text-encoder use a UNet preset (cross-attention) or mmdit-s (SD3's joint attention)")
        net_args["context_dim"] = text["encoder"]["width"]
    net_args.update(cfg.network_args)
    if cfg.grad_checkpointing:
        net_args["gradient_checkpointing"] = True
    param_kwargs = {"sigma_data": cfg.sigma_data} if cfg.parametrization == "edm" else {}
    density_kwargs = dict(cfg.density_args)
    if cfg.noise_density == "logit_normal" and cfg.shift != 1:
        density_kwargs.setdefault("shift", cfg.shift)
    densities.make(cfg.noise_density, process, **density_kwargs)  # unknown arguments fail here, before step 0
    lo, hi = process.sigma_range()
    # a process whose time starts at sigma = 0 (flow) samples down to EDM's 0.002
    sigma_min = cfg.sigma_min or (lo if lo > 0 else 0.002)
    sigma_max = cfg.sigma_max or hi
    name = cfg.grid
    if name == "auto":  # the process's measured default (benchmarks/defaults.py), where it can start
        name = process.default_grid if not math.isinf(sigma_max) or process.default_grid in S.grids.FROM_INF \
            else "native"
    grid = {"name": name, "kwargs": {}}
    if cfg.shift != 1 and cfg.grid in ("native", "sd3", "auto"):
        grid = {"name": "sd3", "kwargs": {"shift": cfg.shift}}
    num_classes = source.num_classes if cfg.class_conditional and conditional and text is None else 0
    conditioning = text or ({"kind": "class", "num_classes": num_classes, "drop": cfg.cond_drop,
                             "class_names": source.class_names} if num_classes else {"kind": "none"})
    if training is None:
        training = {"noise_density": {"name": cfg.noise_density, "kwargs": density_kwargs},
                    "weighting": cfg.weighting, "sigma_data": cfg.sigma_data}
    if made:
        training = {**training, "made_from": made}
    return ModelSpec(
        family=family, network=networks.describe(preset, **net_args),
        process={"name": cfg.process, "kwargs": process.kwargs()},
        parametrization={"name": cfg.parametrization, "kwargs": param_kwargs},
        sigma_min=float(sigma_min), sigma_max=float(sigma_max), grid=grid, conditioning=conditioning,
        data=data, training=training,
    ).validate()


PREVIEW_PROMPTS = 8  # captions of the preview grids of a text-conditional run (one row each)


def text_conditioning(cfg, source, conditional: bool) -> dict:
    """spec.conditioning of a run with --text-encoder: the frozen encoder's record (path, digest,
    feature sizes), caption dropout, and the first distinct training captions for the previews."""
    from ..data.source import caption_list
    from .text_encoders import load_text_encoder
    if not conditional:
        raise ValueError(f"--family {cfg.family} is unconditional: drop --text-encoder")
    captions = caption_list(source, 2000, what=f"--data {cfg.data}")
    enc = load_text_encoder(cfg.text_encoder)
    previews = list(dict.fromkeys(c for c in captions if c))[:PREVIEW_PROMPTS]
    enc.encode(previews[:1] or [""])  # a broken encoder fails here, before step 0
    return {"kind": "text", "drop": cfg.cond_drop, "encoder": enc.describe(), "pooled": bool(cfg.text_pooled),
            "preview_prompts": previews}


# ---------------------------------------------------------------------- data space
def decode_samples(model, x: Tensor) -> Tensor:
    """A model's samples in its data space: pixel data clipped to spec.data["range"] (when it has
    one); latent data (spec.data["kind"] == "latent") denormalised and decoded by the recorded
    autoencoder in fp32 without gradients, then clipped to spec.data["image_range"]."""
    data = model.spec.data
    if data.get("kind") != "latent":
        bounds = data.get("range")
        return x if bounds is None else x.clamp(*bounds)
    ae = autoencoder_of(model).to(x.device)
    with torch.no_grad():
        images = ae.decode_raw(ae.denormalize(x.float())).float()
    lo, hi = data.get("image_range") or (-1.0, 1.0)
    return images.clamp(lo, hi)


def autoencoder_of(model):
    """The autoencoder a latent model decodes with: loaded from spec.data["autoencoder"]["path"] on
    first use and checked against the recorded describe() (digest, channels, factor), then kept in
    the instance's __dict__: not a submodule, so never in state_dict, the optimizer, the EMA or DDP."""
    ae = model.__dict__.get("_autoencoder")
    if ae is None:
        from .autoencoder import check_autoencoder, load_autoencoder
        recorded = model.spec.data["autoencoder"]
        ae = load_autoencoder(recorded["path"], device=model.device)
        if ae.latent_channels != model.spec.shape[0]:
            raise ValueError(f"the autoencoder {recorded['path']} has {ae.latent_channels} latent channels but this "
                             f"model was trained on {model.spec.shape[0]}-channel latents; restore the autoencoder "
                             "it was trained with (or re-encode and retrain)")
        check_autoencoder(ae, recorded)
        model.__dict__["_autoencoder"] = ae
    return ae
