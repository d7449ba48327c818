"""Few-step students (models/fewstep.py): the objectives' math against closed forms (progressive
distillation's target, distillation on a linear coupling, the teacher's ODE steps, iCT's curriculum
and pseudo-Huber), short training runs of every objective through config and the loop, exact
resume, DDP-exactness of the draws, and one clear error for each bad input."""
import dataclasses
import json
import math
import shutil

import pytest
import torch

import unifusion as uf
from tests.oracles import mixture_2d
from unifusion import cli, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion.models import fewstep as F
from unifusion.samplers import get, grids, make_denoise
from unifusion import checkpoint
from unifusion.training import loop as L

from .test_training import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"hidden": 32, "depth": 2, "emb_dim": 16}
RUN = {**TINY, "network_args": SMALL, "steps": 3, "checkpoint_every": 3, "sample_nfe": 20}  # preview: the default
EDM = {"process": "edm", "parametrization": "edm", "noise_density": "lognormal"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny flow teacher on moons and 64 couplings drawn from it."""
    root = tmp_path_factory.mktemp("fewstep")
    torch.set_num_threads(1)
    teacher = L.train(C.from_dict({**RUN, "steps": 20, "checkpoint_every": 20, "out": str(root / "teacher")}),
                      progress=False)["out"]
    assert cli.main(["couple", "--checkpoint", teacher, "--sampler", "heun", "--nfe", "9", "--n", "64", "--out",
                     str(root / "couplings"), "--shard-size", "32"]) == 0
    return {"root": root, "teacher": teacher, "couplings": str(root / "couplings")}


def _spec(data="moons", **kw):
    cfg = C.from_dict({**RUN, "data": data, **kw})
    return C.model_spec(cfg, datasets.load(data))


def _gaussian(v):
    """The exact denoiser of data N(0, v I): D(x, s) = v / (v + s^2) x, and E[x0] = 0 at s = inf."""
    def D(x, sigma, **cond):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return torch.where(torch.isinf(s), torch.zeros_like(x), x * v / (v + s.nan_to_num(posinf=1.0) ** 2))
    return D


class _Oracle:
    """A stand-in teacher: the exact Gaussian denoiser, unconditional, on the CPU."""

    def __init__(self, v):
        self.denoise, self.device = _gaussian(v), torch.device("cpu")
        self.cond = type("NoCond", (), {"kind": "none"})()


# ------------------------------------------------------------------ progressive distillation
@pytest.mark.parametrize("s_a, s_c", [(4.0, 0.7), (2.0, 0.0), (math.inf, 1.3), (math.inf, 0.0)])
def test_one_student_euler_step_with_the_target_lands_where_the_teacher_did(s_a, s_c):
    """D* = (s_a z_c - s_c z_a) / (s_a - s_c) (z_c - s_c n at s_a = inf): one Euler step of the
    samplers' own euler (uf.samplers.first_step from inf) with denoiser D* from z_a gives z_c."""
    g = torch.Generator().manual_seed(0)
    n, z_c, x0 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    z_a = n if math.isinf(s_a) else x0 + s_a * n
    sa, sc = torch.full((5,), s_a, dtype=torch.float64), torch.full((5,), s_c, dtype=torch.float64)
    target = F.progressive_target(z_a, z_c, n, sa, sc)
    D = make_denoise(lambda x, sigma: target, 5)
    if math.isinf(s_a):
        out, _ = uf.samplers.first_step(D, n, [math.inf, s_c])
    else:
        out = get("euler").fn(D, z_a, [s_a, s_c])
    torch.testing.assert_close(out, z_c, rtol=1e-12, atol=1e-12)


def test_progressive_loss_of_the_exact_student_matches_a_direct_computation(made):
    """Data N(0, v I) and its exact denoiser as both teacher and student: each Euler step is
    linear, z_b = a(s_a, s_b) z_a with a = v/(v+s_a^2) + (s_b/s_a) s_a^2/(v+s_a^2) (and z_b = s_b n
    from inf), so the target is c z_a with c = (s_a a_ab a_bc - s_c)/(s_a - s_c) and the l2 loss
    max(1, 1/s_a^2) mean((v/(v+s_a^2) - c)^2 z_a^2); over the grid 6 -> 3 of the flow teacher
    (student levels inf, ~2, ~0.5: weights 1, 1, ~4)."""
    v = 0.3
    spec = _spec(objective="progressive", teacher=made["teacher"], student_steps=3)
    teacher_levels = F.decode_levels(spec.training["objective"]["teacher"]["levels"])
    assert len(teacher_levels) == 6 and math.isinf(teacher_levels[0]) and float(teacher_levels[4]) < 1
    torch.testing.assert_close(F.decode_levels(spec.grid["kwargs"]["sigmas"]), teacher_levels[0::2])
    model = models.build(spec)
    model.__dict__["_teacher"] = _Oracle(v)
    model.denoise = _gaussian(v)
    tl = torch.cat([teacher_levels, torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(1)
    for j in (0, 1, 2):  # the student's levels: inf, then finite
        s_a, s_b, s_c = (float(tl[2 * j + i]) for i in range(3))
        x0 = torch.randn(6, 2, generator=g, dtype=torch.float64) * math.sqrt(v)
        n = torch.randn(6, 2, generator=g, dtype=torch.float64)
        batch = {"x0": x0, "noise": n, "sigma": torch.full((6,), s_a, dtype=torch.float64),
                 "sigma_mid": torch.full((6,), s_b, dtype=torch.float64),
                 "sigma_next": torch.full((6,), s_c, dtype=torch.float64)}
        loss = model.loss(batch)
        a_bc = v / (v + s_b**2) + (s_c / s_b) * s_b**2 / (v + s_b**2)
        if math.isinf(s_a):  # z_a = n, D(n, inf) = 0, z_b = s_b n, z_c = a_bc s_b n, D* = z_c - s_c n
            want = (0.0 - (a_bc * s_b - s_c)) ** 2 * (n**2).mean(1)
        else:
            a_ab = v / (v + s_a**2) + (s_b / s_a) * s_a**2 / (v + s_a**2)
            c = (s_a * a_ab * a_bc - s_c) / (s_a - s_c)
            want = max(1.0, s_a**-2) * (v / (v + s_a**2) - c) ** 2 * ((x0 + s_a * n) ** 2).mean(1)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ distillation onto couplings
def test_distill_loss_is_zero_for_the_student_that_maps_the_coupling_path(made):
    """Couplings x = A n (linear): on the path x + s n = (A + s I) n the exact student is
    x = A (A + s I)^{-1} x_s (A at s = inf, whose input is n): loss 0; the input at level s is
    x + s n; a wrong student's loss is its mean squared error."""
    spec = _spec(data=made["couplings"], objective="distill", student_steps=2)
    levels = F.decode_levels(spec.grid["kwargs"]["sigmas"])
    # the K-step grid: the flow's uniform-t grid with K + 1 levels less the last: t = 1, 1/2
    torch.testing.assert_close(levels, grids.uniform_t(3, 0.002, math.inf, uf.processes.Flow())[:2])
    model = models.build(spec)
    A = torch.tensor([[0.6, 0.2], [-0.3, 0.9]], dtype=torch.float64)
    seen = []

    def exact(x, sigma, **cond):
        seen.append((x.clone(), sigma.clone()))
        s = float(sigma[0])
        return x @ A.T if math.isinf(s) else torch.linalg.solve(A + s * torch.eye(2, dtype=x.dtype), x.T).T @ A.T
    model.denoise = exact
    g = torch.Generator().manual_seed(2)
    n = torch.randn(8, 2, generator=g, dtype=torch.float64)
    x0 = n @ A.T
    sigma = levels[torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])]
    loss = model.loss({"x0": x0, "noise": n, "sigma": sigma})
    assert float(loss.abs().max()) < 1e-12
    for x_in, s in seen:  # the rows were split by level: n at inf, x + s n below
        rows = (sigma == s[0]).nonzero().squeeze(1)
        torch.testing.assert_close(x_in, n[rows] if math.isinf(s[0]) else x0[rows] + s[0] * n[rows])
    model.denoise = lambda x, sigma, **c: torch.zeros_like(x)
    torch.testing.assert_close(model.loss({"x0": x0, "noise": n, "sigma": sigma}), (x0**2).mean(1))


def test_a_distilled_student_samples_with_k_calls_on_its_levels(made):
    spec = _spec(data=made["couplings"], objective="distill", student_steps=2)
    model = models.build(spec).eval()
    seen = []
    real = model.denoise
    model.denoise = lambda x, sigma, **c: (seen.append(float(sigma[0])), real(x, sigma, **c))[1]
    x = model.sample(n=4)
    assert seen == F.decode_levels(spec.grid["kwargs"]["sigmas"]).float().tolist() and torch.isfinite(x).all()
    assert spec.sampling_defaults() == ("euler", 2)
    with pytest.raises(ValueError, match="distilled for 2 steps"):
        model.sample(n=2, nfe=3)


# ------------------------------------------------------------------ consistency distillation / training
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_steps_match_the_samplers_own(solver):
    """The cd teacher's per-row step equals one step of the registered solver on [s, s_next]."""
    gm = mixture_2d()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64) * 5
    for s, s_next in ((5.0, 3.2), (0.8, 0.002)):
        sig, nxt = torch.full((7,), s, dtype=torch.float64), torch.full((7,), s_next, dtype=torch.float64)
        if solver == "heun":
            mine = F.heun_step(gm.denoise, x, sig, nxt, {})
        else:
            mine = F.euler_step(x, gm.denoise(x, sig), sig, nxt)
        theirs = get(solver).fn(make_denoise(gm.denoise, 7), x, [s, s_next])
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    # rows at different levels step independently
    sig = torch.tensor([5.0, 0.8], dtype=torch.float64)
    nxt = torch.tensor([3.2, 0.5], dtype=torch.float64)
    both = F.heun_step(gm.denoise, x[:2], sig, nxt, {}) if solver == "heun" else \
        F.euler_step(x[:2], gm.denoise(x[:2], sig), sig, nxt)
    for i in range(2):
        one = get(solver).fn(make_denoise(gm.denoise, 1), x[i:i + 1], [float(sig[i]), float(nxt[i])])
        torch.testing.assert_close(both[i:i + 1], one, rtol=1e-12, atol=1e-12)


def test_cd_loss_compares_the_student_with_itself_after_the_teachers_step():
    """cd: lambda d(f(x0 + s n, s), sg f(teacher step to s_next, s_next)), lambda = 1 / (s - s_next);
    ict: the same with x0 + s_next n in place of the teacher's step."""
    spec = _spec(objective="ict", **EDM)
    for name in ("cd", "ict"):
        obj = {**spec.training["objective"], "name": name, "solver": "euler", "teacher": {"path": "-"}}
        s = dataclasses.replace(spec, training={**spec.training, "objective": obj})
        model = models.build(s)
        model.__dict__["_teacher"] = _Oracle(0.3)
        calls = []

        def f(x, sigma, calls=calls, **cond):
            calls.append((x.clone(), sigma.clone()))
            return 0.5 * x  # any function: the loss only compares two of its values
        model.denoise = f
        g = torch.Generator().manual_seed(4)
        x0, n = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
        sig, nxt = torch.tensor([5.0, 1.0, 0.3, 2.0]), torch.tensor([3.0, 0.6, 0.1, 1.0])
        loss = model.loss({"x0": x0, "noise": n, "sigma": sig, "sigma_next": nxt})
        x = x0 + sig[:, None] * n
        if name == "cd":  # the teacher's Euler step D + (s_next / s)(x - D), D = v / (v + s^2) x exactly
            D = 0.3 / (0.3 + sig[:, None] ** 2) * x
            x_hat = D + (nxt / sig)[:, None] * (x - D)
        else:
            x_hat = x0 + nxt[:, None] * n
        weight = 1 / (sig - nxt)
        (first, s1), (second, s2) = calls  # the target (no gradient) first, then the student
        torch.testing.assert_close(first, x_hat)
        torch.testing.assert_close(s1, nxt)
        torch.testing.assert_close(second, x)
        torch.testing.assert_close(loss, weight * F.distance("pseudo_huber", 0.5 * x, 0.5 * x_hat))


def test_ict_curriculum_and_interval_distribution():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / 8) for s0 = 10, s1 = 1280."""
    K = 800  # K' = 100
    assert [F.ict_steps(k, K) for k in (0, 99, 100, 399, 400, 799)] == [11, 11, 21, 81, 161, 1281]
    assert F.ict_steps(10**6, K) == 1281  # capped at s1 + 1
    assert [F.ict_steps(k, 3) for k in range(3)] == [11, 21, 41]  # K' floors to 0: one doubling per step
    # intervals of a decreasing discretisation weighted by the lognormal mass between their ends
    levels = grids.karras(11, 0.002, 80.0, 7.0)
    p = F.ict_interval_probs(levels)
    from scipy.stats import norm
    mass = norm.cdf((levels[:-1].log().numpy() + 1.1) / 2.0) - norm.cdf((levels[1:].log().numpy() + 1.1) / 2.0)
    torch.testing.assert_close(p, torch.from_numpy(mass / mass.sum()), rtol=1e-9, atol=1e-12)


def test_pseudo_huber_is_the_ict_formula_and_its_limits():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 1, 8, 8, generator=g,
                                                                                  dtype=torch.float64)
    c = 0.00054 * 8  # sqrt(64)
    sq = ((a - b) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(F.distance("pseudo_huber", a, b), torch.sqrt(sq + c**2) - c)
    tiny = b + 1e-6 * (a - b)  # ~ ||.||^2 / (2c) near 0, ~ ||.|| - c far away
    torch.testing.assert_close(F.distance("pseudo_huber", tiny, b), 1e-12 * sq / (2 * c), rtol=1e-4, atol=0)
    torch.testing.assert_close(F.distance("pseudo_huber", a * 1e4, b * 0), (a * 1e4).flatten(1).norm(dim=1) - c,
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(F.distance("l2", a, b), sq / 64)


def test_perceptual_distance_is_available_for_digits_and_refused_elsewhere():
    pytest.importorskip("unifusion.perceptual")
    F.check_distance("perceptual", (1, 8, 8))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(F.distance("perceptual", x, x), torch.zeros(2))
    with pytest.raises(ValueError, match="no shipped feature network"):
        F.check_distance("perceptual", (2,))


# ------------------------------------------------------------------ training runs
def _train(out, **kw):
    return L.train(C.from_dict({**RUN, "out": str(out), **kw}), progress=False)


@pytest.mark.parametrize("name", ["distill", "progressive", "cd", "ict"])
def test_each_objective_trains_samples_and_records_how_it_was_made(made, tmp_path, name):
    kw = {"distill": dict(data=made["couplings"], student_steps=2),
          "progressive": dict(teacher=made["teacher"], student_steps=2),
          "cd": dict(teacher=made["teacher"], teacher_solver="heun", **EDM),
          "ict": dict(**EDM)}[name]
    res = _train(tmp_path / name, objective=name, **kw)
    log = [json.loads(line) for line in open(res["log"])]
    assert log[-1]["step"] == 3 and all(math.isfinite(r["loss"]) for r in log)
    model = models.load(res["model"])
    obj = model.spec.training["objective"]
    assert model.spec.family == "student" and obj["name"] == name
    assert set(model.state_dict()) == set(models.build(model.spec).state_dict())  # no teacher weights
    assert all(not k.startswith("_teacher") for k in model.state_dict())
    if name in ("progressive", "cd"):
        assert obj["teacher"]["path"] == made["teacher"]
    if name == "distill":
        assert model.spec.training["made_from"]["couplings"]["folder"] == made["couplings"]
    sampler, k = model.spec.sampling_defaults()
    assert (sampler, k) == (("euler", 2) if name in ("distill", "progressive") else ("consistency", 2))
    x = model.sample(n=8)
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    # `unifusion sample` and `eval` default to the student's own sampler
    assert cli.main(["sample", "--checkpoint", res["out"], "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0


def test_progressive_rounds_chain_and_halve_the_steps(made, tmp_path):
    first = _train(tmp_path / "r1", objective="progressive", teacher=made["teacher"], student_steps=2)
    second = _train(tmp_path / "r2", objective="progressive", teacher=first["model"], init_from=first["model"])
    s1, s2 = models.load(first["model"]).spec, models.load(second["model"]).spec
    assert s2.training["objective"]["steps"] == 1 and s2.sampling_defaults() == ("euler", 1)
    assert s2.grid["kwargs"]["sigmas"] == s1.grid["kwargs"]["sigmas"][0::2]
    with pytest.raises(ValueError, match="takes 1 steps.*odd count"):
        _train(tmp_path / "r3", objective="progressive", teacher=second["model"])
    with pytest.raises(ValueError, match="half \\(1\\), not --student-steps 2"):
        _train(tmp_path / "r4", objective="progressive", teacher=first["model"], student_steps=2)


def _straight_vs_crashed_and_resumed(tmp_path, monkeypatch, kw, at_crash=None):
    """8 steps straight (run "a") vs a run "b" that crashes after step 5 (checkpoint at 4) and resumes;
    asserts both end bit-identical (model, EMA, optimizer) and returns run "a"'s result and its
    checkpoint. at_crash(checkpoint) is checked on "b"'s checkpoint before it resumes."""
    whole = _train(tmp_path / "a", **kw)
    real, calls = L.EMA.update, {"n": 0}

    def crash_after_5(self, model, batch, *ok):
        real(self, model, batch, *ok)
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(L.EMA, "update", crash_after_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path / "b", **kw)
    monkeypatch.setattr(L.EMA, "update", real)
    if at_crash is not None:
        at_crash(checkpoint.load(tmp_path / "b")[0])
    _train(tmp_path / "b", resume=True, **kw)
    (ta, sa), (tb, sb) = checkpoint.load(whole["out"]), checkpoint.load(tmp_path / "b")
    assert sa["step"] == sb["step"] == 8
    for group in ("model", "ema", "optimizer"):
        for k, v in ta[group].items():
            assert torch.equal(v, tb[group][k]), (group, k)
    return whole, ta


def test_an_ict_run_resumed_equals_the_run_continued(tmp_path, monkeypatch):
    """The curriculum step lives in the checkpoint: 8 steps straight (N doubles every step) vs a
    run that crashes after step 5 (checkpoint at 4) and resumes are bit-identical."""
    def at_crash(ck):
        assert int(ck["model"]["ict_step"]) == 4
    kw = dict(objective="ict", steps=8, checkpoint_every=4, log_every=1, **EDM)
    _, ta = _straight_vs_crashed_and_resumed(tmp_path, monkeypatch, kw, at_crash)
    assert int(ta["model"]["ict_step"]) == 8
    assert [F.ict_steps(k, 8) for k in (0, 3, 4, 7)] == [11, 81, 161, 1281]  # N changes at the resume


def _ema_target_model(mu=0.9):
    spec = _spec(objective="ict", target_ema=mu, **EDM)
    obj = {**spec.training["objective"], "name": "cd", "solver": "euler", "teacher": {"path": "-"}}
    model = models.build(dataclasses.replace(spec, training={**spec.training, "objective": obj}))
    model.__dict__["_teacher"] = _Oracle(0.3)
    return model


def test_cd_ema_target_starts_as_the_online_net_and_follows_the_ema_rule():
    """--target-ema mu: theta^- is copied from theta at the first step random() announces, then
    theta^- <- mu theta^- + (1 - mu) theta once per step; the loss compares the online net with the
    target net's output at the teacher's step."""
    model = _ema_target_model(0.9)
    assert model.spec.training["objective"]["target_ema"] == 0.9
    assert "EMA" in model.spec.training["objective"]["target"]
    names = [n for n, _ in model.named_parameters()]
    target = {n: getattr(model.target, n.replace(".", "/")) for n in names}
    assert all(k.startswith("target") for k in set(model.state_dict()) - {n for n in names} - {"ict_step"})
    assert not any(n.startswith("target") for n in names)  # buffers: never in the optimizer
    src = datasets.load("moons")
    batch = datasets.collate([src[i] for i in range(8)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the target is made at the first step, not at construction
            p.add_(0.5)
    model.loss({**batch, **model.random(8, g)})
    assert int(model.target_started) == 1
    for n, p in model.named_parameters():
        assert torch.equal(target[n], p)
    before = {n: t.clone() for n, t in target.items()}
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step
            p.add_(torch.randn_like(p) * 0.1)
    model.loss({**batch, **model.random(8, g)})
    for n, p in model.named_parameters():
        torch.testing.assert_close(target[n], 0.9 * before[n] + 0.1 * p.detach())
    after = {n: t.clone() for n, t in target.items()}
    draws = model.random(8, g)
    model.loss({**batch, **draws})  # one update per announced step, however many forwards (grad accumulation)
    model.loss({**batch, **draws})
    moved = [not torch.equal(after[n], target[n]) for n in names]
    assert any(moved)
    once = {n: t.clone() for n, t in target.items()}
    model.loss({**batch, **draws})
    assert all(torch.equal(once[n], target[n]) for n in names)
    # the loss: lambda d(f_online(x, s), f_target(x_hat, s_next)), and the two nets differ
    x0, n_ = batch["x0"], draws["noise"]
    sig, nxt = draws["sigma"].float(), draws["sigma_next"].float()
    x = x0 + sig[:, None] * n_
    D = 0.3 / (0.3 + sig[:, None] ** 2) * x
    x_hat = D + (nxt / sig)[:, None] * (x - D)
    with torch.no_grad():
        f_t, f_o = model.target_denoise(x_hat, nxt), model.denoise(x_hat, nxt)
        assert not torch.allclose(f_t, f_o)
        want = F.distance("pseudo_huber", model.denoise(x, sig), f_t) / (sig - nxt)
        torch.testing.assert_close(model.loss({**batch, **draws}), want)


def test_a_cd_run_with_an_ema_target_resumed_equals_the_run_continued(made, tmp_path, monkeypatch):
    """theta^- lives in the checkpoint and is updated by the first forward of each step: 8 steps
    straight vs a run that crashes after step 5 (checkpoint at 4) and resumes are bit-identical."""
    kw = dict(objective="cd", teacher=made["teacher"], teacher_solver="euler", target_ema=0.8, steps=8,
              checkpoint_every=4, log_every=1, **EDM)
    whole, ta = _straight_vs_crashed_and_resumed(tmp_path, monkeypatch, kw)
    weights = ta["model"]
    assert int(weights["target_started"]) == 1
    pairs = [(k, "target." + k.replace(".", "/")) for k in weights if k.startswith("net.")]
    assert pairs and all(t in weights for _, t in pairs)
    assert any(not torch.equal(weights[k], weights[t]) for k, t in pairs)  # the target lags the online net
    model = models.load(whole["model"])  # and the saved model folder loads with it
    assert model.spec.training["objective"]["target_ema"] == 0.8


@pytest.mark.parametrize("name", ["distill", "progressive", "cd", "ict"])
def test_per_example_losses_depend_only_on_their_rows_draws(made, name):
    """DDP exactness: the loop draws the global batch's randomness with model.random and slices
    rows per rank; each example's loss must then equal its loss in the global batch."""
    kw = {"distill": dict(data=made["couplings"], student_steps=2),
          "progressive": dict(teacher=made["teacher"], student_steps=2),
          "cd": dict(teacher=made["teacher"], **EDM), "ict": dict(**EDM)}[name]
    data = kw.pop("data", "moons")
    src = datasets.load(data)
    model = models.build(C.model_spec(C.from_dict({**RUN, "data": data, "objective": name, **kw}), src))
    batch = datasets.collate([src[i] for i in range(8)])
    draws = model.random(8, torch.Generator().manual_seed(0))
    full = {**draws, **batch}
    with torch.no_grad():
        whole = model.loss(full)
        halves = [model.loss({k: v[r::2] for k, v in full.items()}) for r in (0, 1)]
    torch.testing.assert_close(whole[0::2], halves[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[1::2], halves[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad input
def test_each_bad_request_gets_one_clear_error(made, tmp_path, capsys):
    cases = [
        (dict(objective="progressive", student_steps=2), "--objective progressive distils a teacher: pass --teacher"),
        (dict(objective="cd"), "--objective cd distils a teacher"),
        (dict(objective="ict", teacher=made["teacher"], **EDM), "--objective ict has no --teacher"),
        (dict(objective="ict", init_from=made["teacher"], **EDM), "trains from scratch"),
        (dict(parametrization="consistency"), "consistency objectives"),
        (dict(objective="cd", teacher=made["teacher"]), "parametrization is 'consistency'"),
        (dict(objective="distill", family="cnf"), "--objective is an option of --family diffusion"),
        (dict(objective="distill", reflow=True), "drop it for --objective distill"),
        (dict(objective="bogus"), "--objective 'bogus' is not valid"),
        (dict(objective="cd", teacher=made["teacher"], distance="lpips", **EDM), "--distance 'lpips' is not valid"),
        (dict(objective="distill", target_ema=0.9), "--target-ema is for --objective cd or ict"),
        (dict(objective="cd", teacher=made["teacher"], target_ema=1.0, **EDM), "--target-ema must be a decay in"),
        (dict(objective="cd", teacher=made["teacher"], target_ema=0.9, sharding="fsdp", **EDM), "--sharding ddp"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            C.from_dict({**RUN, **kw})
    # distillation on data without noise; a teacher of another shape; a flow-process consistency model
    with pytest.raises(ValueError, match="trains on couplings from `unifusion couple`; --data moons has no noise"):
        _spec(objective="distill")
    with pytest.raises(ValueError, match="couplings and teachers must come from a model of the same shape"):
        C.model_spec(C.from_dict({"data": "digits-train", "objective": "cd", "teacher": made["teacher"], **EDM}),
                     datasets.load("digits-train"))
    with pytest.raises(ValueError, match="finite discretisation: pass --sigma-max"):
        _spec(objective="ict", parametrization="consistency")
    with pytest.raises(ValueError, match="not a distilled student: pass --student-steps"):
        _spec(objective="progressive", teacher=made["teacher"])
    with pytest.raises(ValueError, match="--teacher .*missing"):
        _spec(objective="cd", teacher=str(tmp_path / "missing"), **EDM)
    with pytest.raises(ValueError, match="cannot take; train the student with --process flow"):
        _spec(objective="progressive", teacher=made["teacher"], student_steps=2, **EDM)
    with pytest.raises(ValueError, match="preview grids.*distilled for 1 steps"):
        _spec(data=made["couplings"], objective="distill", sample_sampler="euler", sample_nfe=3)
    # a consistency model as a teacher
    ict = _train(tmp_path / "ict", objective="ict", **EDM)
    with pytest.raises(ValueError, match="a teacher must be a denoiser"):
        _spec(objective="cd", teacher=ict["model"], **EDM)
    # couplings from a model of another shape than the data they stand for, and --init-from one
    bad = tmp_path / "bad-couplings"
    shutil.copytree(made["couplings"], bad)
    index = json.loads((bad / "index.json").read_text())
    (bad / "index.json").write_text(json.dumps({**index, "data_source": "digits-train"}))
    with pytest.raises(ValueError, match="couplings from a model of another shape"):
        _spec(data=str(bad), reflow=True)
    digits = models.save(models.build(C.model_spec(C.from_dict({"data": "digits-train"}),
                                                   datasets.load("digits-train"))), tmp_path / "digits")
    with pytest.raises(ValueError, match="--init-from .* data shape \\(1, 8, 8\\)"):
        _spec(data=made["couplings"], reflow=True, init_from=str(digits))
    # a reflow run pointed at ordinary data is already an error (the loop's)
    assert cli.main(["train", *[f"--{k}={v}" for k, v in {**RUN, "network_args": "{hidden: 32}"}.items()],
                     "--reflow", "--out", str(tmp_path / "rf")]) == 2
    assert "--reflow trains on noise-data couplings" in capsys.readouterr().err


def test_two_ranks_equal_one_rank_for_consistency_training(tmp_path):
    """iCT's intervals and noise are drawn for the global batch and its curriculum step is a buffer
    advanced by random(): 2 gloo ranks end with the weights of 1 rank."""
    import os
    import subprocess

    from .test_training import _cli, _torchrun, _train_args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = dict(objective="ict", process="edm", parametrization="consistency", noise_density="lognormal", steps=4,
              checkpoint_every=4, sample_sampler="consistency", sample_nfe=1)
    for name, cmd in {"one": _cli("train", *_train_args(tmp_path / "one", **kw)),
                      "two": _torchrun(2, tmp_path / "two", **kw)}.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one, two = (checkpoint.load(tmp_path / n)[0]["model"] for n in ("one", "two"))
    assert int(one["ict_step"]) == int(two["ict_step"]) == 4
    for k in one:
        # the pseudo-Huber gradient is a unit-normalised difference of two nearby network outputs:
        # round-off of the rank-split reduction is magnified into ~2e-4 of the weights' size
        tol = 1e-3 * float(one[k].abs().max()) + 1e-5 if one[k].is_floating_point() else 0
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=tol, msg=k)
