"""The sync-free training step: a non-finite step's update is skipped on the device (optimizer,
weights, EMA and post-hoc EMA exactly as if it had not happened), counters are read only at log and
checkpoint steps, the fused AdamW and the foreach EMAs match the plain per-tensor code."""
import copy
import math
import json
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from unifusion import checkpoint
from unifusion import config as C
from unifusion.models import DiffusionModel
from unifusion.safeio import read_safetensors
from unifusion.training import loop as L
from unifusion.training.ema import EMA, SAMPLES_SEEN_KEY, PowerEMA

TINY = dict(data="moons", network="mlp-2d", process="flow", parametrization="velocity", noise_density="uniform_t",
            steps=8, batch_size=32, checkpoint_every=8, sample_every=0, log_every=4, warmup_steps=3, lr=1e-3,
            sample_nfe=4, ema_half_life=500.0, grad_clip=1.0, posthoc_every=4)


def tiny(path, **kw):
    return C.from_dict({**TINY, "out": str(path), **kw})


class StepOf:
    """Which training step the loop is in (lr_at(cfg, step) opens every step)."""

    def __init__(self, monkeypatch):
        self.step = None
        real = L.lr_at

        def spy(cfg, step):
            self.step = step
            return real(cfg, step)
        monkeypatch.setattr(L, "lr_at", spy)


def nan_at(monkeypatch, where: StepOf, steps):
    real = DiffusionModel.forward

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        return out * float("nan") if where.step in steps else out
    monkeypatch.setattr(DiffusionModel, "forward", forward)


def skip_at(monkeypatch, where: StepOf, step):
    """The reference: the step's update skipped on the host (optimizer, EMA, post-hoc EMA not called)."""
    for cls, name in ((torch.optim.AdamW, "step"), (EMA, "update"), (PowerEMA, "update")):
        real = getattr(cls, name)

        def wrapped(self, *a, _real=real, **k):
            if where.step != step:
                return _real(self, *a, **k)
        monkeypatch.setattr(cls, name, wrapped)


def run_tensors(out):
    tensors, state = checkpoint.load(out)
    folder = Path(out) / "posthoc"
    snaps = {p.name: read_safetensors(p, with_metadata=True) for p in sorted(folder.glob("*.safetensors"))}
    return tensors, state, snaps


def log_of(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ skip semantics in the loop
@pytest.mark.parametrize("bad", [0, 5])
def test_a_non_finite_step_is_skipped_exactly(tmp_path, monkeypatch, bad):
    """NaN loss at one step == a run whose update at that step was skipped on the host: weights,
    optimizer state (moments, step counts), EMA (and samples seen), post-hoc EMA and its snapshots bit for bit."""
    where = StepOf(monkeypatch)
    with monkeypatch.context() as m:
        nan_at(m, where, {bad})
        L.train(tiny(tmp_path / "nan"), progress=False)
    with monkeypatch.context() as m:
        skip_at(m, where, bad)
        L.train(tiny(tmp_path / "skip"), progress=False)
    (ta, sa, pa), (tb, sb, pb) = run_tensors(tmp_path / "nan"), run_tensors(tmp_path / "skip")
    assert sa["optimizer"] == sb["optimizer"] and sa["step"] == sb["step"] == 8
    for group in ("model", "ema", "optimizer", "posthoc"):
        assert ta[group].keys() == tb[group].keys()
        for k in ta[group]:
            assert torch.equal(ta[group][k], tb[group][k]), (group, k)
    assert float(ta["ema"][SAMPLES_SEEN_KEY]) == 7 * 32
    assert pa.keys() == pb.keys() == {"step-00000004.safetensors", "step-00000008.safetensors"}
    for name in pa:  # the snapshots (their step metadata counts the updates taken)
        (a, meta_a), (b, meta_b) = pa[name], pb[name]
        assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pa["step-00000008.safetensors"][1]["step"] == "7"
    assert [r["bad_steps"] for r in log_of(tmp_path / "nan")] == [int(bad == 3), 0]


def test_bad_steps_are_counted_at_log_steps(tmp_path, monkeypatch):
    where = StepOf(monkeypatch)
    nan_at(monkeypatch, where, {2, 3})
    L.train(tiny(tmp_path / "run", steps=6, log_every=2, checkpoint_every=6), progress=False)
    log = log_of(tmp_path / "run")
    assert [r["bad_steps"] for r in log] == [0, 2, 0]
    assert [r["loss"] == r["loss"] for r in log] == [True, False, True]  # the window with the NaNs logs NaN


def test_max_bad_steps_aborts_at_the_first_log_read_after_the_threshold(tmp_path, monkeypatch):
    """3 bad steps in a row (0, 1, 2), then good ones: the abort comes at the read at step 4."""
    where = StepOf(monkeypatch)
    nan_at(monkeypatch, where, {0, 1, 2})
    with pytest.raises(RuntimeError, match=r"not finite for 3 steps in a row \(read at step 4\)"):
        L.train(tiny(tmp_path / "run", steps=12, max_bad_steps=3), progress=False)
    assert where.step == 3
    L.train(tiny(tmp_path / "ok", steps=12, max_bad_steps=4), progress=False)  # under the threshold: trains on


def test_a_run_with_no_good_step_ends_with_an_error(tmp_path, monkeypatch):
    where = StepOf(monkeypatch)
    nan_at(monkeypatch, where, set(range(100)))
    with pytest.raises(RuntimeError, match=r"no step of this run had a finite loss \(4 steps") as e:
        L.train(tiny(tmp_path / "run", steps=4, checkpoint_every=4), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "model").exists() and checkpoint.latest(tmp_path / "run") is None


# ------------------------------------------------------------------ no host read inside the step
class HostReads:
    """Every Tensor -> Python read (item, bool, float, int, index, tolist) with the step it happened in
    and whether the model's forward pass (the loss) made it."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")
    MODEL = ("/unifusion/models/", "/unifusion/networks/", "/unifusion/parametrizations.py", "/unifusion/losses.py")

    def __init__(self, monkeypatch, where: StepOf):
        self.reads = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, _name=name, **k):
                if where.step is not None:
                    files = [f.filename for f in traceback.extract_stack()]
                    model = any(m in f for f in files for m in self.MODEL)
                    self.reads.append((where.step + 1, _name, model, files[-2]))
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, spy)


READ_CFG = dict(steps=12, log_every=4, checkpoint_every=6, posthoc_every=0)


def _allowed(done):
    return done % READ_CFG["log_every"] == 0 or done % READ_CFG["checkpoint_every"] == 0 or done == READ_CFG["steps"]


def test_the_trainer_reads_nothing_from_the_device_between_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """The loop, optimizer, clipping and EMAs; what the model's own loss reads is the next test's."""
    where = StepOf(monkeypatch)
    spy = HostReads(monkeypatch, where)
    L.train(tiny(tmp_path / "run", **READ_CFG), progress=False)
    trainer = [r for r in spy.reads if not r[2]]
    assert trainer and all(_allowed(done) for done, *_ in trainer)  # (it does read at log steps)
    assert [r for r in trainer if not _allowed(r[0])] == []


@pytest.mark.parametrize("extra", [{}, dict(data="gmm", network_args={"hidden": 32, "depth": 2}, cond_drop=0.2),
                                   dict(process="edm", parametrization="edm", noise_density="lognormal")],
                         ids=["flow-velocity", "class-labels", "edm"])
def test_the_whole_step_reads_nothing_from_the_device(tmp_path, monkeypatch, extra):
    """The model's loss too: parametrizations.denoise selects sigma = inf rows on the device, and the class
    labels' range check runs once (the first eager call) instead of every step."""
    where = StepOf(monkeypatch)
    spy = HostReads(monkeypatch, where)
    L.train(tiny(tmp_path / "run", **{**READ_CFG, **extra}), progress=False)
    assert [r for r in spy.reads if not _allowed(r[0])] == []


# ------------------------------------------------------------------ fused AdamW
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3))


def test_the_fused_adamw_matches_the_default_one():
    cfg = C.from_dict({"lr": 3e-3, "weight_decay": 0.05})
    a, b = _net(), _net()
    ours, theirs = L._optimizer(a, cfg), torch.optim.AdamW(b.parameters(), lr=3e-3, weight_decay=0.05)
    assert ours.param_groups[0]["fused"]
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        for net, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            (net(x) - x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for s, t in zip(ours.state.values(), theirs.state.values()):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[k], t[k], rtol=1e-5, atol=1e-9)


def test_found_inf_skips_the_fused_update_exactly():
    cfg = C.from_dict({"lr": 3e-3})
    a, b = _net(), _net()
    oa, ob = L._optimizer(a, cfg), L._optimizer(b, cfg)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    for i in range(6):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            (net(x) - x).pow(2).mean().backward()
        oa.found_inf = torch.tensor(float(i == 3))
        oa.step()
        if i != 3:
            ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(oa.state.values(), ob.state.values()):
        assert all(torch.equal(s[k], t[k]) for k in ("step", "exp_avg", "exp_avg_sq")) and float(s["step"]) == 5


# ------------------------------------------------------------------ foreach EMAs vs the per-tensor code
class _WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))
        self.register_buffer("count", torch.tensor(0))


def _perturb(model, i):
    with torch.no_grad():
        for j, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * i + j)) * 0.1)
        model.scale.mul_(1.1)
        model.count.add_(1)


def _reference_ema(shadow, model, beta):
    """The per-tensor code the foreach update replaced."""
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, ema in shadow.items():
        theta = current[name].detach()
        if ema.is_floating_point():
            ema.lerp_(theta.to(ema.device, torch.float32), 1.0 - beta)
        else:
            ema.copy_(theta)


@pytest.mark.parametrize("warmup", [0.0, 0.1])
def test_the_foreach_ema_equals_the_per_tensor_code(warmup):
    model = _WithBuffers()
    ema = EMA(model, 500.0, warmup_ratio=warmup)
    ref = {k: v.clone() for k, v in ema.shadow.items()}
    for i in range(8):
        _perturb(model, i)
        beta = ema.beta(16)
        ema.update(model, 16)
        _reference_ema(ref, model, beta)
        for k in ref:
            assert torch.equal(ema.shadow[k], ref[k]), k
    assert ema.samples_seen == 8 * 16


@pytest.mark.parametrize("warmup", [0.0, 0.1])
def test_the_masked_ema_update(warmup):
    """ok=True: the same average within rounding (the lerp fuses its multiply-add); ok=False: nothing moves,
    the samples are not counted, and the state dict reads as if the update had not been called."""
    model, other = _WithBuffers(), _WithBuffers()
    ema, ref = EMA(model, 500.0, warmup_ratio=warmup), EMA(other, 500.0, warmup_ratio=warmup)
    for i in range(10):
        _perturb(model, i)
        skip = i in (0, 4, 5)
        before = {k: v.clone() for k, v in ema.shadow.items()}
        ema.update(model, 16, torch.tensor(not skip))
        if skip:
            assert all(torch.equal(ema.shadow[k], before[k]) for k in before)
        else:
            other.load_state_dict(model.state_dict())
            ref.update(other, 16)
        for k in ref.shadow:
            torch.testing.assert_close(ema.shadow[k], ref.shadow[k], rtol=2e-6, atol=1e-7)
    assert ema.samples_seen == ref.samples_seen == 7 * 16
    sa, sb = ema.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape for k in sa)
    assert sa[SAMPLES_SEEN_KEY].dtype == torch.float64 and float(sa[SAMPLES_SEEN_KEY]) == 7 * 16


def test_the_ema_state_dict_is_unchanged_in_format():
    """Names, dtypes, shapes and the float64 samples counter, as the checkpoints of earlier runs hold them."""
    model = _WithBuffers()
    ema = EMA(model, 100.0)
    ema.update(model, 8, torch.tensor(True))
    sd = ema.state_dict()
    want = {k: (torch.float32 if v.is_floating_point() else v.dtype, v.shape) for k, v in model.state_dict().items()}
    want[SAMPLES_SEEN_KEY] = (torch.float64, torch.Size([]))
    assert {k: (v.dtype, v.shape) for k, v in sd.items()} == want
    again = EMA(_WithBuffers(), 100.0)
    again.load_state_dict(sd)
    assert again.samples_seen == 8.0


def _reference_power(shadows, gammas, model, steps):
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    for gamma, shadow in zip(gammas, shadows):
        beta = (1 - 1 / steps) ** (gamma + 1)
        for name, avg in shadow.items():
            avg.lerp_(current[name].detach().to(avg.device, torch.float32), 1.0 - beta)


def test_the_foreach_power_ema_equals_the_per_tensor_code():
    model = _WithBuffers()
    pe = PowerEMA(model, (0.05, 0.10))
    ref = [{k: v.clone() for k, v in s.items()} for s in pe.shadows]
    for i in range(12):
        _perturb(model, i)
        pe.update(model)
        _reference_power(ref, pe.gammas, model, i + 1)
        for s, r in zip(pe.shadows, ref):
            assert all(torch.equal(s[k], r[k]) for k in r)
    assert pe.steps == 12


def test_the_masked_power_ema_update():
    model, other = _WithBuffers(), _WithBuffers()
    pe, ref = PowerEMA(model, (0.05, 0.10)), PowerEMA(other, (0.05, 0.10))
    for i in range(12):
        _perturb(model, i)
        skip = i in (0, 1, 6)
        before = [{k: v.clone() for k, v in s.items()} for s in pe.shadows]
        pe.update(model, torch.tensor(not skip))
        if skip:
            assert all(torch.equal(s[k], b[k]) for s, b in zip(pe.shadows, before) for k in b)
        else:
            other.load_state_dict(model.state_dict())
            ref.update(other)
        for s, r in zip(pe.shadows, ref.shadows):
            for k in r:
                torch.testing.assert_close(s[k], r[k], rtol=2e-6, atol=1e-7)
    assert pe.steps == ref.steps == 9
    assert pe.snapshot()[1] == ref.snapshot()[1]
    sa, sb = pe.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys() and torch.equal(sa[SAMPLES_SEEN_KEY], sb[SAMPLES_SEEN_KEY])


def test_a_skipped_first_update_copies_nothing_and_the_next_copies_the_weights():
    model = _WithBuffers()
    start = copy.deepcopy(model.state_dict())
    pe, ema = PowerEMA(model, (0.10,)), EMA(model, 100.0, warmup_ratio=0.1)
    _perturb(model, 0)
    pe.update(model, torch.tensor(False))
    ema.update(model, 8, torch.tensor(False))
    assert torch.equal(pe.shadows[0]["net.0.weight"], start["net.0.weight"])
    assert torch.equal(ema.shadow["net.0.weight"], start["net.0.weight"])
    pe.update(model, torch.tensor(True))
    ema.update(model, 8, torch.tensor(True))  # warm-up: the first update taken copies the weights too
    for avg in (pe.shadows[0]["net.0.weight"], ema.shadow["net.0.weight"]):
        torch.testing.assert_close(avg, model.net[0].weight.detach(), rtol=1e-6, atol=1e-7)
    assert pe.steps == 1 and ema.samples_seen == 8


def test_a_checkpoint_of_the_unfused_adamw_resumes(tmp_path, monkeypatch):
    """Runs saved before the fused AdamW (param groups with fused=None) resume and keep their optimizer."""
    with monkeypatch.context() as m:
        m.setattr(L, "_optimizer", lambda model, cfg: torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                                                         weight_decay=cfg.weight_decay))
        L.train(tiny(tmp_path / "run", steps=4, checkpoint_every=4), progress=False)
    where = StepOf(monkeypatch)
    nan_at(monkeypatch, where, {5})
    L.train(tiny(tmp_path / "run", steps=8, checkpoint_every=4, resume=True), progress=False)
    tensors, state = checkpoint.load(tmp_path / "run")
    opt = checkpoint.optimizer_from_tensors(tensors["optimizer"], state["optimizer"])
    assert state["step"] == 8 and opt["param_groups"][0]["fused"] is None
    assert float(tensors["ema"][SAMPLES_SEEN_KEY]) == 7 * 32  # the bad step 5 was skipped there too


# ------------------------------------------------------------------ the model's hot path: denoise and labels
from unifusion import parametrizations as PZ  # noqa: E402
from unifusion import processes as P  # noqa: E402
from unifusion.models.conditioning import ClassConditioning  # noqa: E402

PAIRS = [(proc, param) for proc in (P.Flow(), P.VP(), P.DDPM("linear"), P.EDM())
         for param in (PZ.Eps(), PZ.X0(), PZ.V(), PZ.Velocity(), PZ.EDMPrecond(0.5))]


class RowNet(nn.Module):
    """A network whose row i depends on row i only, in float64: F = tanh(W x + c_noise)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

    def forward(self, x, c_noise):
        return torch.tanh(x @ self.w + c_noise[:, None])


def branch_denoise(net, process, param, x, sigma):
    """denoise as it was with a host read: the whole batch at sigma = inf (the limit), or the formula."""
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    if torch.isinf(sigma).any():
        skip, out = param.at_infinity()
        t_top = param.c_noise(torch.full_like(sigma, float("inf"), dtype=torch.float64), process)
        assert torch.isfinite(t_top).all()
        return skip * x + out * net(x, t_top.to(x.dtype)).to(x.dtype)
    F = net(PZ._bc(param.c_in(sigma, process), x) * x, param.c_noise(sigma, process).to(x.dtype))
    return param.to_denoised(F.to(x.dtype), x, sigma)


def _has_limit(process, param):
    try:
        PZ.limit_at_infinity(param, process)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("process, param", PAIRS, ids=[f"{a.name}-{b.name}" for a, b in PAIRS])
def test_denoise_equals_the_branching_code_bit_for_bit(process, param):
    """Finite rows exactly as before; rows at inf get the limit (also mixed with finite rows in one batch);
    where no limit exists, limit_at_infinity raises the explanation and inf rows come out non-finite."""
    net, g = RowNet(), torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 2.5, 10.0, 60.0], dtype=torch.float64)
    assert torch.equal(PZ.denoise(net, process, param, x, sigma), branch_denoise(net, process, param, x, sigma))
    inf = torch.full((6,), math.inf, dtype=torch.float64)
    if not _has_limit(process, param):
        with pytest.raises(ValueError, match="sample from a finite sigma_max"):
            PZ.limit_at_infinity(param, process)
        assert torch.isnan(PZ.denoise(net, process, param, x, inf)).all()
        return
    at_inf = PZ.denoise(net, process, param, x, inf)
    assert torch.equal(at_inf, branch_denoise(net, process, param, x, inf))
    mixed = torch.where(torch.arange(6) % 2 == 0, sigma, inf)
    want = torch.where((torch.arange(6) % 2 == 0)[:, None], branch_denoise(net, process, param, x, sigma), at_inf)
    assert torch.equal(PZ.denoise(net, process, param, x, mixed), want)


class _Reads:
    def __init__(self, monkeypatch):
        self.n = 0
        for name in HostReads.NAMES:
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, **k):
                self.n += 1
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, spy)


def test_denoise_and_class_labels_read_nothing_after_the_first_call(monkeypatch):
    net, cond = RowNet(), ClassConditioning(4, 3, drop=0.0)
    x, sigma = torch.randn(5, 3, dtype=torch.float64), torch.tensor([math.inf, 1.0, 2.0, math.inf, 0.5])
    y = torch.tensor([0, 1, 2, 3, 4])
    flow, velocity, edm = P.Flow(), PZ.Velocity(), PZ.EDMPrecond()
    PZ.denoise(net, flow, velocity, x, sigma)  # the (param, process) limit is computed once (a CPU tensor read)
    cond.net_kwargs({"y": y}, 5)  # the labels' one range check
    reads = _Reads(monkeypatch)
    for _ in range(3):
        PZ.denoise(net, flow, velocity, x, sigma)
        PZ.denoise(net, flow, edm, x, sigma)  # (no limit: nothing to compute)
        cond.net_kwargs({"y": y}, 5)
    assert reads.n == 0


def test_class_labels_are_range_checked_once_then_poisoned_on_the_device():
    cond = ClassConditioning(4, 3, drop=0.0)
    with pytest.raises(ValueError, match=r"must lie in 0..3 \(4 is the null label\), got 0..5"):
        cond.net_kwargs({"y": torch.tensor([0, 5, 1])}, 3)
    cond.net_kwargs({"y": torch.tensor([0, 1, 4])}, 3)  # the null label 4 is valid
    emb = cond.net_kwargs({"y": torch.tensor([2, -1, 4, 7])}, 4)["emb"]  # after the first call: no read
    assert torch.equal(emb[[0, 2]], cond.table.weight[[2, 4]])
    assert torch.isnan(emb[[1, 3]]).all()
    with pytest.raises(ValueError, match="got -1..2"):  # sampling checks every call's labels once
        cond.prepare({"y": torch.tensor([2, -1])})
    assert torch.equal(cond.prepare({"y": torch.tensor([0, 4])})["y"], torch.tensor([0, 4]))
    # gradients reach only the rows of valid labels
    emb = cond.net_kwargs({"y": torch.tensor([1, 9])}, 2)["emb"]
    emb[0].sum().backward()
    assert cond.table.weight.grad[1].eq(1).all() and cond.table.weight.grad[[0, 2, 3, 4]].eq(0).all()
