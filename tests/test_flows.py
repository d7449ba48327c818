"""The likelihood families as models: coupling flows (flow-nice, flow-realnvp, flow-glow) and the
cnf, trained by the one loop, saved, loaded, sampled and scored like every model. The layers'
own maths (round trips, log-determinants, the Gaussian fit) is in test_invertible.py."""
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from unifusion import cli, likelihood, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion import checkpoint
from unifusion.training import loop as L

from .test_training import _cli, _torchrun, _train_args

FLOWS = ["flow-nice", "flow-realnvp", "flow-glow"]
SMALL = {"flow-nice": {"hidden": 32, "depth": 2}, "flow-realnvp": {"hidden": 16, "blocks": 1},
         "flow-glow": {"hidden": 16, "steps": 2}}


def digits_cfg(tmp_path, family, **kw):
    return C.from_dict({"data": "digits-train", "family": family, "network_args": SMALL.get(family, {}),
                        "steps": 4, "batch_size": 16, "checkpoint_every": 2, "sample_every": 0, "log_every": 1,
                        "warmup_steps": 1, "lr": 1e-3, "out": str(tmp_path / family), **kw})


@pytest.mark.parametrize("family,deq", [(f, "uniform") for f in FLOWS] + [("flow-realnvp", "variational")])
def test_a_flow_trains_saves_loads_and_its_loss_is_the_dequantized_likelihood(tmp_path, family, deq):
    res = L.train(digits_cfg(tmp_path, family, dequantization=deq), progress=False)
    model = models.load(res["model"])
    spec = model.spec
    assert (spec.family, spec.process, spec.data["levels"], model.one_pass) == (family, None, 17, True)
    assert spec.training["dequantization"] == deq
    # samples depend on their seed alone, one inverse pass
    x = model.sample(seeds=[3, 4, 5])
    torch.testing.assert_close(model.sample(seeds=[4])[0], x[1])
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    hot = model.sample(seeds=[4], temperature=1.5)
    assert not torch.allclose(hot, x[1:2])
    # the loss, per example, is the bound of likelihood.py's convention in bits/dim
    src = datasets.load("digits-test")
    batch = src.batch(list(range(6)))
    draws = model.random(6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model.loss({**batch, **draws})
    if deq == "uniform":
        y = likelihood.dequantize(batch["x0"], 17, u=draws["u"])
        expected = likelihood.bits_per_dim(model.log_likelihood(y), 64, 17)
    else:
        u, log_q = model.dequantizer(batch["x0"], draws["eps"])
        y = likelihood.dequantize(batch["x0"], 17, u=u)
        expected = likelihood.bits_per_dim(model.log_likelihood(y) - log_q, 64, 17)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert loss.shape == (6,) and torch.isfinite(loss).all()


def test_glow_actnorm_is_initialised_from_data_before_step_0_and_the_ema_starts_there(tmp_path):
    from unifusion.networks.invertible import ActNorm
    cfg = digits_cfg(tmp_path, "flow-glow", steps=2)
    L.train(cfg, progress=False)
    tensors, state = checkpoint.load(cfg.out)
    names = [n for n, m in models.build(models.ModelSpec.from_dict(state["spec"])).named_modules()
             if isinstance(m, ActNorm)]
    assert names
    for n in names:
        assert int(tensors["model"][f"{n}.initialized"]) == 1
        # the data-dependent init moved log_scale off 0, and the EMA (taken after it) holds that value
        weights, ema = tensors["model"][f"{n}.log_scale"], tensors["ema"][f"{n}.log_scale"]
        assert ema.abs().max() > 0.1
        torch.testing.assert_close(ema, weights, rtol=0, atol=0.02)


@pytest.mark.parametrize("family,deq", [("flow-glow", "uniform"), ("flow-realnvp", "variational")])
def test_a_flow_run_resumed_after_a_kill_equals_the_uninterrupted_one(tmp_path, family, deq):
    """Kill after step 3 (last checkpoint at 2): the resumed run ends with the uninterrupted run's
    weights, EMA and optimizer state exactly (dequantization draws come from (seed, step); ActNorm
    is not initialised again on resume)."""
    import shutil
    cfg = digits_cfg(tmp_path / "a", family, dequantization=deq)
    L.train(cfg, progress=False)
    a, b = tmp_path / "a" / family, tmp_path / "b" / family
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000004")
    shutil.rmtree(b / "model")
    L.train(C.from_dict({**cfg.to_dict(), "out": str(b), "resume": True}), progress=False)
    ta, tb = checkpoint.load(a)[0], checkpoint.load(b)[0]
    for group in ("model", "ema", "optimizer"):
        for k in ta[group]:
            assert torch.equal(ta[group][k], tb[group][k]), (group, k)


def test_two_ranks_equal_one_rank_for_glow(tmp_path):
    """ActNorm's data-dependent init all-reduces its statistics: 2 gloo ranks (8 examples each)
    end with the weights of 1 rank on the global batch of 16."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = dict(data="digits-train", family="flow-glow", network="auto", process="edm",
              parametrization="edm", noise_density="lognormal", batch_size=16, steps=3, checkpoint_every=3,
              **{"network.hidden": 8, "network.steps": 1, "network.num_levels": 1})
    for name, cmd in {"one": _cli("train", *_train_args(tmp_path / "one", **kw)),
                      "two": _torchrun(2, tmp_path / "two", **kw)}.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one, two = (checkpoint.load(tmp_path / n)[0]["model"] for n in ("one", "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=k)


def test_eval_scores_a_flow_in_one_pass_with_its_exact_likelihood(tmp_path, capsys):
    res = L.train(digits_cfg(tmp_path, "flow-realnvp"), progress=False)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", res["out"], "--n", "60", "--nll", "30", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    row = result["rows"][0]
    assert (row["sampler"], row["nfe"], row["grid"]) == ("inverse", 1, "-")
    assert result["nll"]["nfe"] == 1 and result["nll"]["levels"] == 17
    # the exact likelihood, by hand, with eval's dequantization draws
    model = models.load(res["model"])
    x = datasets.load("digits-test").x[:30].double()
    g = torch.Generator().manual_seed(0)
    bpd = likelihood.bits_per_dim(model.log_likelihood(likelihood.dequantize(x, 17, generator=g)), 64, 17)
    assert math.isclose(result["nll"]["bits_per_dim"], float(bpd.mean()), rel_tol=1e-5)


def test_cnf_loss_is_the_pf_ode_likelihood_and_its_gradient_is_exact(tmp_path):
    """The cnf's loss is -log p(x) of likelihood.log_likelihood (same probe) in bits/dim, and
    backpropagating through the fixed-step solve gives the derivative of that very number
    (against a central finite difference along a random direction in weight space)."""
    torch.manual_seed(0)
    cfg = C.from_dict({"data": "moons", "family": "cnf", "network": "mlp-2d", "process": "flow",
                       "parametrization": "velocity", "ode_steps": 3,
                       "network_args": {"hidden": 16, "depth": 2, "emb_dim": 8}})
    src = datasets.load("moons", n=64)
    model = models.build(C.model_spec(cfg, src)).double()
    batch = {"x0": src.x[:5].double()}
    draws = model.random(5, torch.Generator().manual_seed(0))
    batch["probe"] = draws["probe"].double()
    loss = model.loss(batch)
    lo, hi = model.spec.sigma_range()
    lp, nfe = likelihood.log_likelihood(model.denoise, batch["x0"], lo, min(hi, 1e3), divergence="hutchinson",
                                        probes=batch["probe"][None], steps=3)
    torch.testing.assert_close(loss, -lp / (2 * math.log(2)))
    assert nfe == 12
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss.sum(), params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    eps = 1e-5
    with torch.no_grad():
        def shifted(sign):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            with torch.enable_grad():
                v = model.loss(batch).sum()
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
            return v
        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(float(analytic - numeric)) < 1e-5 * max(1.0, abs(float(numeric)))


def test_cnf_trains_on_digits_and_samples_with_any_sampler(tmp_path):
    res = L.train(C.from_dict({"data": "digits-train", "family": "cnf", "process": "flow",
                               "parametrization": "velocity", "ode_steps": 2, "steps": 2, "batch_size": 8,
                               "sample_every": 0, "checkpoint_every": 2, "warmup_steps": 1,
                               "network_args": {"model_channels": 8, "attn_resolutions": []},
                               "out": str(tmp_path / "cnf")}), progress=False)
    model = models.load(res["model"])
    assert model.spec.family == "cnf" and model.spec.data["levels"] == 17 and not model.one_pass
    for sampler in ("euler", "dpmpp_2m"):
        assert model.sample(seeds=[0, 1], sampler=sampler, nfe=4).shape == (2, 1, 8, 8)


# ---------------------------------------------------------------- bad input
def _npz(tmp_path, shape, values=None):
    x = values if values is not None else np.round(np.random.default_rng(0).uniform(0, 16, (20, *shape))) / 8 - 1
    p = tmp_path / "x.npz"
    np.savez(p, x=x.astype(np.float32))
    return str(p)


def test_a_multi_scale_flow_refuses_a_size_it_cannot_halve(tmp_path):
    for family in ("flow-realnvp", "flow-glow"):
        cfg = C.from_dict({"data": _npz(tmp_path, (1, 7, 7)), "family": family, "out": str(tmp_path / "r")})
        with pytest.raises(ValueError, match=r"cannot squeeze shape \[1, 7, 7\].*divisible by [24]; use an image size"):
            models.build(C.model_spec(cfg, datasets.load(cfg.data)))


def test_flow_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="--network picks a denoiser preset"):
        C.from_dict({"family": "flow-glow", "network": "mlp-2d"})
    with pytest.raises(ValueError, match="variational is for the coupling flows"):
        C.from_dict({"family": "cnf", "dequantization": "variational"})
    cfg = C.from_dict({"data": "moons", "family": "flow-realnvp", "dequantization": "variational"})
    with pytest.raises(ValueError, match="needs discrete data"):
        C.model_spec(cfg, datasets.load("moons", n=100))


def test_data_off_the_levels_is_refused_by_the_loss_and_by_eval(tmp_path):
    model = models.build(C.model_spec(digits_cfg(tmp_path, "flow-nice"), datasets.load("digits-train")))
    with pytest.raises(ValueError, match="outside the dequantization range"):
        model.loss({"x0": torch.full((2, 1, 8, 8), 1.5)})
    with pytest.raises(ValueError, match="not on 17 levels"):
        model.loss({"x0": torch.full((2, 1, 8, 8), 0.03)})
    from unifusion.evaluation import evaluate as E
    x8 = torch.randint(0, 256, (10, 1, 8, 8)) / 255 * 2 - 1
    with pytest.raises(ValueError, match="trained on data with 17 levels"):
        E.nll(model, datasets.ArrayDataset(x8), 5)


def test_a_non_finite_log_det_is_a_skipped_bad_step(tmp_path, monkeypatch):
    """A NaN log-determinant at one step: the update is skipped and counted, training goes on."""
    from unifusion.models import flows
    real = flows.CouplingFlowModel.log_prob
    calls = {"n": 0}

    def flaky(self, x):
        out = real(self, x)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out  # call 1 is the pre-step-0 check: step 2

    monkeypatch.setattr(flows.CouplingFlowModel, "log_prob", flaky)
    res = L.train(digits_cfg(tmp_path, "flow-nice", steps=4), progress=False)
    log = [json.loads(line) for line in open(res["log"])]
    assert [r["bad_steps"] for r in log] == [0, 1, 0, 0]
    assert all(np.isfinite(r["loss"]) for r in log if not r["bad_steps"])
