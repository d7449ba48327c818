"""Calibrated grids (samplers/calibrate.py): the parametrisation, the differentiable solvers against the
registered ones, the fit on exact mixtures against held-out noises, the file, and the bad inputs."""
import json
import math

import pytest
import torch

import unifusion as uf
from unifusion.processes import Flow
from unifusion.samplers import Calibration, calibrate, get, grids
from unifusion.samplers.calibrate import (DIFFERENTIABLE, GridParam, NotDifferentiable, ReferenceNotConverged,
                                          _moments_t, solve_differentiable)
from unifusion.samplers.expint import moments
from tests.oracles import Counting, central_differences, mixture_2d, noise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    """dpmpp_2m at NFE 5 on the 2-D mixture, 256 fit and 128 held-out noises (under 1 s)."""
    torch.set_num_threads(1)
    return calibrate(mixture_2d().denoise, (2,), "dpmpp_2m", 5, n_ref=256, n_val=128, seed=1)


# ------------------------------------------------------------------ the parametrisation
@pytest.mark.parametrize("levels, float_last", [(2, True), (5, True), (5, False), (12, True)])
@pytest.mark.parametrize("sigma_max", [80.0, math.inf])
def test_every_parameter_gives_a_valid_grid(levels, float_last, sigma_max):
    param = GridParam(levels, 0.002, sigma_max, top=20.0, float_last=float_last)
    g = torch.Generator().manual_seed(0)
    for scale in (0.0, 1.0, 10.0, 1e4):  # 1e4: softmax pieces of 0 and 1, floored so levels never meet
        sig = param.sigmas(torch.randn(param.size, generator=g, dtype=torch.float64) * scale)
        grids.check(sig, sigma_max)  # strictly decreasing, positive, final 0, inf only first
        assert len(sig) == levels + 1 and sig[0] == sigma_max
        assert float(sig[-2]) >= 0.002 * (1 - 1e-12)
        if not float_last:
            assert float(sig[-2]) == pytest.approx(0.002, rel=1e-9)


def test_exponential_moments_end_for_any_step():
    """h = 0 once looped forever (a sum of zeros never drops below 1e-17 of itself)."""
    assert [float(m) for m in _moments_t(torch.tensor(0.0, dtype=torch.float64), 3)] == [0.0, 0.0, 0.0]
    for h in (1e-12, 0.5, 3.0):  # and it agrees with expint.moments
        m = _moments_t(torch.tensor(h, dtype=torch.float64), 3)
        want = moments(h, 3)
        assert all(abs(float(a) - b) <= 1e-14 * max(1.0, abs(b)) for a, b in zip(m, want))


def test_init_reproduces_the_grid():
    sig = grids.make("tuned", 7, 0.002, 80.0)
    param = GridParam(7, 0.002, 80.0)
    assert torch.allclose(param.sigmas(param.init(sig)), sig, rtol=1e-12)
    assert param.sigmas(param.init(sig))[0] == 80.0  # exactly: the noise was scaled by it


# ------------------------------------------------------------------ differentiable solvers
@pytest.mark.parametrize("name, opts", [(n, {}) for n in DIFFERENTIABLE] +
                         [("unipc", {"variant": "bh1"}), ("ipndm", {"order": 2}), ("dpmpp_3m", {"order": 2})])
@pytest.mark.parametrize("steps", [2, 4, 9, 16])  # 16: the multistep solvers keep their order at the end
def test_differentiable_solvers_match_the_registered_ones(name, opts, steps):
    gm = mixture_2d()
    x = noise(8, 2, seed=3)
    sig = grids.make("tuned", steps, 0.002, 80.0)
    want = uf.sample(gm.denoise, x, name, grid=sig, **opts)
    got = solve_differentiable(name, gm.denoise, x, sig.clone().requires_grad_(), **opts)
    assert (want - got).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_differentiable_solvers_match_from_inf(name):
    gm = mixture_2d()
    n = noise(8, 2, sigma_max=1.0, seed=3)
    sig = grids.make("uniform_t", 6, 0.002, math.inf, process=Flow())
    want = uf.sample(gm.denoise, n, name, grid=sig, sigma_max=math.inf)
    assert (want - solve_differentiable(name, gm.denoise, n, sig)).abs().max() < 1e-10


@pytest.mark.parametrize("name", sorted(set(DIFFERENTIABLE) - {"ddim"}))
def test_the_gradient_in_the_grid_matches_finite_differences(name):
    gm = mixture_2d()
    x = noise(8, 2, seed=4)
    ref = gm.pf_ode(x, 80.0, 0.0)
    param = GridParam(5, 0.002, 80.0)
    z = param.init(grids.make("tuned", 5, 0.002, 80.0)).requires_grad_(True)

    def loss(zz):
        return (solve_differentiable(name, gm.denoise, x, param.sigmas(zz)) - ref).pow(2).mean()

    loss(z).backward()
    fd = central_differences(loss, z)
    assert (z.grad - fd).abs().max() <= 1e-6 * fd.abs().max()


# ------------------------------------------------------------------ the fit
def test_calibrated_grid_is_a_valid_grid_within_the_budget(fitted):
    sig = fitted.sigmas
    steps = get("dpmpp_2m").steps_for(5)
    assert sig.dtype == torch.float64 and len(sig) == steps + 1
    grids.check(sig, 80.0)
    assert sig[0] == 80.0 and sig[-1] == 0
    D = Counting(mixture_2d().denoise)
    uf.sample(D, noise(4, 2), "dpmpp_2m", nfe=5, grid=fitted)
    assert D.calls <= 5


def test_calibrated_grid_beats_karras_and_tuned_on_held_out_noises(fitted):
    val = fitted.rmse_val
    assert set(val) == {"calibrated", "karras", "tuned"} and set(fitted.rmse_fit) == set(val)
    assert val["calibrated"] <= 0.8 * val["tuned"]
    assert val["calibrated"] <= 0.8 * val["karras"]
    assert fitted.rmse_fit["calibrated"] < min(fitted.rmse_fit["karras"], fitted.rmse_fit["tuned"])
    assert fitted.seconds["reference"] > 0 and fitted.seconds["fit"] > 0 and fitted.evaluations > 0


def test_held_out_error_is_measured_independently(fitted):
    """rmse_val['calibrated'] is what sample() with the Calibration gives on the held-out noises."""
    gm = mixture_2d()
    z = torch.randn(384, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    val = z[256:]
    err = (uf.sample(gm.denoise, val, "dpmpp_2m", nfe=5, grid=fitted) - gm.pf_ode(val, 80.0, 0.0)).pow(2).mean().sqrt()
    assert float(err) == pytest.approx(fitted.rmse_val["calibrated"], rel=1e-3)  # dopri5 vs DOP853 reference


@pytest.mark.parametrize("method", ["powell", "nelder-mead"])
def test_derivative_free_methods_improve_on_the_initial_grid(method):
    cal = calibrate(mixture_2d().denoise, (2,), "ipndm", 5, n_ref=64, n_val=0, seed=2, method=method, max_evals=150)
    assert cal.method.startswith(method) and cal.evaluations <= 150
    assert cal.rmse_fit["calibrated"] < 0.8 * cal.rmse_fit["tuned"]
    assert cal.rmse_val == {}


def test_a_non_differentiable_denoiser_falls_back_to_powell():
    gm = mixture_2d()

    def detached(x, sigma):
        return gm.denoise(x.detach(), sigma.detach())

    cal = calibrate(detached, (2,), "euler", 4, n_ref=32, n_val=0, max_evals=40)
    assert cal.method.startswith("powell (the denoiser is not differentiable)")
    with pytest.raises(NotDifferentiable, match="method='powell'"):
        calibrate(detached, (2,), "euler", 4, n_ref=32, n_val=0, method="gradient")


def test_batch_size_splits_the_work_not_the_result():
    gm = mixture_2d(classes=2)
    cond = {"y": torch.arange(40) % 2}
    kw = dict(n_ref=24, n_val=16, cond=cond, max_evals=8, method="gradient")
    whole = calibrate(gm.denoise, (2,), "dpmpp_2m", 5, **kw)
    parts = calibrate(gm.denoise, (2,), "dpmpp_2m", 5, batch_size=7, **kw)
    for key in ("karras", "tuned"):  # dopri5 steps per batch, so the references differ within its tolerance
        assert parts.rmse_val[key] == pytest.approx(whole.rmse_val[key], rel=1e-3)
    assert torch.allclose(parts.sigmas, whole.sigmas, rtol=1e-3)


def test_the_last_level_floats_or_stays(fitted):
    assert float(fitted.sigmas[-2]) > 0.01  # with 5 calls the last call at 0.002 is wasted
    pinned = calibrate(mixture_2d().denoise, (2,), "dpmpp_2m", 5, n_ref=32, n_val=0, float_last=False, max_evals=30)
    assert float(pinned.sigmas[-2]) == pytest.approx(0.002, rel=1e-9)


def test_from_karras_the_last_level_leaves_sigma_min():
    """Karras ends at sigma_min (no slack); its softmax piece starts at 2% of the span, not at 0, where its
    gradient would vanish and the last level stay at 0.002."""
    cal = calibrate(mixture_2d().denoise, (2,), "dpmpp_2m", 5, n_ref=64, n_val=0, init="karras", seed=1)
    assert float(cal.sigmas[-2]) > 0.05
    assert cal.rmse_fit["calibrated"] < 0.7 * cal.rmse_fit["karras"]


def test_several_starts_share_the_budget_and_keep_the_best():
    both = calibrate(mixture_2d().denoise, (2,), "unipc", 6, init=["tuned", "karras"], n_ref=64, n_val=0, seed=1,
                     max_evals=60)
    assert both.method.endswith("(best of 2 starts)") and both.evaluations <= 60
    assert both.rmse_fit["calibrated"] < 0.8 * min(both.rmse_fit["tuned"], both.rmse_fit["karras"])


def test_class_conditional_calibration_with_a_cond_callable():
    """Fit on labels 0 (2-class mixture), validate on labels 1: the held-out labels were never fitted."""
    gm = mixture_2d(classes=2)
    seen = []

    def cond(split, n):
        seen.append((split, n))
        return {"y": torch.full((n,), 0 if split == "fit" else 1, dtype=torch.long)}

    cal = calibrate(gm.denoise, (2,), "unipc", 6, n_ref=48, n_val=32, cond=cond, max_evals=60)
    assert sorted(seen) == [("fit", 48), ("val", 32)]
    assert set(cal.rmse_val) == {"calibrated", "karras", "tuned"}
    assert cal.rmse_fit["calibrated"] < cal.rmse_fit["tuned"]
    y = {"y": torch.ones(4, dtype=torch.long)}
    x = uf.sample(gm.denoise, noise(4, 2), "unipc", nfe=6, grid=cal, cond=y)
    assert torch.isfinite(x).all()


def test_cond_dict_needs_a_row_per_noise():
    with pytest.raises(ValueError, match="n_ref \\+ n_val = 12"):
        calibrate(mixture_2d(classes=2).denoise, (2,), "euler", 3, n_ref=8, n_val=4,
                  cond={"y": torch.zeros(8, dtype=torch.long)})


def test_calibration_from_inf():
    gm = mixture_2d()
    cal = calibrate(gm.denoise, (2,), "dpmpp_2m", 6, sigma_max=math.inf, n_ref=32, n_val=16, max_evals=40)
    assert math.isinf(cal.sigmas[0]) and len(cal.sigmas) == 7
    assert set(cal.rmse_val) == {"calibrated", "uniform_t", "sd3"}
    D = Counting(gm.denoise)
    uf.sample(D, noise(4, 2, sigma_max=1.0), "dpmpp_2m", nfe=6, sigma_max=math.inf, grid=cal)
    assert D.calls <= 6


# ------------------------------------------------------------------ the file and its checks
def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "sub" / "cal.json")
    back = Calibration.load(path)
    assert torch.equal(back.sigmas, fitted.sigmas)
    for key in ("sampler", "nfe", "sigma_min", "sigma_max", "options", "rmse_fit", "rmse_val", "seconds",
                "n_ref", "n_val", "method", "evaluations", "reference"):
        assert getattr(back, key) == getattr(fitted, key)
    d = json.loads(path.read_text())
    assert d["format"] == "unifusion.calibration" and d["version"] == 1 and d["sigmas"][-1] == 0
    gm, x = mixture_2d(), noise(8, 2)
    a = uf.sample(gm.denoise, x, "dpmpp_2m", nfe=5, grid=str(path))
    b = uf.sample(gm.denoise, x, "dpmpp_2m", nfe=5, grid=fitted.sigmas)
    assert torch.equal(a, b)
    assert torch.equal(uf.sample(gm.denoise, x, "dpmpp_2m", grid=path), b)  # nfe defaults to the file's


def test_inf_round_trips_through_json(tmp_path):
    cal = Calibration("euler", 3, torch.tensor([math.inf, 2.0, 0.1, 0.0], dtype=torch.float64), 0.002, math.inf)
    back = Calibration.load(cal.save(tmp_path / "c.json"))
    assert math.isinf(back.sigma_max) and math.isinf(back.sigmas[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="heun", nfe=5), "calibrated for dpmpp_2m at NFE 5, not heun at NFE 5; calibrate again"),
    (dict(sampler="dpmpp_2m", nfe=10), "calibrated for dpmpp_2m at NFE 5, not dpmpp_2m at NFE 10"),
    (dict(sampler="dpmpp_2m", nfe=5, sigma_max=100.0), "calibrated for sigma 80 -> 0.002"),
    (dict(sampler="dpmpp_2m", nfe=5, sigma_min=0.01), "calibrated for sigma 80 -> 0.002"),
    (dict(sampler="dpmpp_2m", steps=4), "pass nfe"),
])
def test_a_calibration_used_for_another_pair_is_an_error(fitted, tmp_path, kwargs, match):
    path = fitted.save(tmp_path / "cal.json")
    for grid in (fitted, path):
        with pytest.raises(ValueError, match=match):
            uf.sample(mixture_2d().denoise, noise(2, 2), grid=grid, **kwargs)


def test_options_must_match_too():
    cal = Calibration("unipc", 6, grids.make("tuned", 6, 0.002, 80.0), 0.002, 80.0, options={"variant": "bh1"})
    with pytest.raises(ValueError, match="variant"):
        uf.sample(mixture_2d().denoise, noise(2, 2), "unipc", nfe=6, grid=cal)
    uf.sample(mixture_2d().denoise, noise(2, 2), "unipc", nfe=6, grid=cal, variant="bh1")
    with pytest.raises(ValueError, match="calibrated for unipc at NFE 6, not unipc at NFE 7"):
        cal.grid_for("unipc", 7)


def test_files_that_are_not_calibrations(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"sampler": "euler"}')
    with pytest.raises(ValueError, match="not a unifusion calibration file"):
        Calibration.load(bad)
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not JSON"):
        Calibration.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uf.sample(mixture_2d().denoise, noise(2, 2), "euler", nfe=3, grid=str(tmp_path / "missing.json"))


def test_a_reference_that_cannot_converge_is_a_clear_error():
    fix = "reference=\\{'max_nfe': 80\\}, or a looser tolerance such as reference=\\{'rtol': 1e-05"
    with pytest.raises(ReferenceNotConverged, match="max_nfe=20 .*" + fix):
        calibrate(mixture_2d().denoise, (2,), "dpmpp_2m", 5, n_ref=8, n_val=0, reference={"max_nfe": 20})


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="ddpm"), "stochastic"),
    (dict(sampler="dopri5"), "adaptive"),
    (dict(method="adam"), "choose one of"),
    (dict(sampler="lms", method="gradient"), "use method='powell'"),
    (dict(nfe=0), "nfe must be"),
    (dict(n_ref=0), "n_ref >= 1"),
    (dict(reference={"tol": 1e-3}), "reference options"),
])
def test_bad_arguments(kwargs, match):
    args = {"sampler": "euler", "nfe": 4, "n_ref": 4, "n_val": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        calibrate(mixture_2d().denoise, (2,), args.pop("sampler"), args.pop("nfe"), **args)
