"""The model layer: specs as JSON, model folders, the diffusion family's loss against the
formula, and process-aware sampling (every process samples on its own range and grid)."""
import json
import math

import pytest
import torch

from unifusion import config as C
from unifusion import data, models, processes
from unifusion.models import ModelSpec
from unifusion.training import loop as L


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def toy_spec(process="edm", param="edm", classes=0, **kw):
    cfg = C.from_dict({"data": "gmm" if classes else "moons", "network": "mlp-2d", "process": process,
                       "parametrization": param, "network_args": {"hidden": 32, "depth": 2, "emb_dim": 16},
                       "noise_density": "uniform_t" if process != "edm" else "lognormal", **kw})
    return C.model_spec(cfg, data.load(cfg.data))


# ---------------------------------------------------------------- the spec
def test_spec_round_trips_through_json_including_an_infinite_sigma_max():
    spec = toy_spec("flow", "velocity", classes=8)
    assert spec.sigma_max == math.inf and spec.num_classes == 8 and spec.shape == (2,)
    text = spec.to_json()
    assert "Infinity" not in text  # strict JSON: inf is stored as the string "inf"
    back = ModelSpec.from_dict(json.loads(text))
    assert back == spec


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(family="gan"), "family 'gan' is not registered.*register"),
    (lambda d: d["network"]["kwargs"].update(widht=3), "no argument.*widht"),
    (lambda d: d["process"]["kwargs"].update(sigma_maxx=3), "sigma_maxx"),
    (lambda d: d.update(colour="red"), "unknown spec field.*colour"),
    (lambda d: d["data"].update(kind="latent"), "latent"),
    (lambda d: d.update(sigma_min=5.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
])
def test_bad_specs_get_one_clear_error(edit, match):
    d = json.loads(toy_spec().to_json())
    edit(d)
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_dict(d)


def test_process_arguments_come_from_the_config():
    spec = toy_spec("ve", "eps", **{"process.sigma_min": 0.02, "process.sigma_max": 30})
    assert spec.process == {"name": "ve", "kwargs": {"sigma_min": 0.02, "sigma_max": 30.0}}
    assert spec.sigma_range() == (0.02, 30.0)
    ddpm = toy_spec("ddpm", "eps", noise_density="discrete", **{"process.schedule": "cosine", "process.T": 500})
    assert models.build(ddpm).process.T == 500
    sd3 = toy_spec("flow", "velocity", noise_density="logit_normal", shift=3.0)
    assert sd3.grid == {"name": "sd3", "kwargs": {"shift": 3.0}}
    assert sd3.training["noise_density"]["kwargs"]["shift"] == 3.0


# ---------------------------------------------------------------- the loss is the formula
@pytest.mark.parametrize("process, param", [("edm", "edm"), ("vp", "eps"), ("flow", "velocity"), ("ve", "v")])
def test_loss_is_weighted_denoising_error(process, param):
    torch.manual_seed(0)
    model = models.build(toy_spec(process, param, classes=8))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 2) * 2 - 1
    y = torch.arange(6) % 8
    draws = model.random(6, g)
    got = model.loss({"x0": x0, "cond": {"y": y}, **draws})
    # independently: drop labels to the null class, noise, denoise, weight
    y_used = torch.where(draws["drop"], torch.full_like(y, 8), y)
    sigma = draws["sigma"].float()
    D = model.denoise(x0 + sigma[:, None] * draws["noise"], sigma, y=y_used)
    want = model.param.loss_weight(sigma) * (D - x0).pow(2).mean(1)
    torch.testing.assert_close(got, want.float())


def test_noise_from_the_batch_wins_over_fresh_draws():
    model = models.build(toy_spec("flow", "velocity"))
    x0, noise = torch.zeros(4, 2), torch.randn(4, 2)
    sigma = torch.full((4,), 0.5, dtype=torch.float64)
    a = model.loss({"x0": x0, "noise": noise, "sigma": sigma}, torch.Generator().manual_seed(0))
    b = model.loss({"x0": x0, "noise": noise, "sigma": sigma}, torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b)


def test_conditional_model_needs_labels_in_the_batch():
    model = models.build(toy_spec(classes=8))
    with pytest.raises(ValueError, match="no 'cond'"):
        model.loss({"x0": torch.zeros(2, 2)})


# ---------------------------------------------------------------- process-aware sampling
PROCESS_RUNS = [  # (process, parametrization, density, config extras, expected first sigma)
    ("edm", "edm", "lognormal", {}, 80.0),
    ("ve", "eps", "uniform_t", {"process.sigma_min": 0.01, "process.sigma_max": 50}, 50.0),
    ("vp", "eps", "uniform_t", {}, float(processes.VP().sigma(torch.tensor(1.0, dtype=torch.float64)))),
    ("subvp", "v", "uniform_t", {}, float(processes.SubVP().sigma(torch.tensor(1.0, dtype=torch.float64)))),
    ("ddpm", "eps", "discrete", {}, float(processes.DDPM().sigmas[-1])),
    ("flow", "velocity", "uniform_t", {}, math.inf),
]


@pytest.mark.parametrize("process, param, density, extra, top", PROCESS_RUNS, ids=[r[0] for r in PROCESS_RUNS])
def test_each_process_trains_and_samples_on_its_own_range(tmp_path, process, param, density, extra, top):
    cfg = C.from_dict({"data": "moons", "network": "mlp-2d", "process": process, "parametrization": param,
                       "noise_density": density, "steps": 3, "batch_size": 16, "sample_every": 0, "log_every": 1,
                       "checkpoint_every": 3, "sample_nfe": 4, "warmup_steps": 1, "out": str(tmp_path / "r"),
                       "network_args": {"hidden": 32, "depth": 2, "emb_dim": 16}, **extra})
    L.train(cfg, progress=False)
    model = models.load(tmp_path / "r" / "model")
    seen = []
    real = model.denoise

    def spy(x, sigma, **cond):
        seen.append((float(sigma[0]), x.abs().max().item()))
        return real(x, sigma, **cond)
    model.denoise = spy
    x = model.sample(seeds=range(8), sampler="euler", nfe=6)
    lo, hi = model.spec.sigma_range()
    assert hi == pytest.approx(top, rel=1e-9)
    assert seen[0][0] == pytest.approx(top, rel=1e-6)  # the solvers pass sigma in the sample dtype
    if math.isinf(top):
        assert seen[0][1] < 10  # at sigma = inf the network sees the unit noise itself (t = 1)
    assert min(s for s, _ in seen) == pytest.approx(lo, rel=1e-6) or min(s for s, _ in seen) >= lo
    assert len(seen) <= 6 and x.shape == (8, 2) and torch.isfinite(x).all()


def test_a_flow_model_starts_from_pure_noise():
    """euler with 1 NFE from t = 1 is D(inf) = -F(n, 1) + n, the network read at t = 1 on the noise."""
    torch.manual_seed(0)
    model = models.build(toy_spec("flow", "velocity")).eval()
    n = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = model.sample(noise=n, sampler="euler", nfe=1)
        want = n - model.net(n, torch.ones(5))
    torch.testing.assert_close(x, want.clamp(-1, 1))


# ---------------------------------------------------------------- model folders
def test_model_folder_round_trip_and_mismatched_weights(tmp_path):
    torch.manual_seed(0)
    model = models.build(toy_spec(classes=8)).eval()
    models.save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["spec.json", "weights.safetensors"]
    back = models.load(tmp_path / "m")
    a = model.sample(seeds=[1, 2, 3], sampler="heun", nfe=5)
    b = back.sample(seeds=[1, 2, 3], sampler="heun", nfe=5)
    torch.testing.assert_close(a, b)
    # the spec of a wider network with these weights: one line naming the difference
    d = json.loads((tmp_path / "m" / "spec.json").read_text())
    d["network"]["kwargs"]["hidden"] = 48
    (tmp_path / "m" / "spec.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="do not fit the network.*of another shape"):
        models.load(tmp_path / "m")
    (tmp_path / "m" / "spec.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load(tmp_path / "m")


def test_unconditional_models_refuse_guidance_and_labels():
    model = models.build(toy_spec())
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(n=2, cfg=2.0, nfe=2)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(n=2, cond={"y": torch.zeros(2, dtype=torch.long)}, nfe=2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        model.sample(n=0, nfe=2)


def test_a_dit_model_with_its_ema_round_trips(tmp_path):
    """The EMA also tracks DiT's non-persistent position codes; a model folder must still load."""
    from unifusion import networks
    from unifusion.training.ema import EMA
    spec = ModelSpec(network=networks.describe("dit-s2", input_size=8, in_channels=1, hidden_size=32, depth=1,
                                               num_heads=2),
                     conditioning={"kind": "class", "num_classes": 3, "drop": 0.1},
                     data={"kind": "pixel", "shape": [1, 8, 8], "range": [-1.0, 1.0]}).validate()
    torch.manual_seed(0)
    model = models.build(spec)
    ema = EMA(model, 100.0)
    assert any(k.endswith("pos") for k in ema.state_dict())  # the case this test is about
    models.save(model, tmp_path / "m", ema.state_dict())
    back = models.load(tmp_path / "m")
    assert back.info["weights"] == "ema"
    torch.testing.assert_close(back.sample(seeds=[0, 1], nfe=3), model.eval().sample(seeds=[0, 1], nfe=3))
