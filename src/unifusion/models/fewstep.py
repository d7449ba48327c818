"""Few-step students: the "student" family, a denoiser (as in diffusion.py) trained by one of
four objectives that make it sample in 1-4 calls. Everything else (network, process,
parametrization, conditioning, sampling, eval, resume, DDP) is the diffusion family's.

| objective   | trains on                       | target of the student's output                      | samples with |
|-------------|---------------------------------|-----------------------------------------------------|--------------|
| distill     | couplings (n, x) of a teacher   | x, at the K levels of its K-step Euler grid         | euler @ K    |
| progressive | data + a teacher (2K steps)     | D* that lands one Euler step where the teacher's    | euler @ K    |
|             |                                 | two land (Salimans & Ho 2022)                       |              |
| cd          | data + a teacher (one ODE step) | sg f(teacher step to the next level) (Song 2023)    | consistency  |
| ict         | data alone                      | sg f(x0 + s_next n) (Song & Dhariwal 2023)          | consistency  |

All in the sigma-domain x = x0 + sigma n (the process's scaling is applied inside the denoiser,
as in DiffusionModel). A level sigma = inf (flow students) means x is the unit noise n itself.

**distill** (Liu et al. 2023, the RF paper's distillation step): the student's levels are its
own K-step grid, its spec grid with K + 1 levels less the last (for flows t = 1, 1 - 1/K, ...,
1/K: no level wasted at sigma_min), stored in the spec as the `levels` grid. At level s the
input is the coupling's path point x + s n and the target the teacher's sample x.

**progressive**: the teacher's 2K-level Euler grid (a distilled teacher's own levels, or a
plain teacher's spec grid with 2K + 1 levels less the last) and the student's K = every second
one. An example at student level s_a: z_a = x0 + s_a n (n at s_a = inf), two teacher Euler steps
z_a -> z_b -> z_c, and the target D* with which one student Euler step z_a -> z_c lands on z_c:

    z_c = D* + (s_c / s_a)(z_a - D*)   =>   D* = (s_a z_c - s_c z_a) / (s_a - s_c)
    (s_a = inf: z_c = D* + s_c n       =>   D* = z_c - s_c n)

weighted by max(1, 1/s_a^2) (the truncated-SNR weighting of Salimans & Ho). Rounds chain with
--teacher = the previous student and --init-from = the previous student.

**cd / ict**: f is the consistency-parametrized denoiser (parametrizations.ConsistencyPrecond,
f(x, sigma_min) = x exactly). The discretisation is karras(N, sigma_min, sigma_max, 7); for an
interval s > s_next of it and x = x0 + s n the loss is lambda d(f(x, s), sg f(x_hat, s_next)),
x_hat a teacher's Euler or Heun step from (x, s) to s_next (cd, intervals uniform) or
x0 + s_next n with the same n (ict: N(k) = min(s0 2^floor(k/K'), s1) + 1 over the run's K steps,
K' = floor(K / (log2 floor(s1/s0) + 1)), s0 = 10, s1 = 1280, fixed when the run starts; intervals
from the lognormal P_mean -1.1, P_std 2.0). Both weight by iCT's lambda = 1 / (s - s_next): the
CD paper's lambda = 1 gave a 3x worse one-step sliced W2 on moons at equal steps (0.099 vs 0.034;
the teacher's dpmpp_2m at NFE 20: 0.042). By default the target is the online network under
stop-gradient, as iCT prescribes. --target-ema mu > 0 uses the CD paper's target network instead:
theta^- <- mu theta^- + (1 - mu) theta after every optimizer step (the CM paper's CD: mu = 0.95),
theta^- starting as a copy of the online weights at the run's first step. theta^- is a set of
buffers, `target.<parameter name with '/' for '.'>` (one per trainable parameter, the class
embedding included; the flag `target_started` says whether the copy was made): in state_dict and
checkpoints, never in the optimizer; a whole copy, so refused with --sharding fsdp. The update is
applied by the first forward of a step, after random() announced the step, so a checkpoint holds
theta^- as the step left it and a resumed run (whose first random() announces its first step
again) continues it exactly. The
spec grid `consistency` (N from training, the final curriculum N for ict) gives the sampler its
levels; a grid searched for the model (evaluation/level_search.py: the greedy level search of
the CM paper) is stored in the spec's calibrated grids and is its default for that sampler and
NFE.

The teacher (progressive, cd) is loaded on first use with models.load and kept in the
instance's __dict__: frozen, never in state_dict, parameters, the optimizer, the EMA or DDP,
and moved lazily to the batch's device. All randomness is in `random` (DDP-exact); ict's
curriculum reads the step from the buffer `ict_step`, which `random` advances once per
training step and checkpoints carry, so a resumed run continues the curriculum exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import parametrizations
from ..parametrizations import _bc
from ..samplers import grids
from .diffusion import DiffusionModel, denoiser_spec
from .io import check_same_shape, read_spec
from .options import option
from .spec import ModelSpec

OBJECTIVES = ("distill", "progressive", "cd", "ict")
DISTANCES = ("l2", "pseudo_huber", "perceptual")
TEACHER_SOLVERS = ("euler", "heun")
CONSISTENCY_RHO = 7.0
ICT = {"s0": 10, "s1": 1280, "p_mean": -1.1, "p_std": 2.0}  # Song & Dhariwal 2023, Sec. 3.3-3.5
PSEUDO_HUBER_C = 0.00054  # c = 0.00054 sqrt(d) (iCT, Sec. 3.3)
DEFAULT_CONSISTENCY_NFE = 2


# ------------------------------------------------------------------------------ distances
def distance(name: str, a: Tensor, b: Tensor) -> Tensor:
    """d(a, b) per example, shape (B,): l2 (mean squared difference over dims), pseudo_huber
    (sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim)), perceptual (unifusion.perceptual)."""
    if name == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if name == "pseudo_huber":
        c = PSEUDO_HUBER_C * math.sqrt(a[0].numel())
        return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c
    if name == "perceptual":
        from ..perceptual import perceptual_distance
        return perceptual_distance(a, b)
    raise ValueError(f"unknown distance {name!r}; choose one of {list(DISTANCES)}")


def check_distance(name: str, shape: tuple) -> None:
    """A ValueError now (not at step 0) when the distance cannot compare examples of this shape."""
    if name not in DISTANCES:
        raise ValueError(f"--distance {name!r} is not valid; choose one of {list(DISTANCES)}")
    if name == "perceptual":
        z = torch.zeros((1,) + tuple(shape))
        distance(name, z, z)  # the perceptual network for this shape, or its one-line error


# ------------------------------------------------------------------------------ steps, per-row levels
def denoise_rows(denoise, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
    """denoise(x, sigma, **cond) for per-row levels that may mix sigma = inf (row = unit noise)
    with finite ones: the denoiser takes inf only for a whole batch, so the rows are split."""
    inf = torch.isinf(sigma)
    if not inf.any() or inf.all():
        return denoise(x, sigma, **cond)
    parts = [(idx, denoise(x[idx], sigma[idx], **{k: v[idx] for k, v in cond.items()}))
             for idx in (inf.nonzero().squeeze(1), (~inf).nonzero().squeeze(1))]
    out = torch.zeros_like(x)
    for idx, D in parts:
        out = out.index_copy(0, idx, D.to(out.dtype))
    return out


def _mask(m: Tensor, x: Tensor) -> Tensor:
    """A per-row boolean mask (B,) shaped to broadcast against x (B, ...)."""
    return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def euler_step(x: Tensor, D: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    """One Euler (DDIM) step of the PF-ODE from level s to s_next, per row: D + (s_next/s)(x - D);
    a row at s = inf holds the unit noise n and steps to D + s_next n (samplers.first_step)."""
    ratio = _bc(s_next / s, x)  # 0 where s = inf
    return torch.lerp(D, x, ratio) + _bc(torch.where(torch.isinf(s), s_next, torch.zeros_like(s_next)), x) * x


def heun_step(denoise, x: Tensor, s: Tensor, s_next: Tensor, cond: dict) -> Tensor:
    """One Heun step (EDM Alg. 2 without churn) from s to s_next > 0, per row."""
    d = (x - denoise(x, s, **cond)) / _bc(s, x)
    x_next = x + d * _bc(s_next - s, x)
    d_next = (x_next - denoise(x_next, s_next, **cond)) / _bc(s_next, x)
    return x + (d + d_next) * _bc(0.5 * (s_next - s), x)


def progressive_target(z_a: Tensor, z_c: Tensor, noise: Tensor, s_a: Tensor, s_c: Tensor) -> Tensor:
    """D* = (s_a z_c - s_c z_a) / (s_a - s_c), or z_c - s_c n at s_a = inf: the denoiser output with
    which one Euler step from (z_a, s_a) lands on z_c (module docstring)."""
    inf = torch.isinf(s_a)
    sa = torch.where(inf, torch.ones_like(s_a), s_a)  # keeps the unused branch finite
    finite = (_bc(sa, z_a) * z_c - _bc(s_c, z_a) * z_a) / _bc(sa - s_c, z_a)
    return torch.where(_mask(inf, z_a), z_c - _bc(s_c, z_a) * noise, finite)


# ------------------------------------------------------------------------------ discretisations
def encode_levels(levels) -> list:
    """Levels as JSON: floats, with sigma = inf as the string "inf" (as the spec stores sigma_max)."""
    return ["inf" if math.isinf(float(s)) else float(s) for s in levels]


def decode_levels(levels) -> Tensor:
    return torch.tensor([float(s) for s in levels], dtype=torch.float64)


def step_levels(spec: ModelSpec, k: int) -> Tensor:
    """The k levels of a model's k-step grid (the final 0 left out): a distilled student's own
    levels, else its spec grid with k + 1 levels less the last one (no level at sigma_min)."""
    if spec.grid["name"] == "levels":
        own = decode_levels(spec.grid["kwargs"]["sigmas"])
        if len(own) != k:
            raise ValueError(f"the teacher was distilled for {len(own)} steps, not {k}")
        return own
    from ..processes import get as process
    lo, hi = spec.sigma_range()
    sig = grids.make(spec.grid["name"], k + 1, lo, hi, process=process(spec.process["name"], **spec.process["kwargs"]),
                     **spec.grid["kwargs"])
    return sig[:k]


def karras_levels(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """A consistency discretisation: karras(N) from sigma_max down to sigma_min (float64)."""
    return grids.karras(n, sigma_min, sigma_max, CONSISTENCY_RHO)


def ict_steps(k: int, total: int, s0: int = ICT["s0"], s1: int = ICT["s1"]) -> int:
    """iCT's discretisation curriculum N(k) at step k of `total` (Song & Dhariwal 2023, eq. 8)."""
    stage = max(1, math.floor(total / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (k // stage), s1) + 1


def ict_interval_probs(levels: Tensor, p_mean: float = ICT["p_mean"], p_std: float = ICT["p_std"]) -> Tensor:
    """p(interval j) over a decreasing discretisation (levels[j] > levels[j + 1]): the lognormal
    mass between its ends, erf((ln s_j - P_mean) / (sqrt 2 P_std)) - erf(...s_{j+1}...) (iCT eq. 10)."""
    e = torch.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    p = e[:-1] - e[1:]
    return p / p.sum()


# ------------------------------------------------------------------------------ the family
@dataclass
class StudentOptions:
    """The few-step keys; they join `--family diffusion`'s command line (StudentModel.extends)."""
    objective: str = option("denoise", "what the model learns: denoise (the diffusion / flow-matching loss) | distill "
                                       "(onto couplings: --data from `unifusion couple`) | progressive (halve a "
                                       "--teacher's Euler steps) | cd (consistency distillation of a --teacher) | ict "
                                       "(improved consistency training): few-step students, see models/fewstep.py",
                            choices=("denoise",) + OBJECTIVES)
    teacher: str = option("", "progressive, cd: the teacher (a run, checkpoint or model folder)")
    student_steps: int = option(0, "distill: the student's steps K (0 = 1); progressive: K, where the teacher takes 2K "
                                   "(0 = half a distilled teacher's steps)", minimum=0)
    distance: str = option("auto", "few-step objectives: l2 | pseudo_huber | perceptual (auto = pseudo_huber for cd "
                                   "and ict, l2 otherwise)", choices=("auto",) + DISTANCES)
    cm_steps: int = option(18, "cd: the discretisation's N (karras, rho 7)", minimum=2)
    teacher_solver: str = option("heun", "cd: the teacher's ODE step, euler | heun", choices=TEACHER_SOLVERS)
    target_ema: float = option(0.0, "cd, ict: the target network's EMA decay mu per step (0 = the online network "
                                    "under stop-gradient, iCT's choice; the CM paper's CD uses 0.95)", minimum=0.0)


class StudentModel(DiffusionModel):
    family = "student"
    options = StudentOptions
    extends = "diffusion"  # --objective X under --family diffusion trains a student

    @classmethod
    def selected_by(cls, options) -> bool:
        return options.objective != "denoise"

    @classmethod
    def check_options(cls, cfg) -> None:
        check_options(cfg)

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        return student_spec(cfg, source, denoiser_spec(cfg, source, data, made, family="diffusion"))

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.objective = dict(spec.training["objective"])
        self.kind = self.objective["name"]
        if self.kind in ("distill", "progressive"):
            self.levels = decode_levels(spec.grid["kwargs"]["sigmas"])
        if self.kind == "progressive":
            self.teacher_levels = decode_levels(self.objective["teacher"]["levels"])
        if self.kind == "ict":  # the curriculum's step: advanced by random(), carried by checkpoints
            self.register_buffer("ict_step", torch.zeros((), dtype=torch.long))
        self.target_ema = float(self.objective.get("target_ema", 0.0))
        if self.target_ema > 0:  # the EMA target network's weights: buffers (module docstring)
            self._target_names = [name for name, _ in self.named_parameters()]
            self.target = nn.Module()
            for name, p in self.named_parameters():
                self.target.register_buffer(name.replace(".", "/"), p.detach().clone())
            self.register_buffer("target_started", torch.zeros((), dtype=torch.long))
        self.__dict__["_target_due"] = False  # random() announced a step: update the target first
        self.__dict__["_teacher"] = None  # not a submodule (module docstring)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        spec.check_denoiser_fields()
        obj = (spec.training or {}).get("objective")
        if not isinstance(obj, dict) or obj.get("name") not in OBJECTIVES:
            raise ValueError(f"a student spec needs training['objective'] with a name in {list(OBJECTIVES)}, "
                             f"got {obj!r}")
        name = obj["name"]
        if obj.get("distance") not in DISTANCES:
            raise ValueError(f"spec objective distance {obj.get('distance')!r} is unknown; choose one of {list(DISTANCES)}")
        sampler = obj.get("sampler")
        if not (isinstance(sampler, dict) and isinstance(sampler.get("name"), str) and isinstance(sampler.get("nfe"), int)):
            raise ValueError(f"spec objective sampler must be {{'name': ..., 'nfe': K}}, got {sampler!r}")
        consistency = name in ("cd", "ict")
        if consistency != (spec.parametrization["name"] == "consistency"):
            raise ValueError(f"a {name} student's parametrization must {'' if consistency else 'not '}be 'consistency', "
                             f"got {spec.parametrization['name']!r}")
        want_grid = "consistency" if consistency else "levels"
        if spec.grid["name"] != want_grid:
            raise ValueError(f"a {name} student samples on its own {want_grid!r} grid, but its spec grid is "
                             f"{spec.grid['name']!r}")
        mu = obj.get("target_ema", 0.0)
        if not (isinstance(mu, (int, float)) and 0 <= mu < 1) or (mu and not consistency):
            raise ValueError(f"spec objective target_ema {mu!r} must be a decay in [0, 1) of a cd or ict student")
        if consistency:
            if spec.grid["kwargs"].get("steps") != obj.get("steps"):
                raise ValueError(f"spec grid steps {spec.grid['kwargs'].get('steps')} differ from the objective's N "
                                 f"{obj.get('steps')}")
            if not math.isfinite(spec.sigma_range()[1]):
                raise ValueError("a consistency model needs a finite sigma_max")
            if name == "cd" and obj.get("solver") not in TEACHER_SOLVERS:
                raise ValueError(f"spec objective solver {obj.get('solver')!r} is unknown; choose one of "
                                 f"{list(TEACHER_SOLVERS)}")
            return
        levels = decode_levels(spec.grid["kwargs"].get("sigmas") or [])
        if len(levels) != obj.get("steps"):
            raise ValueError(f"a {name} student's levels ({len(levels)}) differ from its steps ({obj.get('steps')})")
        if name == "progressive":
            teacher = decode_levels(obj["teacher"]["levels"])
            if len(teacher) != 2 * len(levels) or not torch.equal(teacher[0::2], levels):
                raise ValueError("a progressive student's levels must be every second level of its teacher's")

    # ------------------------------------------------------------------ the teacher
    def teacher(self, device) -> DiffusionModel:
        """The frozen teacher on `device`, loaded on first use (module docstring)."""
        t = self.__dict__.get("_teacher")
        if t is None:
            from . import load
            t = load(self.objective["teacher"]["path"])
            check_teacher(t.spec, self.spec, self.objective["teacher"]["path"])
            t.requires_grad_(False)
            self.__dict__["_teacher"] = t
        if t.device != torch.device(device):
            t.to(device)
        return t

    # ------------------------------------------------------------------ draws
    def random(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """This objective's per-example levels (and noise, except distill's, which the couplings
        carry) and the condition-dropout mask; ict advances its curriculum step."""
        out = self._draws(n, generator, int(self.ict_step) if self.kind == "ict" else 0)
        if self.kind == "ict":
            self.ict_step += 1
        self.__dict__["_target_due"] = self.target_ema > 0
        return out

    # ------------------------------------------------------------------ the EMA target network
    @torch.no_grad()
    def update_target(self) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta; the first update copies theta (module docstring).
        No host read: the first-update switch is a device-side weight."""
        online = dict(self.named_parameters())
        first = self.target_started == 0
        targets, sources = [], []
        for name in self._target_names:
            p = online[name]
            t = getattr(self.target, name.replace(".", "/"))
            targets.append(t)
            sources.append(p.detach().to(t.dtype))
        weight = torch.where(first, 1.0, 1.0 - self.target_ema).to(targets[0].device, targets[0].dtype)
        for t, p in zip(targets, sources):
            t.lerp_(p, weight)
        self.target_started.fill_(1)

    def target_denoise(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """The denoiser with the target network's weights (the online one when --target-ema is 0)."""
        if self.target_ema == 0:
            return self.denoise(x, sigma, **cond)
        weights = {name: getattr(self.target, name.replace(".", "/")) for name in self._target_names}
        return torch.func.functional_call(_Denoiser(self), {f"model.{k}": v for k, v in weights.items()},
                                          (x, sigma), cond, strict=False)

    def _draws(self, n: int, generator, step: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.kind == "distill":
            out["sigma"] = self.levels[torch.randint(0, len(self.levels), (n,), generator=generator)]
        elif self.kind == "progressive":
            j = 2 * torch.randint(0, len(self.levels), (n,), generator=generator)
            teacher = torch.cat([self.teacher_levels, self.teacher_levels.new_zeros(1)])
            out.update(sigma=teacher[j], sigma_mid=teacher[j + 1], sigma_next=teacher[j + 2])
        else:
            lo, hi = self.spec.sigma_range()
            if self.kind == "cd":
                levels = karras_levels(self.objective["steps"], lo, hi)
                j = torch.randint(0, len(levels) - 1, (n,), generator=generator)
            else:
                levels = karras_levels(ict_steps(step, self.objective["total_steps"], self.objective["s0"],
                                                 self.objective["s1"]), lo, hi)
                probs = ict_interval_probs(levels, self.objective["p_mean"], self.objective["p_std"])
                j = torch.multinomial(probs, n, replacement=True, generator=generator)
            out.update(sigma=levels[j], sigma_next=levels[j + 1])
        if self.kind != "distill":
            out["noise"] = torch.randn((n,) + self.spec.shape, generator=generator)
        if self.cond.kind != "none" and getattr(self.cond, "p_drop", 0) > 0:
            out["drop"] = torch.rand(n, generator=generator) < self.cond.p_drop
        return out

    # ------------------------------------------------------------------ the loss
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        x0 = batch["x0"]
        if self.kind == "distill" and "noise" not in batch:
            raise ValueError("--objective distill trains on couplings from `unifusion couple`; this batch has no noise")
        draws = self._draws(len(x0), generator, int(self.ict_step) if self.kind == "ict" else 0) \
            if "sigma" not in batch else {}

        def get(key):  # a draw the loop put in the batch, else this call's own
            return batch[key] if key in batch else draws[key]
        sigma = get("sigma").to(x0.device, x0.dtype)
        noise = get("noise").to(x0.device, x0.dtype)
        cond = self._condition(batch, draws)
        if self.kind == "distill":
            x = torch.where(_mask(torch.isinf(sigma), x0), noise, x0 + _bc(sigma, x0).nan_to_num(posinf=0) * noise)
            return distance(self.objective["distance"], denoise_rows(self.denoise, x, sigma, cond), x0)
        s_next = get("sigma_next").to(x0.device, x0.dtype)
        if self.__dict__["_target_due"]:  # the first forward of a step announced by random()
            self.__dict__["_target_due"] = False
            self.update_target()
        if self.kind == "progressive":
            return self._progressive(x0, noise, sigma, get("sigma_mid").to(x0.device, x0.dtype), s_next, cond)
        x = x0 + _bc(sigma, x0) * noise
        if self.kind == "cd":
            t = self.teacher(x0.device)
            tcond = cond if t.cond.kind != "none" else {}
            with torch.no_grad():
                if self.objective["solver"] == "heun":
                    x_hat = heun_step(t.denoise, x, sigma, s_next, tcond)
                else:
                    x_hat = euler_step(x, t.denoise(x, sigma, **tcond), sigma, s_next)
        else:  # ict: the same noise one level lower
            x_hat = x0 + _bc(s_next, x0) * noise
        with torch.no_grad():  # the target network (by default the online one) under stop-gradient
            target = self.target_denoise(x_hat, s_next, **cond)
        weight = 1 / (sigma - s_next)  # iCT's lambda, for cd too (module docstring)
        return weight * distance(self.objective["distance"], self.denoise(x, sigma, **cond), target)

    def _progressive(self, x0, noise, s_a, s_b, s_c, cond) -> Tensor:
        inf = torch.isinf(s_a)
        z_a = torch.where(_mask(inf, x0), noise, x0 + _bc(s_a, x0).nan_to_num(posinf=0) * noise)
        t = self.teacher(x0.device)
        tcond = cond if t.cond.kind != "none" else {}
        with torch.no_grad():  # two teacher Euler steps z_a -> z_b -> z_c
            z_b = euler_step(z_a, denoise_rows(t.denoise, z_a, s_a, tcond), s_a, s_b)
            z_c = euler_step(z_b, t.denoise(z_b, s_b, **tcond), s_b, s_c)
            target = progressive_target(z_a, z_c, noise, s_a, s_c)
        weight = torch.clamp(s_a.pow(-2), min=1.0)  # max(SNR, 1), SNR = 1/sigma^2
        return weight * distance(self.objective["distance"], denoise_rows(self.denoise, z_a, s_a, cond), target)

    def _condition(self, batch: dict, draws: dict) -> dict:
        """The batch's labels, dropped to the null label where the dropout mask says (CFG training)."""
        if self.cond.kind == "none":
            return {}
        cond = batch.get("cond") or {}
        if not cond:
            raise ValueError(f"this model is {self.cond.kind}-conditional but the batch has no 'cond'; "
                             "train on labelled data or with --class-conditional false")
        drop = batch.get("drop", draws.get("drop"))
        return self.cond.drop(cond, drop) if drop is not None else cond

    # ------------------------------------------------------------------ sampling
    def sample(self, n=None, seeds=None, noise=None, sampler: str | None = None, nfe: int | None = None,
               steps: int | None = None, **kwargs):
        """DiffusionModel.sample with this student's own sampler and NFE when none is named
        (euler at K; consistency at 2), and the consistency sampler's noise floor at sigma_min."""
        own, k = self.spec.sampling_defaults()
        sampler = sampler or own
        if nfe is None and steps is None:
            nfe = k
        for key, value in self.sampler_options(sampler).items():
            kwargs.setdefault(key, value)
        return super().sample(n, seeds, noise, sampler=sampler, nfe=nfe, steps=steps, **kwargs)

    def sampler_options(self, sampler: str) -> dict:
        """The sampler options sample() adds: the consistency sampler's noise floor at sigma_min."""
        if sampler == "consistency" and isinstance(self.param, parametrizations.ConsistencyPrecond):
            return {"sigma_floor": self.param.sigma_min}
        return {}


class _Denoiser(nn.Module):
    """model.denoise as a module's forward (torch.func.functional_call swaps its weights for the
    target network's); not a submodule of the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.model.denoise(x, sigma, **cond)


# ------------------------------------------------------------------------------ specs
def check_teacher(teacher: ModelSpec, student: ModelSpec, path) -> None:
    """A teacher is a denoiser (no consistency model, no coupling flow) of the student's shape
    whose conditioning the student can use."""
    from . import registry
    if not hasattr(registry.FAMILIES.get(teacher.family), "denoise") or \
            (teacher.training or {}).get("objective", {}).get("name") in ("cd", "ict"):
        raise ValueError(f"--teacher {path} is a {teacher.family} model"
                         + (f" ({teacher.training['objective']['name']})" if teacher.family == "student" else "")
                         + "; a teacher must be a denoiser whose ODE steps mean something: a diffusion or flow model, "
                           "a cnf, or a distill/progressive student")
    check_same_shape(teacher, student.shape, f"--teacher {path}", student.data.get("source"))
    check_same_latent_space(teacher, student, path)
    if student.num_classes and teacher.num_classes != student.num_classes:
        raise ValueError(f"the student is conditional on {student.num_classes} classes but --teacher {path} "
                         f"{'is unconditional' if not teacher.num_classes else f'has {teacher.num_classes}'}; "
                         "use a teacher trained on the same labels, or train with --class-conditional false")


def check_same_latent_space(teacher: ModelSpec, student: ModelSpec, path) -> None:
    """A teacher and its student denoise in one space: both on pixels, or both on the latents of the
    same autoencoder (its weights by digest, and its normalisation); a latent shape can match by
    chance, so the shape check alone lets another autoencoder's teacher through."""
    t, s = teacher.data.get("kind") == "latent", student.data.get("kind") == "latent"
    if t != s:
        data = student.data.get("latents") or student.data.get("source")
        raise ValueError(f"--teacher {path} is a {'latent' if t else 'pixel'} model, but the student trains on "
                         f"{'latents' if s else 'pixels'} (--data {data}); a teacher must denoise the student's "
                         "data space")
    if not t:
        return
    a, b = teacher.data.get("autoencoder") or {}, student.data.get("autoencoder") or {}
    da, db = str(a.get("digest", "")), str(b.get("digest", ""))
    same = bool(da and db) and (da.startswith(db) or db.startswith(da))
    if same and all(a.get(k) is None or b.get(k) is None or
                    all(abs(x - y) <= 1e-9 + 1e-6 * abs(y) for x, y in zip(a[k], b[k])) for k in ("shift", "scale")):
        return
    raise ValueError(f"--teacher {path} works in the latent space of autoencoder {a.get('path')} (digest {da[:16]}), "
                     f"but these latents come from {b.get('path')} (digest {db[:16]})"
                     + ("" if da != db else " with other latent statistics") + "; use a teacher trained on latents of "
                     "the same autoencoder, or encode the data with the teacher's autoencoder")


def resolve_distance(name: str, objective: str) -> str:
    """'auto': pseudo-Huber for the consistency objectives (as in iCT), l2 for the distillations."""
    if name != "auto":
        return name
    return "pseudo_huber" if objective in ("cd", "ict") else "l2"


def student_spec(cfg, source, base: ModelSpec) -> ModelSpec:
    """The student's spec from the denoiser spec `base` of the same config (diffusion.denoiser_spec):
    family "student", its own grid and sampling default, and how it was made."""
    import dataclasses
    o = cfg.options
    name, data = o.objective, str(cfg.data)
    dist = resolve_distance(o.distance, name)
    check_distance(dist, base.shape)
    lo, hi = base.sigma_range()
    obj: dict = {"name": name, "distance": dist}
    spec = dataclasses.replace(base, family="student", training=dict(base.training), calibrated={})
    param = parametrizations.get(base.parametrization["name"], **base.parametrization["kwargs"])
    if name in ("distill", "progressive"):
        if name == "distill":
            if "noise" not in source[0]:
                raise ValueError(f"--objective distill trains on couplings from `unifusion couple`; --data {data} "
                                 "has no noise")
            k = o.student_steps or 1
            levels = step_levels(base, k)
            obj.update(steps=k)
        else:
            tspec = read_spec(o.teacher, "--teacher")
            check_teacher(tspec, base, o.teacher)
            if tspec.grid["name"] == "levels":  # a distilled teacher: halve its steps
                kt = len(tspec.grid["kwargs"]["sigmas"])
                if kt % 2 or (o.student_steps and 2 * o.student_steps != kt):
                    raise ValueError(f"--teacher {o.teacher} takes {kt} steps; a progressive student takes half "
                                     + ("(an odd count cannot be halved)" if kt % 2 else f"({kt // 2}), not "
                                                                                          f"--student-steps {o.student_steps}"))
                k = kt // 2
            elif not o.student_steps:
                raise ValueError(f"--teacher {o.teacher} is not a distilled student: pass --student-steps K (the "
                                 "student takes K Euler steps where the teacher takes 2K)")
            else:
                k = o.student_steps
            tlevels = step_levels(tspec, 2 * k)
            levels = tlevels[0::2]
            obj.update(steps=k, teacher={"path": str(o.teacher), "family": tspec.family, "sampler": "euler",
                                         "steps": 2 * k, "levels": encode_levels(tlevels)},
                       weighting="max(1, 1/sigma^2)")
        if math.isinf(float(levels[0])):
            try:
                param.at_infinity()
            except ValueError:
                raise ValueError(f"the {name} student's first level is sigma = inf (a flow teacher's grid), which the "
                                 f"{base.parametrization['name']} parametrization cannot take; train the student with "
                                 "--process flow --parametrization velocity") from None
        obj["sampler"] = {"name": "euler", "nfe": k}
        spec.grid = {"name": "levels", "kwargs": {"sigmas": encode_levels(levels)}}
        spec.sigma_max = float(levels[0])
    else:
        if math.isinf(hi):
            raise ValueError(f"--objective {name} trains a consistency model on a finite discretisation: pass "
                             "--sigma-max (e.g. 80) or use --process edm")
        if name == "cd":
            tspec = read_spec(o.teacher, "--teacher")
            check_teacher(tspec, base, o.teacher)
            n = o.cm_steps
            obj.update(teacher={"path": str(o.teacher), "family": tspec.family, "solver": o.teacher_solver},
                       solver=o.teacher_solver, weighting="1/(sigma - sigma_next)")
        else:
            n = ict_steps(cfg.steps - 1, cfg.steps)
            obj.update(ICT, total_steps=cfg.steps, weighting="1/(sigma - sigma_next)")
        obj.update(target=f"EMA of the online network, decay {o.target_ema:g} per step, stop-gradient"
                   if o.target_ema else "online network, stop-gradient", target_ema=float(o.target_ema))
        obj.update(steps=n, rho=CONSISTENCY_RHO, sampler={"name": "consistency", "nfe": min(DEFAULT_CONSISTENCY_NFE, n - 1)})
        spec.parametrization = {"name": "consistency", "kwargs": {"sigma_data": cfg.sigma_data, "sigma_min": lo}}
        spec.grid = {"name": "consistency", "kwargs": {"steps": n, "rho": CONSISTENCY_RHO}}
    spec.training["objective"] = obj
    spec.validate()
    check_preview(cfg, spec)
    return spec


def check_preview(cfg, spec: ModelSpec) -> None:
    """The run's preview sampler on this student's grid, tried now on a zero denoiser (a few
    calls), so that a budget its grid cannot give fails before step 0, not after the last step."""
    from .. import processes
    from ..samplers import sample
    lo, hi = spec.sigma_range()
    try:
        sample(lambda x, sigma, **c: torch.zeros_like(x), torch.zeros((1,) + spec.shape), cfg.sample_sampler,
               nfe=cfg.sample_nfe, sigma_min=lo, sigma_max=hi, grid=spec.grid["name"],
               grid_options=spec.grid["kwargs"], process=processes.get(spec.process["name"], **spec.process["kwargs"]))
    except ValueError as e:
        raise ValueError(f"--sample-sampler {cfg.sample_sampler} --sample-nfe {cfg.sample_nfe} (the preview grids) "
                         f"cannot sample this student: {e}") from None


# ------------------------------------------------------------------------------ config checks
def check_options(cfg) -> None:
    """The few-step keys of a run of --family diffusion (StudentModel.check_options; files are
    checked later, in spec_from_config). A student's preview grids default to its own sampler (the
    run's default dpmpp_2m at 20 calls is more than a few-step student's grid has)."""
    o = cfg.options
    name = o.objective
    if cfg.family == "student" and name == "denoise":
        raise ValueError("--family student trains a few-step student: give --objective distill, progressive, cd or "
                         "ict (or train --family diffusion)")
    consistency = cfg.parametrization == "consistency"
    if name == "denoise":
        if consistency:
            raise ValueError("--parametrization consistency is the consistency objectives' (--objective cd or ict): "
                             "its 1/c_out^2 denoising weight is infinite at sigma_min")
        if o.teacher:
            raise ValueError("--teacher is for --objective progressive or cd")
        return
    if cfg.reflow:
        raise ValueError(f"--reflow trains a rectified flow on couplings with the denoising loss; drop it for "
                         f"--objective {name}" + (" (which trains on the couplings' noise already)"
                                                  if name == "distill" else ""))
    if name in ("progressive", "cd") and not o.teacher:
        raise ValueError(f"--objective {name} distils a teacher: pass --teacher RUN (a run, checkpoint or model folder)")
    if name in ("distill", "ict") and o.teacher:
        raise ValueError(f"--objective {name} has no --teacher" + (": it learns from couplings made by the teacher "
                         "(`unifusion couple`)" if name == "distill" else ": consistency training needs none"))
    if name in ("cd", "ict") and cfg.parametrization not in ("edm", "consistency"):
        raise ValueError(f"--objective {name} trains a consistency function, whose parametrization is 'consistency'; "
                         f"drop --parametrization {cfg.parametrization}")
    if name in ("distill", "progressive") and consistency:
        raise ValueError(f"--objective {name} trains a denoiser: pick a denoiser parametrization (e.g. velocity), "
                         "not consistency")
    if name == "ict" and cfg.init_from:
        raise ValueError("--objective ict trains from scratch (consistency training); drop --init-from, or distil a "
                         "teacher with --objective cd --init-from TEACHER")
    if o.target_ema and name not in ("cd", "ict"):
        raise ValueError(f"--target-ema is for --objective cd or ict (a consistency target network); drop it for "
                         f"--objective {name}")
    if not o.target_ema < 1:
        raise ValueError(f"--target-ema must be a decay in [0, 1) (0: the online network), got {o.target_ema}")
    if o.target_ema and cfg.sharding == "fsdp":
        raise ValueError("--target-ema keeps a whole copy of the weights beside the shards; train it with --sharding "
                         "ddp (or without --target-ema)")
    if name in ("cd", "ict") and o.student_steps:
        raise ValueError("--student-steps is for --objective distill or progressive; cd and ict use --cm-steps / "
                         "their curriculum")
    from .spec import DEFAULT_SAMPLING
    if (cfg.sample_sampler, cfg.sample_nfe) == DEFAULT_SAMPLING:
        cfg.sample_sampler, cfg.sample_nfe = (
            ("euler", o.student_steps or 1) if name in ("distill", "progressive") else
            ("consistency", min(DEFAULT_CONSISTENCY_NFE, o.cm_steps - 1) if name == "cd" else DEFAULT_CONSISTENCY_NFE))
