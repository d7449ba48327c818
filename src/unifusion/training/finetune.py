"""Reward fine-tuning of any model with a denoiser (diffusion, flow matching, latent, text- or
class-conditional, few-step students): the sampler is the policy, each stochastic step a Gaussian
action with an exact log-probability (samplers/logprob.py).

    ddpo   DDPO (Black et al. 2023): trajectories from the DDPM posterior (DDIM eta = 1), advantages
           normalised per condition (the batch's statistics when a condition has < --min-count
           samples), PPO's clipped importance ratio per step, several updates per batch.
    grpo   Flow-GRPO (Liu et al. 2025): Flow-GRPO's SDE (same marginals as the ODE, --noise-level a),
           --group-size samples per condition normalised within their group, the clipped ratio and
           a KL penalty to the frozen reference; --window K makes only K consecutive steps
           stochastic (Flow-GRPO-Fast), the rest ODE steps.
    draft  DRaFT-K (Clark et al. 2024; AlignProp): backpropagate a differentiable reward through
           the last --draft-k sampler steps (each step's activations recomputed in backward with
           --grad-checkpointing): the deterministic policy gradient with a known critic.

The objective of all three is E[r(x_0)] - beta KL(P_theta || P_ref) over sampling paths, whose
optimum has the marginal p_ref(x) exp(r(x) / beta) / Z (the tilted density; exact samples of it
are what benchmarks/finetune.py measures against). The path KL is the sum of the per-step KLs of
two Gaussians of equal std, ||mean_theta - mean_ref||^2 / (2 s_up^2) (exact given the state).
`--kl path` (default) makes the policy-gradient methods unbiased for that objective: each step's
advantage also carries the KL of the steps after it (the KL "to go", a cost like the reward), and
each step's own KL is in the loss; `--kl step` is Flow-GRPO's (the step's own KL only). beta is
in reward units: normalising the advantages by a group's reward std divides that group's KL term
by the same std, so normalisation rescales the step but never moves the optimum (flow_grpo and
ddpo-pytorch also average log-probabilities and KL over pixels; here they are exact sums, so the
ratio is the true one and --clip-range applies to it).

Like the training loop (loop.py): every random draw of step k (conditions, starting noise, the
noise of every sampler step, the SDE window, timestep subsets, minibatch order) comes from one
generator seeded by (seed, k) and is drawn for the whole global batch, so a resumed run continues
bit-identically and K ranks (DDP, each its rows [rank::K]) equal one rank. Rewards and KLs are
gathered before the advantages, and each rank's loss is scaled so DDP's gradient mean is the
one-rank gradient. Checkpoints hold the merged weights under the model's own keys (`unifusion
sample --checkpoint RUN` works at any step), the LoRA adapters, the optimizer and the EMA; the
reference is recorded by digest and checked on resume. A reward of the wrong shape is an error
before anything is written; non-finite rewards drop their rows (counted in the log); a step whose
rewards are all non-finite, or whose loss is, is skipped, and --max-bad-steps of them in a row stop
the run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import checkpoint, models, rewards
from .. import samplers as S
from ..guidance import classifier_free
from ..safeio import atomic_write
from ..samplers import logprob as LP
from . import distributed, lora, run_dir
from .ema import EMA
from .loop import STOP_EVERY, _agree, _Interrupt, _seed, log_curve, lr_at

METHODS = ("ddpo", "grpo", "draft")
DEFAULT_SAMPLER = {"ddpo": "ddpm", "grpo": "flow_sde", "draft": "ddim"}
DEFAULT_NOISE = {"ddpo": None, "grpo": None, "draft": 0.0}  # draft: the deterministic DDIM (ODE) step
DEFAULT_BETA = {"ddpo": 0.0, "grpo": 0.01, "draft": 0.0}
RESUME_SAFE = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "device", "resume", "out", "threads",
               "max_bad_steps", "overwrite"}


def opt(default, group: str, help: str):
    kw = {"default_factory": dict} if default == {} else {"default": default}
    return field(metadata={"group": group, "help": help}, **kw)


@dataclass
class FinetuneConfig:
    # ---- what to fine-tune, for which reward
    model: str = opt("", "model", "the model to fine-tune: a run, checkpoint or model folder (its EMA weights)")
    reward: str = opt("", "model", "a built-in reward (see below) or module:function, reward(x, cond) -> (B,)")
    reward_args: dict = opt({}, "model", "keyword options of the reward, e.g. --reward-args '{target: 3}'")
    method: str = opt("grpo", "model", "ddpo | grpo | draft")
    reference: str = opt("", "model", "the frozen reference of the KL term (default: the model as it starts)")
    no_ema: bool = opt(False, "model", "start from the raw weights instead of the EMA")
    lora_rank: int = opt(0, "model", "LoRA rank of every Linear / Conv2d of the network (0: fine-tune every weight)")
    lora_alpha: float = opt(0.0, "model", "LoRA alpha (update scale alpha / rank; 0: alpha = rank)")
    # ---- the policy: sampler, steps, conditions
    sampler: str = opt("", "policy", "ddpm | ddim | euler_ancestral | flow_sde | consistency (default: ddpo ddpm, "
                                     "grpo flow_sde, draft ddim)")
    noise_level: float = opt(-1.0, "policy", "ddim / euler_ancestral eta (default 1; draft 0), flow_sde a (default "
                                             "0.7); -1: that default")
    nfe: int = opt(10, "policy", "sampler steps (denoiser calls) per trajectory")
    grid: str = opt("", "policy", "noise grid (default: the model's own)")
    sigma_min: float = opt(0.0, "policy", "the grid's lowest level above 0 (0: the model's own); a step into a tiny "
                                          "level has tiny noise, so its log-probability is very sensitive")
    window: int = opt(0, "policy", "SDE window: only this many consecutive steps are stochastic, at a random place "
                                   "each step (Flow-GRPO-Fast); 0: every step")
    cfg: float = opt(1.0, "policy", "classifier-free guidance during fine-tuning (1: off, Flow-GRPO's advice)")
    labels: str = opt("", "policy", "class-conditional: the labels to train on, e.g. 0-4 or 1,7 (default all)")
    prompts: str = opt("", "policy", "text-conditional: a file of prompts, one a line (default the model's preview "
                                     "prompts)")
    # ---- the objective
    batch_size: int = opt(32, "objective", "trajectories per step (global, over all ranks)")
    group_size: int = opt(8, "objective", "grpo: samples per condition (a group)")
    updates: int = opt(2, "objective", "ddpo / grpo: optimizer updates per batch (minibatches)")
    inner_epochs: int = opt(1, "objective", "ddpo / grpo: passes over the batch")
    clip_range: float = opt(0.2, "objective", "PPO clip of the importance ratio exp(logp - logp_old)")
    adv_clip: float = opt(5.0, "objective", "clip of the normalised advantages")
    kl_beta: float = opt(-1.0, "objective", "weight of the KL to the reference, in reward units (-1: ddpo 0, grpo "
                                            "0.01, draft 0)")
    kl: str = opt("path", "objective", "path: each step also pays the KL of the steps after it (unbiased for the "
                                       "KL-regularised optimum) | step: only its own (Flow-GRPO)")
    normalize: str = opt("group", "objective", "advantages divided by the reward std of their group | batch | none")
    min_count: int = opt(16, "objective", "ddpo: a condition with fewer samples in the batch uses the batch's "
                                          "statistics")
    timestep_fraction: float = opt(1.0, "objective", "ddpo / grpo: train on this share of the stochastic steps")
    draft_k: int = opt(1, "objective", "draft: backpropagate through the last K steps")
    grad_checkpointing: bool = opt(True, "objective", "draft: recompute each step's activations in backward")
    micro_batch: int = opt(0, "objective", "at most this many (trajectory, step) pairs (draft: trajectories) per "
                                           "forward (0: all)")
    # ---- optimisation
    steps: int = opt(100, "optimisation", "fine-tuning steps (each: sample a batch, then update)")
    lr: float = opt(1e-4, "optimisation", "learning rate (AdamW)")
    weight_decay: float = opt(0.0, "optimisation", "AdamW weight decay")
    grad_clip: float = opt(1.0, "optimisation", "max gradient norm (0 = off)")
    warmup_steps: int = opt(0, "optimisation", "linear learning-rate warmup steps")
    lr_schedule: str = opt("constant", "optimisation", "constant | cosine (to 0 at --steps, after the warmup)")
    ema_half_life: float = opt(0.0, "optimisation", "EMA half-life in trajectories (0: no EMA)")
    max_bad_steps: int = opt(10, "optimisation", "stop after this many skipped steps in a row (non-finite rewards "
                                                 "or loss)")
    # ---- run
    out: str = opt("runs/finetune", "run", "run folder (one run per folder)")
    seed: int = opt(0, "run", "seed of the adapters and of every random draw")
    checkpoint_every: int = opt(50, "run", "checkpoint every N steps")
    keep_checkpoints: int = opt(3, "run", "how many checkpoints to keep")
    log_every: int = opt(1, "run", "log every N steps")
    resume: bool = opt(False, "run", "continue the run in --out from its latest checkpoint and stored config")
    overwrite: bool = opt(False, "run", "delete an existing run in --out and start a new one")
    device: str = opt("auto", "run", "auto | cpu | cuda")
    threads: int = opt(0, "run", "CPU threads per process (0 = auto)")

    def validate(self) -> "FinetuneConfig":
        """Choices and bounds; fills the method's defaults (sampler, noise level, beta) in."""
        from ..config import flag
        _choice("method", self.method, METHODS)
        if not self.model:
            raise ValueError("--model is required: the run, checkpoint or model folder to fine-tune")
        if not self.reward:
            raise ValueError(f"--reward is required: a built-in ({', '.join(rewards.names())}) or module:function")
        _choice("kl", self.kl, ("path", "step"))
        _choice("normalize", self.normalize, ("group", "batch", "none"))
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if not self.sampler:
            self.sampler = DEFAULT_SAMPLER[self.method]
            if self.noise_level < 0 and DEFAULT_NOISE[self.method] is not None:
                self.noise_level = DEFAULT_NOISE[self.method]
        _choice("sampler", self.sampler, S.names())
        if self.kl_beta < 0:
            self.kl_beta = DEFAULT_BETA[self.method]
        for name in ("nfe", "batch_size", "group_size", "updates", "inner_epochs", "steps", "checkpoint_every",
                     "keep_checkpoints", "log_every", "max_bad_steps", "draft_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("window", "lora_rank", "micro_batch", "warmup_steps", "threads", "weight_decay", "grad_clip",
                     "lora_alpha", "ema_half_life", "kl_beta", "adv_clip", "min_count", "sigma_min"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"--clip-range must be > 0, got {self.clip_range}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"--timestep-fraction must lie in (0, 1], got {self.timestep_fraction}")
        if not (self.cfg >= 0 and math.isfinite(self.cfg)):
            raise ValueError(f"--cfg must be a finite number >= 0, got {self.cfg}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        if self.method == "grpo" and self.batch_size % self.group_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --group-size {self.group_size} "
                             "(grpo draws batch / group conditions, group samples each)")
        if self.method == "draft" and self.window:
            raise ValueError("--window (an SDE window) applies to ddpo and grpo; draft backpropagates through the last "
                             "--draft-k steps")
        if self.method != "draft" and self.batch_size % self.updates:
            raise ValueError(f"--batch-size {self.batch_size} must be divisible by --updates {self.updates}")
        return self

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        """Keys (dashes or underscores) -> a config; an unknown key raises with the nearest valid one."""
        import difflib
        from ..config import _coerce, flag
        types = {f.name: {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}[f.type] for f in fields(cls)}
        cfg = cls()
        for raw, value in values.items():
            key = str(raw).replace("-", "_")
            if key not in types:
                near = difflib.get_close_matches(key, list(types), n=1)
                raise ValueError(f"unknown finetune option {flag(key)}"
                                 + (f"; did you mean {flag(near[0])}?" if near else "; see unifusion finetune --help"))
            setattr(cfg, key, _coerce(key, value, types[key]))
        return cfg


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"--{key.replace('_', '-')} {value!r} is not valid; choose one of {sorted(valid)}")


def resumed(stored: dict, given: dict) -> FinetuneConfig:
    """The stored config of a run with the given keys applied; only RESUME_SAFE keys may change."""
    base = FinetuneConfig.from_dict(stored)
    merged = FinetuneConfig.from_dict({**stored, **given}).validate()
    differ = sorted(k for k in given if k.replace("-", "_") not in RESUME_SAFE
                    and getattr(merged, k.replace("-", "_")) != getattr(base, k.replace("-", "_")))
    if differ:
        raise ValueError(f"--resume continues the stored run, whose {', '.join('--' + k for k in differ)} cannot change; "
                         f"only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_SAFE - {'resume', 'overwrite'}))}"
                         " may; start a new run in another --out instead")
    return dataclasses.replace(merged, resume=True)


# ------------------------------------------------------------------------------ the set-up
@dataclass
class Setup:
    """Everything a run needs that is not in a checkpoint: the model (with adapters), the
    reference, the policy, the grid, the reward and the conditions."""
    model: nn.Module
    reference: object          # a denoiser (x, sigma, **cond), or None when beta = 0 and nothing needs one
    trainable: nn.Module       # the model itself, or its LoRA adapters
    policy: LP.Policy
    sigmas: list[float]
    reward: rewards.Reward
    conditions: list           # class labels, prompts, or [None]
    reference_digest: str
    start_digest: str


def setup(cfg: FinetuneConfig, device) -> Setup:
    """Load and check everything (one-line ValueErrors), before anything is written."""
    model = _load(cfg.model, "--model", not cfg.no_ema, device)
    _check_family(model, cfg.model)
    spec = model.spec
    start_digest = _digest(model.state_dict())
    ref_model = None
    if cfg.reference:
        ref_model = _load(cfg.reference, "--reference", True, device)
        _check_family(ref_model, cfg.reference, "--reference")
        _check_same_space(ref_model.spec, spec, cfg.reference, cfg.model)
        ref_digest = _digest(ref_model.state_dict())
    else:
        ref_digest = start_digest
    pol = LP.policy(cfg.sampler, None if cfg.noise_level < 0 else cfg.noise_level,
                    sigma_floor=float(getattr(getattr(model, "param", None), "sigma_min", 0.0) or 0.0)
                    if cfg.sampler == "consistency" else 0.0)
    if cfg.method != "draft" and not pol.stochastic:
        raise ValueError(f"--method {cfg.method} needs log-probabilities, but --sampler {cfg.sampler} with --noise-level "
                         f"{pol.level} is deterministic (an ODE step has none); raise --noise-level or use flow_sde / ddpm")
    if cfg.method == "draft" and cfg.kl_beta > 0 and not pol.stochastic:
        raise ValueError("--kl-beta > 0 needs a stochastic sampler (two deterministic paths have an infinite KL); use "
                         "--sampler flow_sde, or --kl-beta 0")
    sigmas = _grid(model, cfg)
    steps = LP.plan(sigmas, pol)
    if cfg.method != "draft" and not steps.stochastic:
        raise ValueError(f"with --nfe {cfg.nfe} the sampler takes no stochastic step (the last step to 0 is "
                         "deterministic); give --nfe >= 2")
    if cfg.window > max(1, len(steps.stochastic)):
        raise ValueError(f"--window {cfg.window} is longer than the {len(steps.stochastic)} stochastic steps of "
                         f"--nfe {cfg.nfe}")
    if cfg.method == "draft" and cfg.draft_k > steps.n:
        raise ValueError(f"--draft-k {cfg.draft_k} exceeds the {steps.n} sampler steps (--nfe {cfg.nfe})")
    if cfg.cfg != 1 and model.cond.kind == "none":
        raise ValueError(f"--cfg {cfg.cfg} needs a conditional model; this one is unconditional")
    reward = rewards.load(cfg.reward, spec, cfg.reward_args)
    if cfg.method == "draft" and reward.differentiable is False:
        raise ValueError(f"--reward {cfg.reward} is not differentiable ({reward.range}); --method draft backpropagates "
                         "through it: use ddpo or grpo")
    conditions = _conditions(model, cfg)

    # the trainable part: every weight, or LoRA adapters on the network (the reference is then the base network)
    torch.manual_seed(cfg.seed)
    if cfg.lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
        lora.inject(model.net, cfg.lora_rank, cfg.lora_alpha or None)
        model.to(device)
        trainable = lora.Adapters(model)  # names relative to the model, as merged_state_dict(model) reads them
    else:
        trainable = model
    model.eval()  # no dropout: the log-probabilities of sampling and of the update are the same function
    needs_ref = cfg.kl_beta > 0
    reference = None
    if needs_ref:
        if ref_model is None and not cfg.lora_rank:
            ref_model = _load(cfg.model, "--model", not cfg.no_ema, device)
        if ref_model is not None:
            for p in ref_model.parameters():
                p.requires_grad_(False)
            reference = ref_model.eval().denoise
        else:  # LoRA without --reference: the network without its adapters
            def reference(x, sigma, **cond):
                with lora.disabled(model.net):
                    return model.denoise(x, sigma, **cond)
    return Setup(model, reference, trainable, pol, sigmas, reward, conditions, ref_digest, start_digest)


def _load(path: str, what: str, use_ema: bool, device):
    try:
        return models.load(path, use_ema=use_ema, device=device)
    except (ValueError, OSError) as e:
        raise ValueError(f"{what} {path}: {e}") from None


def _check_family(model, path: str, what: str = "--model") -> None:
    """A model fine-tunes here when it samples through a denoiser and a sampler's steps."""
    family = model.spec.family
    if callable(getattr(model, "denoise", None)) and model.spec.process is not None:
        return
    if family.startswith("flow-"):
        raise ValueError(f"{what} {path} is a {family} coupling flow: it samples in one inverse pass of its network, "
                         "not by sampler steps, so there is no step with a log-probability (ddpo, grpo) and no chain "
                         "of denoiser calls to backpropagate through (draft); what applies to it is reward-weighted "
                         "maximum likelihood on its exact log p(x), which unifusion finetune does not do; fine-tune a "
                         "diffusion, flow-matching, latent, text-conditional or few-step model")
    raise ValueError(f"{what} {path} is a {family} model, which has no denoiser and sampler steps to fine-tune "
                     "(reward fine-tuning applies to diffusion, flow-matching, cnf and few-step models)")


def _check_same_space(ref, spec, ref_path: str, model_path: str) -> None:
    if tuple(ref.shape) != tuple(spec.shape) or ref.data.get("kind") != spec.data.get("kind"):
        raise ValueError(f"--reference {ref_path} is a model of data shape {tuple(ref.shape)} ({ref.data.get('kind')}), "
                         f"but --model {model_path} makes {tuple(spec.shape)} ({spec.data.get('kind')}): the KL term "
                         "compares their sampler steps, so they must denoise the same space")
    if spec.data.get("kind") == "latent" and ref.data["autoencoder"].get("digest") != spec.data["autoencoder"].get("digest"):
        raise ValueError(f"--reference {ref_path} denoises the latents of another autoencoder than --model {model_path}")
    if (ref.conditioning.get("kind"), ref.num_classes) != (spec.conditioning.get("kind"), spec.num_classes):
        raise ValueError(f"--reference {ref_path} is conditioned on {ref.conditioning.get('kind')} "
                         f"({ref.num_classes} classes), --model {model_path} on {spec.conditioning.get('kind')} "
                         f"({spec.num_classes}); the reference must take the model's conditions")


def _grid(model, cfg) -> list[float]:
    lo, hi = model.spec.sigma_range()
    lo = cfg.sigma_min or lo
    if not lo < hi:
        raise ValueError(f"--sigma-min {lo} must lie below the model's sigma_max {hi}")
    name = cfg.grid or model.spec.grid["name"]
    kwargs = model.spec.grid["kwargs"] if name == model.spec.grid["name"] else {}
    return S.grids.make(name, cfg.nfe, lo, hi, process=model.process, **kwargs).tolist()


def _conditions(model, cfg) -> list:
    kind = model.cond.kind
    if kind == "class":
        k = model.spec.num_classes
        labels = _parse_labels(cfg.labels, k) if cfg.labels else list(range(k))
        return labels
    if cfg.labels:
        raise ValueError(f"--labels needs a class-conditional model; this one is {kind}")
    if kind == "text":
        if cfg.prompts:
            p = Path(cfg.prompts)
            if not p.is_file():
                raise ValueError(f"--prompts {cfg.prompts}: no such file (one prompt a line)")
            prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        else:
            prompts = list(model.spec.conditioning.get("preview_prompts") or [])
        if not prompts:
            raise ValueError("a text-conditional model needs prompts to fine-tune on: give --prompts FILE")
        return prompts
    if cfg.prompts:
        raise ValueError("--prompts needs a text-conditional model")
    return [None]


def _parse_labels(text: str, k: int) -> list[int]:
    out = []
    try:
        for part in str(text).split(","):
            lo, dash, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise ValueError(f"--labels {text!r}: give labels like 0-4 or 1,7") from None
    bad = [v for v in out if not 0 <= v < k]
    if bad or not out:
        raise ValueError(f"--labels {text!r}: the model has classes 0..{k - 1}")
    return sorted(set(out))


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ one step's draws
def draws(cfg: FinetuneConfig, su: Setup, step: int) -> dict:
    """Every random draw of fine-tuning step `step`, for the whole global batch (module docstring)."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, step))
    B, shape, n = cfg.batch_size, tuple(su.model.spec.shape), len(su.sigmas) - 1
    K = len(su.conditions)
    if cfg.method == "grpo":
        cond = torch.randint(0, K, (B // cfg.group_size,), generator=g).repeat_interleave(cfg.group_size)
    else:
        cond = torch.randint(0, K, (B,), generator=g)
    out = {"cond": cond, "start": torch.randn((B,) + shape, generator=g),
           "noise": torch.randn((B, n) + shape, generator=g)}
    stochastic = LP.plan(su.sigmas, su.policy).stochastic
    if cfg.window and stochastic:
        out["window"] = stochastic[int(torch.randint(0, len(stochastic) - cfg.window + 1, (1,), generator=g))]
    m = cfg.window or len(stochastic)
    out["pick"] = torch.rand((B, max(m, 1)), generator=g).argsort(1)  # per row: its steps in a random order
    out["order"] = torch.stack([torch.randperm(cfg.updates, generator=g) for _ in range(cfg.inner_epochs)])
    return out


# ------------------------------------------------------------------------------ the objective (DDP's module)
class Objective(nn.Module):
    """What DDP wraps: one forward per (micro)batch, over the model's weights. "logprob": the
    policy's log-probability and mean of given steps (ddpo, grpo); "draft": the differentiable
    rollout from given draws (draft)."""

    def __init__(self, model: nn.Module, cfg_scale: float):
        super().__init__()
        self.model, self.cfg_scale = model, cfg_scale

    def denoiser(self, model=None):
        return policy_denoiser(model or self.model, self.cfg_scale)

    def forward(self, kind: str, **kw):
        den = self.denoiser()
        if kind == "logprob":
            return LP.step_logprob(den, kw["x"], kw["x_next"], kw["s"], kw["s_down"], kw["s_up"], kw["cond"])
        return LP.differentiable_rollout(den, kw["x"], kw["steps"], kw["noise"], kw["cond"], kw["grad_from"],
                                         kw.get("reference"), kw.get("checkpoint", False))


def policy_denoiser(model, cfg_scale: float = 1.0):
    """The denoiser the policy samples with: the model's, or classifier-free guided (the null
    condition of each call's batch size)."""
    if cfg_scale == 1 or model.cond.kind == "none":
        return model.denoise

    def guided(x, sigma, **cond):
        null = model.cond.prepare(model.cond.null(x.shape[0], x.device), x.device)
        return classifier_free(model.denoise, cfg_scale, null)(x, sigma, **cond)
    return guided


def _raw_cond(model, conditions: list, idx: Tensor) -> dict | None:
    """The condition of rows idx as the reward and the conditioning take it."""
    kind = model.cond.kind
    if kind == "class":
        return {"y": torch.tensor([conditions[i] for i in idx.tolist()], dtype=torch.long)}
    if kind == "text":
        return {"caption": [conditions[i] for i in idx.tolist()]}
    return None


def _rows(cond: dict, rows) -> dict:
    return {k: (v[rows] if isinstance(v, Tensor) else [v[i] for i in rows.tolist()]) for k, v in cond.items()}


def decode(model, x: Tensor, grad: bool = False) -> Tensor:
    """Samples in data space (the model's decode); with grad=True differentiably (a latent model's
    autoencoder decoder runs under autograd, for draft)."""
    if not grad:
        return model.decode(x)
    data = model.spec.data
    if data.get("kind") != "latent":
        bounds = data.get("range")
        return x if bounds is None else x.clamp(*bounds)
    from ..models.diffusion import autoencoder_of
    ae = autoencoder_of(model)
    lo, hi = data.get("image_range") or (-1.0, 1.0)
    return ae.decode_raw(ae.denormalize(x.float())).float().clamp(lo, hi)


# ------------------------------------------------------------------------------ advantages
def advantages(r: Tensor, group: Tensor, cfg: FinetuneConfig, m: int,
               kl_to_go: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row, per-step advantages (B, m) and the per-row scale (B,) of the KL term.

    The return of step j is R - beta KL_to_go[:, j] (--kl path: the KL of the steps after j) or R;
    its baseline is the mean over the row's group (grpo: its condition; ddpo: its condition when
    that has >= --min-count finite rewards in the batch, else the batch); advantage and KL term are
    divided by the group's reward std (--normalize group; floored at a hundredth of the batch's, so
    a group of equal rewards cannot blow its KL term up) or the batch's (batch), then the advantage is
    clipped to +-adv_clip. Rows with a non-finite reward get advantage 0 (they are dropped)."""
    ok = torch.isfinite(r)
    R = torch.where(ok, r, 0.0).double()
    ret = R[:, None].expand(-1, m).clone()
    if kl_to_go is not None:
        ret = ret - cfg.kl_beta * kl_to_go.double()
    ids = group.clone()
    if cfg.method == "ddpo":  # a rare condition takes the batch's statistics
        counts = torch.bincount(group[ok], minlength=int(group.max()) + 1)
        ids = torch.where(counts[group] < cfg.min_count, torch.full_like(group, -1), group)
    batch_std = R[ok].std(unbiased=False) if int(ok.sum()) > 1 else R.new_tensor(0.0)
    base, std = torch.zeros_like(ret), torch.ones_like(R)
    for g in ids.unique().tolist():
        members = ids == g
        sel = ok if g == -1 else members & ok
        if not sel.any():
            continue
        base[members] = ret[sel].mean(0)
        if cfg.normalize == "group" and batch_std > 0:
            std[members] = torch.maximum(R[sel].std(unbiased=False), 0.01 * batch_std)
    if cfg.normalize == "batch" and batch_std > 0:
        std[:] = batch_std
    adv = (ret - base) / std[:, None]
    if cfg.adv_clip > 0:
        adv = adv.clamp(-cfg.adv_clip, cfg.adv_clip)
    return torch.where(ok[:, None], adv, 0.0).float(), (1 / std).float()


def _gather_rows(dist, t: Tensor) -> Tensor:
    """This rank's rows [rank::world] of a global batch -> the global batch, in order, on every rank."""
    if not dist.enabled:
        return t
    import torch.distributed as tdist
    parts = [torch.empty_like(t) for _ in range(dist.world_size)]
    tdist.all_gather(parts, t.contiguous())
    return torch.stack(parts, 1).reshape(-1, *t.shape[1:])


def _sum(dist, t: Tensor) -> Tensor:
    if dist.enabled:
        import torch.distributed as tdist
        t = t.clone()
        tdist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------ the run
def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune as `cfg` says; returns where the outputs went (and 'interrupted': bool)."""
    cfg.validate()
    dist = distributed.setup(cfg.device)
    distributed.set_threads(cfg.threads, dist.device)
    out = Path(cfg.out)
    lock, refusal = None, None
    if dist.rank == 0:
        try:
            lock = run_dir.RunLock(out).acquire()
        except (ValueError, OSError) as e:
            refusal = e
    try:
        _agree(dist, refusal)
        return _finetune(cfg, dist, out, progress, lock)
    except BaseException:
        if lock is not None and not lock.committed:
            lock.discard()
        raise
    finally:
        if lock is not None:
            lock.release()
        dist.cleanup()


def _finetune(cfg: FinetuneConfig, dist, out: Path, progress: bool, lock) -> dict:
    device, rank, world = dist.device, dist.rank, dist.world_size
    refusal = None
    if rank == 0:
        try:
            run_dir.check(out, cfg.resume, cfg.overwrite)
            stored = run_dir.stored_config(out) if cfg.resume else None
            if stored is not None:
                differ = [k for k, v in FinetuneConfig.from_dict(stored).to_dict().items()
                          if k not in RESUME_SAFE and cfg.to_dict().get(k) != v]
                if differ:
                    raise ValueError(f"cannot resume {out}: the run was started with other "
                                     f"{', '.join('--' + k.replace('_', '-') for k in differ)}; resume with "
                                     f"`unifusion finetune --out {out} --resume` alone, or start a new run elsewhere")
        except (ValueError, OSError) as e:
            refusal = e
    _agree(dist, refusal)
    last = checkpoint.latest(out) if cfg.resume else None
    tensors, state, start = {}, {}, 0
    if last is not None:
        tensors, state = checkpoint.load(last)
        start = int(state["step"])
        if start > cfg.steps:
            raise ValueError(f"the run in {out} is already at step {start}, beyond --steps {cfg.steps}; resume with a "
                             "larger --steps")
    if cfg.batch_size % world or (cfg.method != "draft" and cfg.batch_size % (world * cfg.updates)):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by ranks x --updates = {world} x "
                         f"{cfg.updates if cfg.method != 'draft' else 1}")

    # ---- everything checked before rank 0 writes: model, reference, sampler, reward (on a probe)
    su = setup(cfg, device)
    if state:
        if state.get("reference_digest") != su.reference_digest or state.get("start_digest") != su.start_digest:
            raise ValueError(f"cannot resume {out}: --model / --reference {cfg.reference or cfg.model} hold other "
                             "weights than when the run started (digest differs); restore them or start a new run")
        if cfg.lora_rank:
            su.trainable.load_state_dict({k: v.to(device) for k, v in tensors["lora"].items()})
        else:
            models.io.load_weights(su.model, tensors["model"], str(last))
    _probe(cfg, su, device)
    opt = torch.optim.AdamW([p for p in su.trainable.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}))
    ema = EMA(su.trainable, cfg.ema_half_life) if cfg.ema_half_life > 0 else None
    if state:
        opt.load_state_dict(checkpoint.optimizer_from_tensors(tensors["optimizer"], state["optimizer"]))
        if ema is not None:
            ema.load_state_dict({k: v.to(device) for k, v in tensors["ema_state"].items()})

    refusal = None
    if rank == 0:
        if lock is not None:
            lock.committed = True
        try:
            run_dir.prepare(out, cfg.resume, cfg.overwrite)
            atomic_write(out / run_dir.CONFIG, json.dumps(cfg.to_dict(), indent=1))
            run_dir.truncate_log(out / "log.jsonl", start)
        except (ValueError, OSError) as e:
            refusal = e
    _agree(dist, refusal)
    if rank == 0 and last is not None:
        print(f"resumed from {last} at step {start}")

    net = dist.wrap(Objective(su.model, cfg.cfg))
    mem0 = _reset_peak_memory(device)
    bad_run, bad_total = int(state.get("bad_steps", 0)), int(state.get("bad_rewards", 0))
    log_path, t0, cpu0 = out / "log.jsonl", time.time(), time.process_time()
    last_ckpt, interrupted = last, False
    bar = tqdm(total=cfg.steps, initial=start, desc=f"finetune ({cfg.method})", unit="step",
               disable=not progress or rank != 0, dynamic_ncols=True)
    with _Interrupt() as stop:
        for step in range(start, cfg.steps):
            for gr in opt.param_groups:
                gr["lr"] = lr_at(cfg, step)
            d = draws(cfg, su, step)
            one = (_draft_step if cfg.method == "draft" else _pg_step)(cfg, su, net, opt, d, step, dist)
            ok = one.pop("ok")
            if ema is not None and ok:
                ema.update(su.trainable, cfg.batch_size)
            bad_run = 0 if ok else bad_run + 1
            bad_total += one["bad_rewards"]
            if bad_run >= cfg.max_bad_steps:
                raise RuntimeError(f"{cfg.max_bad_steps} steps in a row were skipped (rewards all non-finite or a "
                                   f"non-finite loss, at step {step + 1}); check the reward, or lower --lr")
            done = step + 1
            if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
                rec = {"step": done, **{k: round(v, 6) for k, v in one.items()}, "skipped": int(not ok),
                       "bad_rewards_total": bad_total, "lr": opt.param_groups[0]["lr"],
                       "mem_mib": round(_peak_memory(device) - mem0, 1),
                       "time": round(time.time() - t0, 3), "cpu": round(time.process_time() - cpu0, 3)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(reward=f"{one['reward']:.4g}")
            bar.update(1)
            save = done % cfg.checkpoint_every == 0 or done == cfg.steps
            stop_now = (not dist.enabled or save or done % STOP_EVERY == 0) and dist.any(stop.hit)
            if save or stop_now:
                last_ckpt = _save(out, done, su, opt, ema, cfg, bad_run, bad_total, dist)
            if stop_now:
                interrupted = True
                break
    bar.close()
    result = {"out": str(out), "log": str(log_path), "checkpoint": str(last_ckpt) if last_ckpt else None,
              "interrupted": interrupted, "rank": rank}
    if not interrupted and rank == 0:
        result["model"] = str(save_model(su, ema, cfg, out / "model"))
        result["reward_curve"] = str(log_curve(log_path, out / "reward.png", "reward", "mean reward",
                                               "fine-tuning step", log_scale=False))
    return result


def _reset_peak_memory(device) -> float:
    """Start measuring the steps' peak memory; returns the level they add to (MiB). CUDA: allocated
    tensors; CPU (Linux): the resident set, whose high-water mark is reset through /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status("VmRSS")
    except OSError:  # not Linux: the peak of the whole process
        return 0.0


def _peak_memory(device) -> float:
    """Peak memory since _reset_peak_memory (MiB): what `mem_mib` in the log adds to the level before step 0."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _proc_status("VmHWM")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def _probe(cfg: FinetuneConfig, su: Setup, device) -> None:
    """Two samples through the reward before the run writes anything: the wrong shape, no finite
    value, or (draft) no gradient is a one-line error."""
    n = 2
    idx = torch.arange(n) % len(su.conditions)
    raw = _raw_cond(su.model, su.conditions, idx)
    cond = su.model.cond.prepare(raw, device) if raw is not None else {}
    g = torch.Generator().manual_seed(_seed(cfg.seed, 2**40))
    x = _start(su, torch.randn((n,) + tuple(su.model.spec.shape), generator=g), device)
    steps = LP.plan(su.sigmas, su.policy)
    roll = LP.rollout(policy_denoiser(su.model, cfg.cfg), x, steps, cond=cond,
                      generator=torch.Generator(device=device).manual_seed(0))
    with torch.enable_grad():
        samples = decode(su.model, roll.sample, grad=cfg.method == "draft")
        if cfg.method == "draft":
            samples = samples.detach().requires_grad_(True)
        try:
            r = su.reward(samples, raw)
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as e:
            raise ValueError(f"--reward {cfg.reward} failed on two samples of shape {tuple(samples.shape)}: "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(r, Tensor) or r.shape != (n,) or not r.is_floating_point():
        got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"--reward {cfg.reward} returned {got} for {n} samples; a reward returns one float per "
                         f"sample, a tensor of shape ({n},)")
    if not torch.isfinite(r).any():
        raise ValueError(f"--reward {cfg.reward} returned no finite value on two samples ({r.tolist()}); a reward "
                         "must be finite where it is defined")
    if cfg.method == "draft" and not r.requires_grad:
        raise ValueError(f"--reward {cfg.reward} is not differentiable (its value carries no gradient to the samples); "
                         "--method draft backpropagates through it: use ddpo or grpo")


def _start(su: Setup, unit: Tensor, device) -> Tensor:
    hi = su.sigmas[0]
    return unit.to(device) * (1.0 if math.isinf(hi) else hi)


def _local(d: dict, rank: int, world: int) -> dict:
    return {k: (v[rank::world] if k in ("cond", "start", "noise", "pick") else v) for k, v in d.items()}


def _rollout(cfg, su: Setup, d: dict, device, reference=None):
    """This rank's trajectories of the step (no gradient), their conditions and rewards."""
    steps = LP.plan(su.sigmas, su.policy, (d["window"], cfg.window) if "window" in d else None)
    raw = _raw_cond(su.model, su.conditions, d["cond"])
    cond = su.model.cond.prepare(raw, device) if raw is not None else {}
    roll = LP.rollout(policy_denoiser(su.model, cfg.cfg), _start(su, d["start"], device), steps,
                      noises=d["noise"].transpose(0, 1).to(device), cond=cond, reference=reference)
    return steps, raw, cond, roll


def _reward(cfg, su: Setup, samples: Tensor, raw, step: int, rank: int) -> Tensor:
    torch.manual_seed(_seed(cfg.seed, step, rank, 3))  # a random reward is reproducible too
    r = su.reward(samples, raw)
    if not isinstance(r, Tensor) or r.shape != (len(samples),):
        raise ValueError(f"--reward {cfg.reward} returned "
                         f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__} for {len(samples)} samples; "
                         f"it must return shape ({len(samples)},)")
    return r.detach().float()


def _pg_step(cfg, su: Setup, net, opt, d: dict, step: int, dist) -> dict:
    """ddpo / grpo: sample, score, advantages, then --inner-epochs x --updates clipped updates."""
    device, rank, world = dist.device, dist.rank, dist.world_size
    loc = _local(d, rank, world)
    beta = cfg.kl_beta
    steps, raw, cond, roll = _rollout(cfg, su, loc, device, su.reference if beta > 0 else None)
    with torch.no_grad():
        r = _reward(cfg, su, decode(su.model, roll.sample), raw, step, rank)
    stoch = steps.stochastic
    m = len(stoch)
    kl_steps = roll.kl if roll.kl is not None else None
    to_go = None
    if kl_steps is not None and cfg.kl == "path":  # the KL of the steps after each step
        to_go = kl_steps.flip(1).cumsum(1).flip(1) - kl_steps
    packed = r[:, None].double().cpu()
    if to_go is not None:
        packed = torch.cat([packed, to_go.double().cpu()], 1)
    every = _gather_rows(dist, packed.to(device)).cpu()
    R, group = every[:, 0], d["cond"]
    adv, scale = advantages(R, group, cfg, m, every[:, 1:] if to_go is not None else None)
    adv, scale = adv[rank::world].to(device), scale[rank::world].to(device)
    ok_rows = torch.isfinite(r).to(device)
    bad = int(_sum(dist, (~torch.isfinite(r)).sum().to(device)).item())

    n_sel = max(1, round(cfg.timestep_fraction * m))
    pick = loc["pick"][:, :n_sel].to(device)  # (B_local, n_sel) positions among the stochastic steps
    b_local = len(r) // cfg.updates
    b_global = cfg.batch_size // cfg.updates
    s_all = torch.tensor(steps.sigmas[:-1], dtype=torch.float64)
    sd_all, su_all = torch.tensor(steps.s_down, dtype=torch.float64), torch.tensor(steps.s_up, dtype=torch.float64)
    stoch_t = torch.tensor(stoch)
    stats = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    n_updates, ok_all = 0, bool(torch.isfinite(R).any())
    for epoch in range(cfg.inner_epochs if ok_all else 0):  # no finite reward: nothing to learn, the step is skipped
        for mb in d["order"][epoch].tolist():
            rows = torch.arange(mb * b_local, (mb + 1) * b_local)
            pairs_r = rows[:, None].expand(-1, n_sel).reshape(-1)
            pairs_j = pick[rows].reshape(-1).cpu()  # index into the stochastic steps
            chunk = cfg.micro_batch or len(pairs_r)
            total = torch.zeros((), dtype=torch.float64, device=device)
            clipped = torch.zeros((), dtype=torch.float64, device=device)
            akl = torch.zeros((), dtype=torch.float64, device=device)
            starts = list(range(0, len(pairs_r), chunk))
            for ci, c0 in enumerate(starts):
                pr, pj = pairs_r[c0:c0 + chunk], pairs_j[c0:c0 + chunk]
                i = stoch_t[pj]  # the step index of each pair
                x, x_next = roll.xs[i, pr], roll.xs[i + 1, pr]
                sync = dist.no_sync(net) if ci < len(starts) - 1 else nullcontext()
                with sync:
                    lp, mean = net("logprob", x=x, x_next=x_next, s=s_all[i], s_down=sd_all[i], s_up=su_all[i],
                                   cond=_rows(cond, pr.to(device)) if cond else {})
                    lp_old = roll.logp[pr, pj]
                    ratio = torch.exp((lp - lp_old).clamp(max=30))
                    A = adv[pr, pj]
                    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
                    per = pg.double()
                    if beta > 0:
                        kl = LP.kl_normal(mean, roll.ref_mean[pj, pr], su_all[i].to(device))
                        per = per + beta * scale[pr].double() * kl
                    per = torch.where(ok_rows[pr], per, torch.zeros_like(per))
                    loss = per.sum() * world / (b_global * n_sel)
                    loss.backward()
                total += loss.detach()
                clipped += ((ratio - 1).abs() > cfg.clip_range).double().sum().detach()
                akl += (0.5 * (lp - lp_old) ** 2).double().sum().detach()
            ok = _finish(cfg, su, opt, total, dist)
            ok_all = ok_all and ok
            n_updates += 1
            stats["loss"] += float(dist.mean(total))
            stats["clipfrac"] += float(_sum(dist, clipped)) / (b_global * n_sel)
            stats["approx_kl"] += float(_sum(dist, akl)) / (b_global * n_sel)
    out = {k: v / max(1, n_updates) for k, v in stats.items()}
    finite = R[torch.isfinite(R)]
    out["reward"] = float(finite.mean()) if len(finite) else math.nan
    out["reward_std"] = float(finite.std(unbiased=False)) if len(finite) else math.nan
    if kl_steps is not None:
        out["kl"] = float(_sum(dist, kl_steps.sum(1).double().sum().to(device))) / cfg.batch_size
    out["bad_rewards"] = bad
    out["ok"] = ok_all
    return out


def _finish(cfg, su: Setup, opt, total: Tensor, dist) -> bool:
    """Clip, then step when the loss and the gradients are finite (else skip: the weights and the
    optimizer state stay as they were); zero the gradients."""
    params = [p for p in su.trainable.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else \
        torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
    ok = bool(torch.isfinite(dist.mean(total.float())) & torch.isfinite(norm))
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return ok


def _draft_step(cfg, su: Setup, net, opt, d: dict, step: int, dist) -> dict:
    """draft: the rollout with gradient through the last K steps, loss -r + beta KL, one update."""
    device, rank, world = dist.device, dist.rank, dist.world_size
    loc = _local(d, rank, world)
    steps = LP.plan(su.sigmas, su.policy)
    raw = _raw_cond(su.model, su.conditions, loc["cond"])
    cond = su.model.cond.prepare(raw, device) if raw is not None else {}
    x = _start(su, loc["start"], device)
    noise = loc["noise"].transpose(0, 1).to(device)
    n = len(x)
    chunk = cfg.micro_batch or n
    starts = list(range(0, n, chunk))
    total = torch.zeros((), dtype=torch.float64, device=device)
    rs, kls = [], []
    for ci, c0 in enumerate(starts):
        rows = torch.arange(c0, min(n, c0 + chunk))
        sub = _rows(cond, rows.to(device)) if cond else {}
        sync = dist.no_sync(net) if ci < len(starts) - 1 else nullcontext()
        with sync:
            sample, kl = net("draft", x=x[rows], steps=steps, noise=noise[:, rows], cond=sub,
                             grad_from=steps.n - cfg.draft_k, reference=su.reference if cfg.kl_beta > 0 else None,
                             checkpoint=cfg.grad_checkpointing)
            torch.manual_seed(_seed(cfg.seed, step, rank, 3, c0))
            r = su.reward(decode(su.model, sample, grad=True), _rows(raw, rows) if raw is not None else None)
            if not isinstance(r, Tensor) or r.shape != (len(rows),):
                raise ValueError(f"--reward {cfg.reward} returned a tensor of shape "
                                 f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__}; it must return "
                                 f"shape ({len(rows)},)")
            ok = torch.isfinite(r.detach())
            per = torch.where(ok, -r.double() + cfg.kl_beta * kl, torch.zeros_like(kl))
            loss = per.sum() * world / cfg.batch_size
            loss.backward()
        total += loss.detach()
        rs.append(r.detach().float())
        kls.append(kl.detach())
    r = torch.cat(rs)
    good = _finish(cfg, su, opt, total, dist)
    R = _gather_rows(dist, r[:, None].to(device)).cpu()[:, 0]
    finite = R[torch.isfinite(R)]
    out = {"loss": float(dist.mean(total)), "reward": float(finite.mean()) if len(finite) else math.nan,
           "reward_std": float(finite.std(unbiased=False)) if len(finite) else math.nan,
           "bad_rewards": int((~torch.isfinite(R)).sum())}
    if cfg.kl_beta > 0:
        out["kl"] = float(_sum(dist, torch.cat(kls).sum().to(device))) / cfg.batch_size
    out["ok"] = good and len(finite) > 0
    return out


# ------------------------------------------------------------------------------ saving
def merged(su: Setup, ema: EMA | None = None) -> dict[str, Tensor]:
    """The model's weights under its own keys (adapters folded in); of the EMA when given."""
    if ema is None:
        return lora.merged_state_dict(su.model) if lora.layers(su.model) else \
            {k: v.detach().clone() for k, v in su.model.state_dict().items()}
    if lora.layers(su.model):
        return lora.merged_state_dict(su.model, {k: v for k, v in ema.shadow.items()})
    own = su.model.state_dict()
    return {k: v.detach().clone() for k, v in ema.shadow.items() if k in own}


def finetuned_spec(su: Setup, cfg: FinetuneConfig):
    spec = copy.deepcopy(su.model.spec)
    spec.training = {**(spec.training or {}), "finetuned": {
        "method": cfg.method, "reward": cfg.reward, "reward_args": dict(cfg.reward_args), "from": cfg.model,
        "reference": cfg.reference or cfg.model, "kl_beta": cfg.kl_beta, "steps": cfg.steps,
        "sampler": cfg.sampler, "nfe": cfg.nfe, "lora_rank": cfg.lora_rank}}
    return spec


def _save(out, step, su: Setup, opt, ema, cfg, bad_run, bad_total, dist):
    path = None
    if dist.rank == 0:
        opt_t, opt_meta = checkpoint.optimizer_to_tensors(opt.state_dict())
        groups = {"model": merged(su), "optimizer": opt_t}
        if cfg.lora_rank:
            groups["lora"] = {k: v.detach() for k, v in su.trainable.state_dict().items()}
        if ema is not None:
            groups["ema"] = merged(su, ema)
            groups["ema_state"] = ema.state_dict()
        state = {"step": step, "config": cfg.to_dict(), "spec": finetuned_spec(su, cfg).to_dict(),
                 "optimizer": opt_meta, "bad_steps": bad_run, "bad_rewards": bad_total,
                 "reference_digest": su.reference_digest, "start_digest": su.start_digest}
        path = checkpoint.save(out, step, groups, state, keep=cfg.keep_checkpoints)
    dist.barrier()
    return path


def save_model(su: Setup, ema, cfg, folder: Path) -> Path:
    """The fine-tuned model as an ordinary model folder (adapters merged; EMA weights when kept)."""
    spec = finetuned_spec(su, cfg)
    clean = models.build(spec)
    models.io.load_weights(clean, merged(su), "the fine-tuned weights")
    return models.save(clean, folder, merged(su, ema) if ema is not None else None)
