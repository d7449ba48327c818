"""The 'fitted' sampler (samplers/fitted.py): dpmpp_3m plus per-step coefficients fitted by calibrate.

Without coefficients it is dpmpp_3m; its differentiable twin matches it with coefficients too; for a
Gaussian (a denoiser linear in x) one coefficient per step can make every step exact, and the fit
finds that; the fitted coefficients travel in the calibration file and sample() uses them."""
import math

import pytest
import torch

import unifusion as uf
from unifusion.evaluation.mixture import GaussianMixture
from unifusion.processes import Flow
from unifusion.samplers import Calibration, calibrate, grids
from unifusion.samplers.calibrate import _moments_t, solve_differentiable
from unifusion.samplers.fitted import fitted_t, step_orders
from tests.oracles import central_differences, mixture_2d, noise

pytestmark = pytest.mark.usefixtures("one_thread")


def random_coefficients(steps: int, seed: int = 0, scale: float = 0.05, order: int = 3) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, generator=g, dtype=torch.float64) * scale).tolist()
            for k in step_orders(steps, order)]


@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 10, 16, 20])
@pytest.mark.parametrize("sigma_max", [80.0, math.inf])
def test_without_coefficients_it_is_dpmpp_3m(nfe, sigma_max):
    gm = mixture_2d()
    x = noise(16, 2, sigma_max=1.0 if math.isinf(sigma_max) else sigma_max, seed=1)
    grid = "uniform_t" if math.isinf(sigma_max) else "tuned"
    kw = dict(nfe=nfe, grid=grid, sigma_max=sigma_max, process=Flow())
    assert torch.equal(uf.sample(gm.denoise, x, "fitted", **kw), uf.sample(gm.denoise, x, "dpmpp_3m", **kw))


@pytest.mark.parametrize("steps", [2, 4, 9, 16])
@pytest.mark.parametrize("order", [2, 3])
def test_the_differentiable_twin_matches_with_coefficients(steps, order):
    gm = mixture_2d()
    x = noise(8, 2, seed=3)
    sig = grids.make("tuned", steps, 0.002, 80.0)
    coef = random_coefficients(steps, seed=steps, order=order)
    want = uf.sample(gm.denoise, x, "fitted", grid=sig, coefficients=coef, order=order)
    got = solve_differentiable("fitted", gm.denoise, x, sig.clone().requires_grad_(),
                               coefficients=[torch.tensor(c, dtype=torch.float64) for c in coef], order=order)
    assert (want - got).abs().max() < 1e-10
    # and the coefficients act: the result differs from no coefficients
    assert (want - uf.sample(gm.denoise, x, "fitted", grid=sig, order=order)).abs().max() > 1e-4


def test_the_gradient_in_the_coefficients_matches_finite_differences():
    gm = mixture_2d()
    x = noise(8, 2, seed=4)
    ref = gm.pf_ode(x, 80.0, 0.0)
    sig = grids.make("tuned", 5, 0.002, 80.0)
    sizes = step_orders(5)
    theta = torch.tensor(sum(random_coefficients(5, seed=2), []), dtype=torch.float64, requires_grad=True)

    def loss(t):
        out = fitted_t(lambda x, s: gm.denoise(x, s.expand(len(x))), x, sig, moments=_moments_t,
                       coefficients=list(t.split(sizes)))
        return (out - ref).pow(2).mean()

    loss(theta).backward()
    fd = central_differences(loss, theta)
    assert (theta.grad - fd).abs().max() <= 1e-6 * fd.abs().max()


def test_step_orders_warm_start_and_lower_order_end():
    assert step_orders(5) == [1, 2, 2, 1, 3]  # like dpmpp_3m: lower near the end (n < 15), the last uses all
    assert step_orders(16) == [1, 2] + [3] * 14
    assert step_orders(5, order=2) == [1, 2, 2, 1, 2]


def gaussian(dim: int = 4) -> GaussianMixture:
    """One Gaussian with variances from 1e-4 to 1: a denoiser linear in x, stiff near sigma = 0."""
    lam = torch.logspace(-4, 0, dim, dtype=torch.float64)
    return GaussianMixture(torch.ones(1, dtype=torch.float64), torch.zeros(1, dim, dtype=torch.float64),
                           torch.diag(lam)[None])


def test_for_a_linear_denoiser_the_coefficients_remove_most_of_the_error():
    """With a denoiser linear in x every step is a linear map; a and b per step can match the exact
    map far better than the grid alone: the fit lowers the held-out error by over 10x."""
    gm = gaussian(1)
    cal = calibrate(gm.denoise, (1,), "fitted", 4, n_ref=32, n_val=64, seed=0, time_budget_s=20)
    assert cal.coefficients is not None
    assert cal.rmse_val["calibrated"] < 0.1 * cal.rmse_val["grid only"]
    assert cal.rmse_val["calibrated"] < 0.1 * cal.rmse_val["tuned"]


@pytest.fixture(scope="module")
def fitted_cal():
    torch.set_num_threads(1)
    return calibrate(mixture_2d().denoise, (2,), "fitted", 5, n_ref=256, n_val=256, seed=1, time_budget_s=10)


def test_calibration_fits_coefficients_that_help_on_held_out_noises(fitted_cal):
    cal = fitted_cal
    assert cal.coefficients is not None and "coefficients" in cal.method
    assert [len(c) for c in cal.coefficients] == step_orders(5)
    assert cal.rmse_fit["calibrated"] < cal.rmse_fit["grid only"]
    assert cal.rmse_val["calibrated"] < cal.rmse_val["tuned"]
    # sample() takes them from the calibration: the same as passing them by hand on its grid
    gm, x = mixture_2d(), noise(32, 2, seed=9)
    by_cal = uf.sample(gm.denoise, x, "fitted", grid=cal)
    by_hand = uf.sample(gm.denoise, x, "fitted", grid=cal.sigmas, coefficients=cal.coefficients)
    assert torch.equal(by_cal, by_hand)
    assert not torch.equal(by_cal, uf.sample(gm.denoise, x, "fitted", grid=cal.sigmas))


def test_coefficients_round_trip_through_json(fitted_cal, tmp_path):
    path = fitted_cal.save(tmp_path / "fitted.json")
    back = Calibration.load(path)
    assert back.coefficients == fitted_cal.coefficients
    gm, x = mixture_2d(), noise(8, 2, seed=2)
    assert torch.equal(uf.sample(gm.denoise, x, "fitted", grid=path), uf.sample(gm.denoise, x, "fitted", grid=back))


def test_bad_coefficients_are_clear_errors(fitted_cal, tmp_path):
    gm, x = mixture_2d(), noise(4, 2, seed=2)
    sig = grids.make("tuned", 5, 0.002, 80.0)
    with pytest.raises(ValueError, match="one list per step"):
        uf.sample(gm.denoise, x, "fitted", grid=sig, coefficients=[[0.0]] * 3)
    with pytest.raises(ValueError, match="step 1 needs 2 numbers"):
        uf.sample(gm.denoise, x, "fitted", grid=sig, coefficients=[[0.0], [0.0], [0.0, 0.0], [0.0], [0.0] * 3])
    with pytest.raises(ValueError, match="NaN or inf"):
        uf.sample(gm.denoise, x, "fitted", grid=sig, coefficients=[[math.nan], [0.0] * 2, [0.0] * 2, [0.0], [0.0] * 3])
    with pytest.raises(ValueError, match="not both"):
        uf.sample(gm.denoise, x, "fitted", grid=fitted_cal, coefficients=fitted_cal.coefficients)
    d = fitted_cal.to_dict()
    d["coefficients"] = d["coefficients"][:-1]
    with pytest.raises(ValueError, match="one list per step"):
        Calibration.from_dict(d)
    d = calibrate(mixture_2d().denoise, (2,), "dpmpp_2m", 3, n_ref=8, n_val=0, max_evals=2).to_dict()
    d["coefficients"] = [[0.0]] * 3
    with pytest.raises(ValueError, match="for sampler 'fitted'"):
        Calibration.from_dict(d)
    with pytest.raises(ValueError, match="fits the 'fitted' coefficients itself"):
        calibrate(mixture_2d().denoise, (2,), "fitted", 3, options={"coefficients": [[0.0]] * 3})
    with pytest.raises(ValueError, match="by gradient"):
        calibrate(mixture_2d().denoise, (2,), "fitted", 3, method="powell")
