"""Samplers against the exact PF-ODE, against each other, and against the true distribution."""
import math

import pytest
import torch

import unifusion as uf
from unifusion import parametrizations as PZ
from unifusion import processes as P
from unifusion.samplers import get, grids, make_denoise, names
from tests.oracles import Counting, mixture_2d, noise

DETERMINISTIC = [n for n in names() if not get(n).stochastic and not get(n).adaptive]
STOCHASTIC = [n for n in names() if get(n).stochastic]


# ------------------------------------------------------------------ the public contract
def test_names_cover_the_issue_list():
    want = {"euler", "heun", "ddim", "ddpm", "euler_ancestral", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s",
            "dpmpp_2m_sde", "unipc", "lms", "ipndm", "euler_maruyama", "pc", "annealed_langevin", "dopri5"}
    assert want <= set(names())


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="dpm_fast"), "choose one of"),
    (dict(nfe=0), "nfe must be an integer >= 1"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(nfe=5, steps=5), "not both"),
    (dict(sigma_min=1.0, sigma_max=1.0), "sigma_min < sigma_max"),
    (dict(sigma_min=-1.0), "sigma_min < sigma_max"),
    (dict(grid="cosine"), "choose one of"),
    (dict(grid="uniform_t"), "needs process"),
    (dict(sampler="ddim", etaa=0.5), "its options are"),
])
def test_contract_errors(kwargs, match):
    gm = mixture_2d()
    with pytest.raises(ValueError, match=match):
        uf.sample(gm.denoise, noise(4, 2), **kwargs)


def test_unknown_sampler_error_names_valid_choices():
    with pytest.raises(ValueError) as e:
        uf.sample(mixture_2d().denoise, noise(2, 2), sampler="nope")
    for n in names():
        assert n in str(e.value)


@pytest.mark.filterwarnings("ignore:dopri5 stopped")
@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("nfe", [1, 2, 5, 8, 13])
def test_nfe_is_a_budget(name, nfe):
    gm = mixture_2d()
    D = Counting(gm.denoise)
    spec = get(name)
    if not spec.adaptive and spec.cost(1, spec.defaults) > nfe:
        with pytest.raises(ValueError, match=f"needs nfe >= {spec.cost(1, spec.defaults)}"):
            uf.sample(D, noise(8, 2), name, nfe=nfe)
        return
    opts = {"allow_partial": True} if spec.adaptive else {}  # tiny budgets stop an adaptive solve early
    x = uf.sample(D, noise(8, 2), name, nfe=nfe, generator=torch.Generator().manual_seed(0), **opts)
    assert 1 <= D.calls <= nfe
    assert torch.isfinite(x).all()
    if get(name).adaptive or nfe < 5:
        return
    # the sampler spends most of its budget (at most one call lost to its step structure)
    assert D.calls >= nfe - (get(name).cost(2, get(name).defaults) - get(name).cost(1, get(name).defaults))


def test_explicit_grid_must_fit_the_budget():
    gm = mixture_2d()
    sig = torch.tensor([80.0, 10.0, 1.0, 0.1])
    D = Counting(gm.denoise)
    uf.sample(D, noise(2, 2), "heun", grid=sig)
    assert D.calls == 2 * 4 - 1  # zero appended: 4 steps
    with pytest.raises(ValueError, match="over nfe=5"):
        uf.sample(gm.denoise, noise(2, 2), "heun", grid=sig, nfe=5)


def test_denoiser_sees_sigma_of_shape_batch_and_cond():
    seen = []

    def D(x, sigma, y=None):
        seen.append((sigma.shape, y))
        return x * 0
    uf.sample(D, noise(3, 2), "euler", nfe=2, cond={"y": "label"})
    assert seen == [(torch.Size([3]), "label")] * 2


# ------------------------------------------------------------------ equivalences
def test_ddim_eta0_equals_euler():
    gm = mixture_2d()
    a = uf.sample(gm.denoise, noise(16, 2), "ddim", nfe=12)
    b = uf.sample(gm.denoise, noise(16, 2), "euler", nfe=12)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("other", ["ddpm", "euler_ancestral"])
def test_ddim_eta1_equals_ancestral_samplers(other):
    gm = mixture_2d()
    a = uf.sample(gm.denoise, noise(16, 2), "ddim", nfe=12, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = uf.sample(gm.denoise, noise(16, 2), other, nfe=12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ddpm_equals_ho_et_al_in_x_t_space():
    """The paper's loop (eq. 7, posterior variance beta-tilde) in x_t, with the exact x0 prediction,
    against unifusion's sigma-domain ddpm on all 1000 timesteps."""
    gm, proc = mixture_2d(), P.DDPM("linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas, abar = 1 - betas, torch.cumprod(1 - betas, 0)
    x = noise(8, 2, sigma_max=1.0)  # x_T
    start = x / math.sqrt(abar[-1])  # the same point in the sigma-domain
    g = torch.Generator().manual_seed(3)
    for t in range(999, -1, -1):
        sig = torch.full((8,), math.sqrt((1 - abar[t]) / abar[t]), dtype=torch.float64)
        x0 = gm.denoise(x / math.sqrt(abar[t]), sig)
        abar_prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        mean = (abar_prev.sqrt() * betas[t] / (1 - abar[t])) * x0 + (alphas[t].sqrt() * (1 - abar_prev) / (1 - abar[t])) * x
        var = (1 - abar_prev) / (1 - abar[t]) * betas[t]
        x = mean + (var.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64) if t > 0 else 0)
    ours = uf.sample(gm.denoise, start, "ddpm", steps=1000, grid="ddpm", process=proc,
                     sigma_min=float(proc.sigmas[0]), sigma_max=float(proc.sigmas[-1]),
                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, x, rtol=1e-8, atol=1e-8)


def test_flow_matching_euler_equals_ddim_under_the_time_map():
    """Euler in flow time t on x_t with the exact velocity u = E[n - x0 | x_t] is DDIM/Euler in sigma."""
    gm, fl = mixture_2d(), P.Flow()
    t = torch.linspace(0.98, 0.0, 13, dtype=torch.float64)
    x_t = noise(8, 2, sigma_max=1.0)
    start = x_t / (1 - t[0])
    for t0, t1 in zip(t[:-1], t[1:]):
        sig = torch.full((8,), float(fl.sigma(t0)), dtype=torch.float64)
        x = x_t / fl.s(t0)
        u = gm.eps(x, sig) - gm.denoise(x, sig)
        x_t = x_t + (t1 - t0) * u
    sigmas = fl.sigma(t[:-1])
    ours = uf.sample(gm.denoise, start, "ddim", grid=sigmas)
    torch.testing.assert_close(ours, x_t, rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_sde_eta0_is_the_ode_solver():
    gm = mixture_2d()
    ode = uf.sample(gm.denoise, noise(8, 2), "dpmpp_2m", nfe=10)
    sde = uf.sample(gm.denoise, noise(8, 2), "dpmpp_2m_sde", nfe=10, eta=0.0)
    torch.testing.assert_close(ode, sde, rtol=1e-10, atol=1e-10)


def test_first_order_steps_agree_with_ddim_per_step():
    """With one step to a nonzero level, every exponential integrator is DDIM (DPM-Solver++(1))."""
    gm = mixture_2d()
    sig = torch.tensor([20.0, 5.0], dtype=torch.float64)
    den = make_denoise(gm.denoise, 8)
    ref = get("ddim").fn(den, noise(8, 2, 20.0), sig.tolist())
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        torch.testing.assert_close(get(name).fn(den, noise(8, 2, 20.0), sig.tolist()), ref)


# ------------------------------------------------------------------ convergence orders
SIG_A, SIG_B = 80.0, 0.05


@pytest.fixture(scope="module")
def order_problem():
    gm = mixture_2d()
    x = noise(16, 2, SIG_A, seed=7)
    return gm, x, gm.pf_ode(x, SIG_A, SIG_B)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_observed_order_matches_theory(name, order_problem):
    """Grid without the final 0, so the error is the ODE solver's alone. Starting at sigma=80, where
    D barely changes, keeps the multistep methods' low-order warm start from masking their order."""
    gm, x, ref = order_problem
    den = make_denoise(gm.denoise, x.shape[0])
    errs = []
    for n in (64, 128, 256):
        sig = grids.karras(n + 1, SIG_B, SIG_A).tolist()
        errs.append(float(((get(name).fn(den, x.clone(), sig) - ref) ** 2).mean().sqrt()))
    observed = [math.log2(errs[0] / errs[1]), math.log2(errs[1] / errs[2])]
    want = get(name).order
    assert all(abs(o - want) < 0.4 for o in observed), (name, errs, observed, want)


def test_unipc_variants_differ_but_share_the_order(order_problem):
    gm, x, ref = order_problem
    den = make_denoise(gm.denoise, 16)
    sig = grids.karras(17, SIG_B, SIG_A).tolist()
    a = get("unipc").fn(den, x.clone(), sig, variant="bh1")
    b = get("unipc").fn(den, x.clone(), sig, variant="bh2")
    assert float((a - b).abs().max()) > 1e-6


def test_dopri5_meets_its_tolerance(order_problem):
    gm, x, ref = order_problem
    for tol in (1e-4, 1e-7):
        D = Counting(gm.denoise)
        out = get("dopri5").fn(make_denoise(D, 16), x.clone(), [SIG_A, SIG_B], rtol=tol, atol=tol)
        err = float(((out - ref) ** 2).mean().sqrt())
        assert err < 50 * tol, (tol, err, D.calls)


def test_dopri5_out_of_budget_is_an_error_unless_partial_is_allowed():
    gm = mixture_2d()
    with pytest.raises(RuntimeError, match="max_nfe=15 reached.*allow_partial=True"):
        uf.sample(gm.denoise, noise(4, 2), "dopri5", nfe=15, rtol=1e-8, atol=1e-8)
    D = Counting(gm.denoise)
    with pytest.warns(UserWarning, match="max_nfe=15 reached"):
        uf.sample(D, noise(4, 2), "dopri5", nfe=15, rtol=1e-8, atol=1e-8, allow_partial=True)
    assert D.calls <= 15
    # a budget below one step (7 calls) plus the denoising step fails before any call
    D = Counting(gm.denoise)
    with pytest.raises(ValueError, match="needs nfe >= 8"):
        uf.sample(D, noise(4, 2), "dopri5", nfe=7)
    assert D.calls == 0


def test_dopri5_without_nfe_solves_to_its_tolerance():
    gm = mixture_2d()
    x = noise(8, 2, seed=2)
    ref = gm.pf_ode(x, 80.0, 0.0)
    D = Counting(gm.denoise)
    out = uf.sample(D, x, "dopri5", rtol=1e-6, atol=1e-6)
    assert D.calls > 10 and float((out - ref).abs().max()) < 1e-3


def test_accuracy_improves_with_nfe_for_every_deterministic_sampler():
    gm = mixture_2d()
    x = noise(32, 2, seed=1)
    ref = gm.pf_ode(x, 80.0, 0.0)
    for name in DETERMINISTIC:
        e = [float(((uf.sample(gm.denoise, x, name, nfe=n) - ref) ** 2).mean().sqrt()) for n in (10, 40, 160)]
        assert e[2] < e[1] < e[0], (name, e)
        assert e[2] < 2e-2, (name, e)


# ------------------------------------------------------------------ stochastic samplers
def energy_distance(a, b):
    """Szekely & Rizzo's energy distance between two samples (0 iff equal distributions)."""
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


@pytest.fixture(scope="module")
def null_energy():
    """Energy distances between independent exact samples of the same size: the statistic's null."""
    gm = mixture_2d()
    vals = [energy_distance(gm.sample(1500, torch.Generator().manual_seed(100 + i))[0],
                            gm.sample(1500, torch.Generator().manual_seed(200 + i))[0]) for i in range(8)]
    return max(vals)


STOCH_NFE = {"annealed_langevin": 601, "pc": 400}


# consistency sampling reaches the data only with a consistency function, not with E[x0 | x]
# (tests/test_consistency.py checks it with the mixture's exact one)
@pytest.mark.parametrize("name", [n for n in STOCHASTIC if n != "consistency"] + ["heun_churn"])
def test_stochastic_samplers_reach_the_true_distribution(name, null_energy):
    """Tolerance: 3x the largest of 8 null draws (exact sample vs exact sample, n = 1500 each)."""
    gm = mixture_2d()
    exact = gm.sample(1500, torch.Generator().manual_seed(1))[0]
    g = torch.Generator().manual_seed(2)
    x = noise(1500, 2, seed=3)
    if name == "heun_churn":
        out = uf.sample(gm.denoise, x, "heun", nfe=199, generator=g, s_churn=40.0)
    else:
        out = uf.sample(gm.denoise, x, name, nfe=STOCH_NFE.get(name, 200), generator=g)
    assert energy_distance(out, exact) < 3 * null_energy, (name, energy_distance(out, exact), null_energy)


def test_the_distribution_test_can_fail(null_energy):
    """Negative control: all means moved by 0.3 (components have std 0.09..0.4) is detected at the
    same tolerance."""
    gm = mixture_2d()
    exact = gm.sample(1500, torch.Generator().manual_seed(1))[0]
    moved = gm.sample(1500, torch.Generator().manual_seed(2))[0] + 0.3
    assert energy_distance(moved, exact) > 3 * null_energy
    # ... and so is a too-short run of a stochastic sampler
    few = uf.sample(gm.denoise, noise(1500, 2, seed=3), "euler_maruyama", nfe=4, generator=torch.Generator().manual_seed(2))
    assert energy_distance(few, exact) > 3 * null_energy


def test_stochastic_samplers_are_reproducible_with_a_generator():
    gm = mixture_2d()
    for name in STOCHASTIC:
        a = uf.sample(gm.denoise, noise(4, 2), name, nfe=12, generator=torch.Generator().manual_seed(9))
        b = uf.sample(gm.denoise, noise(4, 2), name, nfe=12, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ every process x parametrization x sampler
SWEEP_PROCS = [P.VE(0.002, 80.0), P.VP(), P.SubVP(), P.DDPM("linear"), P.DDPM("cosine"), P.EDM(), P.Flow()]
SWEEP_PARAMS = [PZ.Eps(), PZ.X0(), PZ.V(), PZ.Velocity(), PZ.EDMPrecond()]


@pytest.mark.parametrize("proc", SWEEP_PROCS, ids=repr)
def test_every_process_parametrization_sampler(proc):
    """A network returning the exact F through each process's inputs (x_t, t) and each
    parametrization, sampled with every sampler on the process's native grid: the result
    equals sampling the exact denoiser directly, so no process or parametrization adds error, and
    deterministic samplers land near the exact PF-ODE solution."""
    from tests.test_parametrizations import oracle_denoiser

    gm = mixture_2d()
    lo, hi = proc.sigma_range()
    s_min, s_max = max(lo, 0.002), min(hi, 80.0)
    if isinstance(proc, P.DDPM):  # start exactly on a timestep
        s_max = float(proc.sigmas[proc.sigmas <= 80.0][-1])
    x = noise(8, 2, s_max, seed=11)
    ref = gm.pf_ode(x, s_max, 0.0)
    for param in SWEEP_PARAMS:
        wrapped = oracle_denoiser(gm, proc, param)
        for name in names():
            kw = dict(nfe=400 if get(name).adaptive else 40, sigma_min=s_min, sigma_max=s_max, grid="native", process=proc)
            a = uf.sample(wrapped, x, name, generator=torch.Generator().manual_seed(0), **kw)
            b = uf.sample(gm.denoise, x, name, generator=torch.Generator().manual_seed(0), **kw)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{proc} {param} {name}")
            if not get(name).stochastic:  # sanity bound (data spread ~4): native grids at 40 calls vary a lot
                assert float(((a - ref) ** 2).mean().sqrt()) < 1.0, (proc, param, name)


@pytest.mark.parametrize("dim, seed", [(2, 0), (8, 3), (32, 4)])
def test_unipc_final_corrector_helps(dim, seed):
    """Applying the last UniC correction as D + (x_c - x) lowers the error when the last level is
    small (dD/dx ~ I there): a small but free gain on the default grid. (With the last level at
    0.05, as grids.tuned gives at NFE 20, it can hurt, so it stays opt-in.)"""
    from unifusion.evaluation.mixture import GaussianMixture
    gm = GaussianMixture.random(dim, 5, seed=seed)
    x = noise(64, dim, seed=1)
    ref = gm.pf_ode(x, 80.0, 0.0)
    for nfe in (10, 20, 40):
        e = [float(((uf.sample(gm.denoise, x, "unipc", nfe=nfe, final_corrector=f) - ref) ** 2).mean().sqrt())
             for f in (False, True)]
        assert e[1] < e[0], (dim, nfe, e)


# ------------------------------------------------------------------ starting from pure noise, sigma_max = inf
INF = math.inf


def test_mixture_denoiser_at_inf_is_the_mean():
    """The oracle's convention at sigma = inf: x is the unit direction n and D = E[x_0] (E[x_0 | y]),
    the limit of D(s n, s) as s grows (its distance to it is O(1/s))."""
    gm = mixture_2d(classes=2)
    n = noise(5, 2, sigma_max=1.0, seed=4)
    mean = sum(w * mu for w, mu in zip(gm.weights, gm.means))
    torch.testing.assert_close(gm.denoise(n, torch.full((5,), INF)), mean.expand(5, 2))
    torch.testing.assert_close(gm.denoise(n * 1e8, torch.full((5,), 1e8)), mean.expand(5, 2), rtol=0, atol=1e-6)
    y = torch.tensor([0, 1, 1, 0, 1])
    for c in (0, 1):
        k = gm.labels == c
        class_mean = (gm.weights[k, None] * gm.means[k]).sum(0) / gm.weights[k].sum()
        got = gm.denoise(n, torch.full((5,), INF), y)[y == c]
        torch.testing.assert_close(got, class_mean.expand_as(got))


def test_euler_from_inf_with_one_call_returns_the_mean():
    gm = mixture_2d()
    D = Counting(gm.denoise)
    x = uf.sample(D, noise(6, 2, sigma_max=1.0), "euler", nfe=1, sigma_max=INF, grid="uniform_t", process=P.Flow())
    assert D.calls == 1
    torch.testing.assert_close(x, gm.mean().expand(6, 2))


def test_first_step_from_inf_is_the_limit_of_euler_from_a_finite_level():
    """Euler from sigma_0 on x_0 = sigma_0 n, then the same grid: as sigma_0 grows it tends to the
    first step from inf, D(n, inf) + sigma_1 n (the difference is sigma_1 / sigma_0 times O(1))."""
    gm, fl = mixture_2d(), P.Flow()
    n = noise(8, 2, sigma_max=1.0, seed=5)
    grid = grids.make("uniform_t", 12, 0.002, INF, process=fl)
    ours = uf.sample(gm.denoise, n, "euler", sigma_max=INF, grid=grid)
    for name in ("euler", "ddim"):
        finite = torch.cat([torch.tensor([1e10], dtype=torch.float64), grid[1:]])
        theirs = uf.sample(gm.denoise, n * 1e10, name, grid=finite)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("grid", ["uniform_t", "sd3"])
@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2)])
def test_sampling_from_inf_converges_to_the_pf_ode(grid, name, order):
    """Against the exact PF-ODE started at sigma = 1e8 from x = 1e8 n, run to sigma_min and denoised
    there as the samplers' last step does. The median error over the points is used: a point near a
    boundary between modes has a flow map that amplifies every error, which only delays its convergence."""
    gm, fl, smin = mixture_2d(), P.Flow(), 0.002
    n = noise(16, 2, sigma_max=1.0, seed=0)
    big = 1e8
    ref = gm.denoise(gm.pf_ode(n * big, big, smin), torch.full((16,), smin, dtype=torch.float64))
    errs = []
    for steps in (128, 512):
        x = uf.sample(gm.denoise, n, name, steps=steps, sigma_min=smin, sigma_max=INF, grid=grid, process=fl)
        errs.append(float((x - ref).norm(dim=1).median()))
    observed = math.log(errs[0] / errs[1]) / math.log(4)
    assert abs(observed - order) < 0.3, (errs, observed)
    assert errs[1] < (3e-3 if order == 1 else 1e-4), errs


@pytest.mark.filterwarnings("ignore:dopri5 stopped")
@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 8, 13])
def test_nfe_is_a_budget_from_inf(name, nfe):
    """One call for the first step at inf, the rest for the solver; nfe=1 is the first step alone."""
    gm, spec = mixture_2d(), get(name)
    D = Counting(gm.denoise)
    kw = dict(nfe=nfe, sigma_max=INF, grid="uniform_t", process=P.Flow(), generator=torch.Generator().manual_seed(0))
    if spec.adaptive:
        kw["allow_partial"] = True
    elif nfe > 1 and spec.cost(1, spec.defaults) > nfe - 1:
        with pytest.raises(ValueError, match=f"needs nfe >= {spec.cost(1, spec.defaults) + 1} from sigma_max=inf"):
            uf.sample(D, noise(8, 2, sigma_max=1.0), name, **kw)
        return
    x = uf.sample(D, noise(8, 2, sigma_max=1.0), name, **kw)
    assert 1 <= D.calls <= nfe and torch.isfinite(x).all()
    if not spec.adaptive and nfe >= 5:  # the solver spends most of the rest
        assert D.calls >= nfe - (spec.cost(2, spec.defaults) - spec.cost(1, spec.defaults))


def test_steps_from_inf_add_the_first_step():
    """steps=N from inf: N + 1 levels starting at inf, so the first step and N solver steps."""
    gm, fl = mixture_2d(), P.Flow()
    seen = []
    uf.sample(lambda x, s: (seen.append(float(s[0])), gm.denoise(x, s))[1], noise(4, 2, sigma_max=1.0), "euler",
              steps=5, sigma_max=INF, grid="uniform_t", process=fl)
    assert seen == grids.uniform_t(6, 0.002, INF, fl).tolist()


def test_dopri5_from_inf_matches_the_pf_ode():
    gm = mixture_2d()
    n = noise(8, 2, sigma_max=1.0, seed=6)
    ref = gm.pf_ode(n * 1e8, 1e8, 0.0)
    for name in ("dopri5", "heun"):
        kw = dict(rtol=1e-6, atol=1e-6) if name == "dopri5" else dict(steps=400, grid="sd3")
        out = uf.sample(gm.denoise, n, name, sigma_max=INF, **kw)
        assert float((out - ref).norm(dim=1).median()) < 2e-3, name


@pytest.mark.parametrize("grid", ["karras", "loglinear", "linear", "tuned", "native", lambda n, a, b: None])
def test_grids_that_cannot_start_at_inf(grid):
    with pytest.raises(ValueError, match="'uniform_t', 'sd3' or 'native'.*finite sigma_max"):
        uf.sample(mixture_2d().denoise, noise(2, 2, sigma_max=1.0), "euler", sigma_max=INF, grid=grid, process=P.EDM())


def test_a_tensor_grid_and_sigma_max_agree_on_inf():
    gm = mixture_2d()
    with pytest.raises(ValueError, match="pass sigma_max=float"):
        uf.sample(gm.denoise, noise(2, 2), "euler", grid=torch.tensor([INF, 1.0, 0.1]))
    with pytest.raises(ValueError, match="start it with inf"):
        uf.sample(gm.denoise, noise(2, 2), "euler", grid=torch.tensor([80.0, 1.0]), sigma_max=INF)
    D = Counting(gm.denoise)
    uf.sample(D, noise(2, 2, sigma_max=1.0), "heun", grid=torch.tensor([INF, 10.0, 1.0, 0.0]), sigma_max=INF)
    assert D.calls == 1 + (2 * 2 - 1)  # the first step, then heun on [10, 1, 0]


# ------------------------------------------------------------------ callback and input checks
@pytest.mark.parametrize("name, kw", [("euler", {}), ("heun", {}), ("dpmpp_2s", {}), ("pc", {}), ("dopri5", {}),
                                      ("dpmpp_2m", dict(sigma_max=INF, grid="sd3"))])
def test_callback_sees_every_denoiser_call(name, kw):
    gm = mixture_2d()
    D, seen = Counting(gm.denoise), []
    x0 = noise(3, 2, sigma_max=1.0 if kw else 80.0)
    uf.sample(D, x0, name, nfe=20 if name != "dopri5" else 200, generator=torch.Generator().manual_seed(0),
              callback=lambda x, s, den: seen.append((x.shape, type(s), den.shape)), **kw)
    assert len(seen) == D.calls > 1
    assert all(item == (x0.shape, float, x0.shape) for item in seen)


def test_callback_gets_what_the_denoiser_saw():
    gm, calls = mixture_2d(), []
    uf.sample(gm.denoise, noise(3, 2), "euler", nfe=4, callback=lambda x, s, den: calls.append((x, s, den)))
    for x, s, den in calls:
        torch.testing.assert_close(den, gm.denoise(x, torch.full((3,), s, dtype=torch.float64)))
    assert [s for _, s, _ in calls] == grids.karras(4, 0.002, 80.0).tolist()


def test_denoiser_output_of_the_wrong_shape_fails_on_the_first_call():
    D = Counting(lambda x, s: x[:, :1])
    with pytest.raises(ValueError, match=r"returned \(4, 1\) for x of shape \(4, 2\).*shaped like x"):
        uf.sample(D, noise(4, 2), "heun", nfe=9)
    assert D.calls == 1


@pytest.mark.parametrize("grid, match", [
    ([80.0, 10.0, 10.0, 1.0], "strictly decreasing"),
    ([1.0, 10.0, 0.0], "strictly decreasing"),
    ([80.0, math.nan, 1.0], "NaN"),
    ([80.0, INF, 1.0], "inf after its first level"),
    ([80.0, 1.0, -0.5], "must be > 0"),
    ([80.0, 0.0, 1.0], "must be > 0"),
    ([], "no noise level"),
])
def test_bad_tensor_grids(grid, match):
    D = Counting(mixture_2d().denoise)
    with pytest.raises(ValueError, match=match):
        uf.sample(D, noise(2, 2), "euler", grid=torch.tensor(grid, dtype=torch.float64))
    assert D.calls == 0


def test_noise_with_nan_fails_early():
    x = noise(2, 2)
    x[0, 0] = math.nan
    with pytest.raises(ValueError, match="noise holds NaN"):
        uf.sample(mixture_2d().denoise, x, "euler")


def nan_below(level):
    """The exact denoiser, but NaN for sigma < level."""
    gm = mixture_2d()
    return lambda x, s: torch.where((s < level)[:, None], math.nan, gm.denoise(x, s))


def test_non_finite_sample_warns_naming_the_first_bad_sigma():
    sig = grids.karras(10, 0.002, 80.0)
    first_bad = float(sig[sig < 1.0][0])
    with pytest.warns(RuntimeWarning, match=f"first returned NaN or inf at sigma={first_bad:.6g}"):
        x = uf.sample(nan_below(1.0), noise(2, 2), "euler", nfe=10)
    assert torch.isnan(x).all()


def test_check_finite_stops_at_the_first_bad_call():
    D = Counting(nan_below(1.0))
    with pytest.raises(FloatingPointError, match="NaN or inf at sigma=") as e:
        uf.sample(D, noise(2, 2), "euler", nfe=10, check_finite=True)
    assert isinstance(e.value, ValueError)  # reported as bad input too
    sig = grids.karras(10, 0.002, 80.0)
    assert D.calls == int((sig >= 1.0).sum()) + 1


def test_a_diverging_solver_is_told_apart_from_a_bad_denoiser():
    """Finite denoiser outputs (1.5e308) whose difference from a finite x (-1.5e308) overflows in the step."""
    def huge(x, s):
        return torch.full_like(x, 1.5e308)
    x0, grid = torch.full((2, 2), -1.5e308, dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="every denoiser output was finite, so the solver diverged"):
        assert not torch.isfinite(uf.sample(huge, x0, "euler", grid=grid)).all()
    with pytest.raises(FloatingPointError, match="every denoiser output was finite"):
        uf.sample(huge, x0, "euler", grid=grid, check_finite=True)


def test_ancestral_split():
    """s_down^2 + s_up^2 = s'^2; eta = 0 is deterministic; eta = 1 adds DDPM's posterior std s' sqrt(1 - s'^2/s^2)."""
    from unifusion.samplers.ancestral import ancestral_split
    s, s_next = 3.0, 1.2
    for eta in (0.0, 0.3, 1.0):
        down, up = ancestral_split(s, s_next, eta)
        assert math.isclose(down**2 + up**2, s_next**2, rel_tol=1e-12)
        assert math.isclose(up, eta * s_next * math.sqrt(1 - (s_next / s) ** 2), rel_tol=1e-12)
    assert ancestral_split(s, s_next, 0.0) == (s_next, 0.0)
    assert ancestral_split(s, 0.0, 1.0) == (0.0, 0.0)
