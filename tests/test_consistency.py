"""Consistency models' sampling side: the consistency parametrization's boundary condition, the
multistep consistency sampler (against an exact mixture oracle and its exact consistency
function), the consistency grid, and the too-many-steps error through a model and the CLI."""
import math

import pytest
import torch

import unifusion as uf
from tests.oracles import Counting, mixture_2d, noise
from unifusion import cli, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion import parametrizations as PZ
from unifusion import processes as P
from unifusion.samplers import get, grids

pytestmark = pytest.mark.usefixtures("one_thread")
SMIN, SD = 0.002, 0.5


# ------------------------------------------------------------------ the parametrization
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_boundary_condition_holds_exactly_for_any_network(dtype):
    """c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly, so f(x, sigma_min) = x whatever F is."""
    p = PZ.get("consistency", sigma_data=SD, sigma_min=SMIN)
    s = torch.full((5,), SMIN, dtype=dtype)
    assert torch.equal(p.c_skip(s), torch.ones_like(s)) and torch.equal(p.c_out(s), torch.zeros_like(s))
    def net(x, c_noise):  # any output at all
        return torch.randn_like(x) * 1e3
    x = torch.randn(5, 3, dtype=dtype)
    assert torch.equal(PZ.denoise(net, P.EDM(), p, x, s), x)
    # away from the boundary: Song et al. 2023, Appendix C, written out; EDM's c_in and c_noise
    s = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(p.c_skip(s), SD**2 / ((s - SMIN) ** 2 + SD**2))
    torch.testing.assert_close(p.c_out(s), (s - SMIN) * SD / torch.sqrt(s**2 + SD**2))
    edm = PZ.EDMPrecond(SD)
    torch.testing.assert_close(p.c_in(s, P.EDM()), edm.c_in(s, P.EDM()))
    torch.testing.assert_close(p.c_noise(s, P.EDM()), edm.c_noise(s, P.EDM()))
    # far above sigma_min it is EDM's preconditioning (the shift is O(sigma_min / sigma))
    assert float((p.c_out(s[-1:]) / edm.c_out(s[-1:]) - 1).abs()) < SMIN / 80 * 2
    with pytest.raises(ValueError, match="sigma = inf"):
        p.at_infinity()
    assert PZ.get("consistency", **p.kwargs()).kwargs() == {"sigma_data": SD, "sigma_min": SMIN}


def test_exact_F_of_the_consistency_parametrization_gives_D():
    """to_denoised and from_denoised invert each other above sigma_min (the F-target is finite there)."""
    p = PZ.get("consistency")
    g = torch.Generator().manual_seed(0)
    x, D = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    s = torch.exp(torch.linspace(-5, 4, 8, dtype=torch.float64))
    torch.testing.assert_close(p.to_denoised(p.from_denoised(D, x, s), x, s), D)


# ------------------------------------------------------------------ the sampler
def test_one_step_is_one_denoiser_call_from_the_noise():
    gm = mixture_2d()
    D = Counting(gm.denoise)
    z = noise(16, 2)
    x = uf.sample(D, z, "consistency", nfe=1, generator=torch.Generator().manual_seed(0))
    assert D.calls == 1
    torch.testing.assert_close(x, gm.denoise(z, torch.full((16,), 80.0, dtype=torch.float64)))


@pytest.mark.parametrize("nfe", [1, 2, 3, 7])
@pytest.mark.parametrize("floor", [0.0, SMIN])
def test_each_level_renoises_the_last_output_with_fresh_noise(nfe, floor):
    """Algorithm 1 step by step: the input at level s_i is the previous output plus
    sqrt(s_i^2 - eps^2) times the generator's next normal draw; NFE k = k levels of the grid."""
    gm = mixture_2d()
    seen = []

    def f(x, sigma):
        seen.append((x.clone(), float(sigma[0])))
        return gm.denoise(x, sigma)
    z = noise(6, 2, seed=4)
    out = uf.sample(f, z, "consistency", nfe=nfe, generator=torch.Generator().manual_seed(7), sigma_floor=floor)
    levels = grids.karras(nfe, 0.002, 80.0).tolist()
    assert [s for _, s in seen] == levels
    g, x = torch.Generator().manual_seed(7), None
    for i, (x_in, s) in enumerate(seen):
        want = z if i == 0 else x + torch.randn(x.shape, generator=g, dtype=x.dtype) * math.sqrt(s * s - floor**2)
        torch.testing.assert_close(x_in, want, rtol=0, atol=0)
        x = gm.denoise(x_in, torch.full((6,), s, dtype=torch.float64))
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_from_pure_noise_the_first_level_is_the_first_step():
    """sigma_max = inf (a flow grid): uf.sample's first step, then one call per remaining level."""
    gm = mixture_2d()
    D = Counting(gm.denoise)
    uf.sample(D, noise(4, 2, sigma_max=1.0), "consistency", nfe=3, sigma_max=math.inf, grid="uniform_t",
              process=P.Flow(), generator=torch.Generator().manual_seed(0))
    assert D.calls == 3


def test_with_the_exact_consistency_function_it_samples_the_data():
    """f(x, s) = the PF-ODE solved from (x, s) to 0 (the mixture's exact consistency function):
    one step is an exact sample, and so is every renoise-and-map step (x + s z ~ p_s when x ~ p_0).
    A plain denoiser E[x0 | x] in its place does not reach the data at 2 levels (negative control)."""
    gm = mixture_2d()
    n = 400

    def f(x, sigma):
        return gm.pf_ode(x, float(sigma[0]), 0.0, tol=1e-8)

    def energy(a, b):
        return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
    exact = gm.sample(n, torch.Generator().manual_seed(1))[0]
    null = max(energy(gm.sample(n, torch.Generator().manual_seed(10 + i))[0],
                      gm.sample(n, torch.Generator().manual_seed(20 + i))[0]) for i in range(6))
    z = noise(n, 2, seed=3)
    for nfe in (1, 2):
        out = uf.sample(f, z, "consistency", nfe=nfe, grid=torch.tensor([80.0, 1.5][:nfe]),
                        generator=torch.Generator().manual_seed(2))
        assert energy(out, exact) < 3 * null, (nfe, energy(out, exact), null)
    plain = uf.sample(gm.denoise, z, "consistency", nfe=2, grid=torch.tensor([80.0, 1.5]),
                      generator=torch.Generator().manual_seed(2))
    assert energy(plain, exact) > 3 * null


def test_the_sampler_is_registered_as_stochastic_with_one_call_per_level():
    spec = get("consistency")
    assert spec.stochastic and not spec.adaptive and spec.order == 0
    assert [spec.cost(k, spec.defaults) for k in (1, 2, 5)] == [1, 2, 5]
    assert "consistency" in uf.samplers.names()


# ------------------------------------------------------------------ the grid
def test_consistency_grid_picks_levels_of_the_training_discretisation():
    N = 18
    full = grids.karras(N, SMIN, 80.0, 7.0)
    for k in (1, 2, 5, N - 1):
        g = grids.consistency(k, SMIN, 80.0, steps=N)
        idx = [round(i * (N - 1) / k) for i in range(k)]  # round(linspace(0, N - 1, k + 1))[:-1]
        assert len(g) == k and float(g[0]) == 80.0
        torch.testing.assert_close(g, full[torch.tensor(idx)], rtol=0, atol=0)
        assert float(g[-1]) > SMIN  # never the boundary level, where f is the identity
    torch.testing.assert_close(grids.consistency(N - 1, SMIN, 80.0, steps=N), full[:-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="discretisation has 17 steps; ask for at most 17"):
        grids.consistency(N, SMIN, 80.0, steps=N)
    with pytest.raises(ValueError, match="needs steps=N"):
        grids.consistency(2, SMIN, 80.0)


def test_levels_grid_picks_a_students_own_levels():
    lv = [math.inf, 3.0, 1.0, 0.3]
    torch.testing.assert_close(grids.levels(4, SMIN, math.inf, lv), torch.tensor(lv, dtype=torch.float64))
    torch.testing.assert_close(grids.levels(2, SMIN, math.inf, ["inf", 3.0, 1.0, 0.3]),
                               torch.tensor([math.inf, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="distilled for 4 steps"):
        grids.levels(5, SMIN, math.inf, lv)
    with pytest.raises(ValueError, match="own sigma_max"):
        grids.levels(2, SMIN, 80.0, lv)


# ------------------------------------------------------------------ a consistency model
def test_too_many_steps_for_a_consistency_model_is_one_error(tmp_path, capsys):
    """model.sample and `unifusion sample` refuse k > N - 1 with the discretisation named; k <= N - 1
    samples with exactly k calls, by default its own sampler and NFE."""
    src = datasets.load("moons")
    cfg = C.from_dict({"data": "moons", "network": "mlp-2d", "network_args": {"hidden": 16, "depth": 1, "emb_dim": 8},
                       "objective": "ict", "steps": 1})  # one step: the curriculum's N(0) = 11
    spec = C.model_spec(cfg, src)
    assert spec.family == "student" and spec.grid == {"name": "consistency", "kwargs": {"steps": 11, "rho": 7.0}}
    assert spec.parametrization == {"name": "consistency", "kwargs": {"sigma_data": 0.5, "sigma_min": 0.002}}
    model = models.build(spec).eval()
    with pytest.raises(ValueError, match="discretisation has 10 steps; ask for at most 10"):
        model.sample(n=2, nfe=11)
    calls = Counting(model.denoise)
    model.denoise = calls
    x = model.sample(n=3)  # its own: consistency at 2
    assert calls.calls == 2 and torch.isfinite(x).all()
    calls.calls = 0
    model.sample(n=3, nfe=10)
    assert calls.calls == 10
    del model.denoise
    folder = models.save(model, tmp_path / "cm")
    assert cli.main(["sample", "--checkpoint", str(folder), "--n", "2", "--nfe", "11", "--out",
                     str(tmp_path / "s.npz")]) == 2
    assert "discretisation has 10 steps; ask for at most 10" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", str(folder), "--n", "2", "--out", str(tmp_path / "s.npz")]) == 0
