"""Stochastic steps as Gaussian policies (samplers/logprob.py): each step's log-probability
against the density derived another way (the DDPM posterior in x_t, Flow-GRPO's t-domain SDE step,
torch.distributions), rollouts against the registered samplers, the recomputed log-probability
against the one recorded while sampling, the SDE's marginals against an exact mixture, SDE windows,
and the differentiable (DRaFT) rollout's gradient."""
import math

import pytest
import torch

import unifusion as uf
from unifusion import processes as P
from unifusion.samplers import grids, logprob as LP
from tests.oracles import mixture_2d, noise

pytestmark = pytest.mark.usefixtures("one_thread")
POLICIES = [("ddpm", None), ("ddim", 0.5), ("euler_ancestral", 1.0), ("flow_sde", 0.7), ("flow_sde", 1.3),
            ("consistency", None)]


def _check_step(pol, s, s_next, seed=0):
    """A random (x, D) pair through one step: the recorded log-probability equals torch's Normal."""
    g = torch.Generator().manual_seed(seed)
    x, D = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    if math.isinf(s):
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)  # unit noise at inf
    s_down, s_up = pol.split(s, s_next)
    B = len(x)
    mean = LP.step_mean(x, D, torch.full((B,), s, dtype=torch.float64), torch.full((B,), s_down, dtype=torch.float64))
    x_next = mean + s_up * torch.randn(6, 3, generator=g, dtype=torch.float64)
    lp = LP.log_normal(x_next, mean, torch.full((B,), s_up, dtype=torch.float64))
    ref = torch.distributions.Normal(mean, s_up).log_prob(x_next).sum(1)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-10)
    return x, D, mean, s_down, s_up, x_next, lp


@pytest.mark.parametrize("name, level", POLICIES)
@pytest.mark.parametrize("s, s_next", [(80.0, 20.0), (2.0, 1.5), (0.3, 0.01), (math.inf, 3.0)])
def test_step_logprob_is_the_gaussian_density(name, level, s, s_next):
    pol = LP.policy(name, level)
    _, _, _, s_down, s_up, _, _ = _check_step(pol, s, s_next)
    if name != "consistency":  # every split keeps the marginal noise level s'
        assert s_down**2 + s_up**2 == pytest.approx(s_next**2, rel=1e-12)
    assert s_up > 0


def test_ddpm_step_is_the_posterior_of_the_discrete_process():
    """The ddpm policy's density of x_{t'} given x_t equals q(x_t' | x_t, x_0 = D) of Ho et al.
    (2020, eq. 7) written with abar in x_t-space, mapped to the sigma-domain (x = x_t / sqrt(abar),
    so log p_sigma = log p_t + d log sqrt(abar'))."""
    proc = P.DDPM("linear")
    pol = LP.policy("ddpm")
    for t, t_prev in [(999, 949), (500, 480), (30, 10)]:
        s, s_next = float(proc.sigmas[t]), float(proc.sigmas[t_prev])
        ab, ab_prev = 1 / (1 + s**2), 1 / (1 + s_next**2)
        x, D, mean, _, s_up, x_next, lp = _check_step(pol, s, s_next, seed=t)
        xt, xt_next = x * math.sqrt(ab), x_next * math.sqrt(ab_prev)
        alpha, beta = ab / ab_prev, 1 - ab / ab_prev
        mu = (math.sqrt(ab_prev) * beta / (1 - ab)) * D + (math.sqrt(alpha) * (1 - ab_prev) / (1 - ab)) * xt
        var = (1 - ab_prev) / (1 - ab) * beta
        ref = torch.distributions.Normal(mu, math.sqrt(var)).log_prob(xt_next).sum(1) + 3 * math.log(math.sqrt(ab_prev))
        torch.testing.assert_close(lp, ref, rtol=1e-9, atol=1e-8)


def test_flow_sde_is_flow_grpos_sde_to_first_order():
    """Flow-GRPO's Euler-Maruyama step in flow time t (x_t = (1 - t) x, v = (x_t - D) / t,
    sigma_t = a sqrt(t / (1 - t))): mean x_t + [v + sigma_t^2 / (2t)(x_t + (1 - t) v)] dt, std
    sigma_t sqrt(|dt|). Mapped to the sigma-domain it agrees with the exactly integrated step up to
    O(dt^2) in the mean and O(dt^(3/2)) in the std: the error shrinks ~4x and ~2.8x per halving."""
    a, t = 0.7, 0.6
    g = torch.Generator().manual_seed(0)
    x, D = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    errs = []
    for dt in (0.02, 0.01, 0.005):
        t2 = t - dt
        s, s2 = t / (1 - t), t2 / (1 - t2)
        xt = (1 - t) * x
        v = (xt - D) / t
        sig_t = a * math.sqrt(t / (1 - t))
        mean_t = xt + (v + sig_t**2 / (2 * t) * (xt + (1 - t) * v)) * (-dt)
        std_t = sig_t * math.sqrt(dt)
        s_down, s_up = LP.flow_sde_split(s, s2, a)
        mean = LP.step_mean(x, D, torch.full((5,), s), torch.full((5,), s_down))
        errs.append((float((mean - mean_t / (1 - t2)).abs().max()), abs(s_up - std_t / (1 - t2))))
    for (m1, s1), (m2, s2_) in zip(errs, errs[1:]):
        assert 3.3 < m1 / m2 < 4.7 and 2.3 < s1 / s2_ < 3.4, errs
    assert LP.flow_sde_split(2.0, 1.0, math.sqrt(2)) == pytest.approx(LP.policy("ddpm").split(2.0, 1.0), rel=1e-12)


@pytest.mark.parametrize("name, level", [p for p in POLICIES if p[0] != "flow_sde" or p[1] == 0.7])
def test_rollout_draws_what_the_registered_sampler_draws(name, level):
    """Same generator, same order of draws: a rollout ends where uf.sample ends."""
    gm = mixture_2d()
    sig = grids.make("karras", 8, 0.02, 80.0)
    x = noise(16, 2, seed=4)
    opts = {} if level is None else {("noise_level" if name == "flow_sde" else "eta"): level}
    want = uf.sample(gm.denoise, x, name, grid=sig, sigma_max=80.0, sigma_min=0.02,
                     generator=torch.Generator().manual_seed(3), **opts)
    roll = LP.rollout(gm.denoise, x, LP.plan(sig, LP.policy(name, level)), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(roll.sample, want, rtol=1e-10, atol=1e-10)
    assert roll.logp.shape == (16, 7) and torch.isfinite(roll.logp).all()


def test_recomputed_logprob_equals_the_recorded_one_across_steps_and_inf():
    """step_logprob on (x_i, x_{i+1}) pairs of mixed steps, the first at sigma = inf, in one batch."""
    gm = mixture_2d()
    sig = grids.make("uniform_t", 6, 0.002, math.inf, process=P.Flow())
    steps = LP.plan(sig, LP.policy("flow_sde", 0.9))
    assert steps.stochastic == [0, 1, 2, 3, 4] and math.isinf(steps.sigmas[0])
    n = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    roll = LP.rollout(gm.denoise, n, steps, generator=torch.Generator().manual_seed(2), reference=gm.denoise)
    torch.testing.assert_close(roll.kl, torch.zeros_like(roll.kl))  # the reference is the policy itself
    rows = torch.arange(8).repeat_interleave(5)
    j = torch.arange(5).repeat(8)
    i = torch.tensor(steps.stochastic)[j]
    t = lambda v: torch.tensor(v, dtype=torch.float64)[i]  # noqa: E731
    lp, _ = LP.step_logprob(lambda x, s, **c: gm.denoise(x, s), roll.xs[i, rows], roll.xs[i + 1, rows],
                            t(steps.sigmas[:-1]), t(steps.s_down), t(steps.s_up))
    torch.testing.assert_close(lp, roll.logp[rows, j], rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("a", [0.7, 1.2])
def test_flow_sde_keeps_the_ode_marginals(a):
    """Flow-GRPO's SDE on the exact mixture denoiser: halfway (sigma = 0.5) and at the end its
    samples match exact samples of p_sigma (x_0 + sigma n) and of p_0 within 3x the null energy
    distance (exact vs exact), from sigma_max = 80 and from inf (a flow model's t = 1)."""
    from tests.test_samplers import energy_distance
    gm = mixture_2d()
    n = 1000
    nulls = []
    for i in range(4):
        a0, b0 = gm.sample(n, torch.Generator().manual_seed(100 + i))[0], gm.sample(n, torch.Generator().manual_seed(200 + i))[0]
        nulls.append(energy_distance(a0, b0))
    tol = 3 * max(nulls)
    pol = LP.policy("flow_sde", a)
    for top in (80.0, math.inf):
        mid = grids.make("loglinear", 100, 0.5, 80.0)[:-1]
        mid = torch.cat([torch.tensor([math.inf], dtype=torch.float64), mid]) if math.isinf(top) else mid
        start = noise(n, 2, sigma_max=1.0 if math.isinf(top) else 80.0, seed=5)
        half = LP.rollout(gm.denoise, start, LP.plan(torch.cat([mid, mid.new_zeros(1)]), pol),
                          generator=torch.Generator().manual_seed(6))
        x_half = half.xs[-2]  # the state at sigma = 0.5, before the last (denoising) step
        x0, _ = gm.sample(n, torch.Generator().manual_seed(7))
        exact_half = x0 + 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        assert energy_distance(x_half, exact_half) < tol, (top, energy_distance(x_half, exact_half), tol)
        full = grids.make("karras", 120, 0.002, 80.0)
        if math.isinf(top):
            full = torch.cat([torch.tensor([math.inf], dtype=torch.float64), full])
        end = LP.rollout(gm.denoise, start, LP.plan(full, pol), generator=torch.Generator().manual_seed(9)).sample
        assert energy_distance(end, x0) < tol, (top, energy_distance(end, x0), tol)


def test_a_window_makes_only_its_steps_stochastic():
    gm = mixture_2d()
    sig = grids.make("karras", 8, 0.02, 80.0)
    pol = LP.policy("flow_sde", 0.7)
    steps = LP.plan(sig, pol, window=(2, 3))
    assert steps.stochastic == [2, 3, 4]
    x = noise(6, 2, seed=1)
    roll = LP.rollout(gm.denoise, x, steps, generator=torch.Generator().manual_seed(0))
    assert roll.logp.shape == (6, 3)
    ode = LP.rollout(gm.denoise, x, LP.plan(sig, LP.policy("ddim", 0.0)))
    torch.testing.assert_close(roll.xs[:3], ode.xs[:3])  # identical until the window opens
    assert not torch.allclose(roll.xs[5], ode.xs[5])
    assert ode.logp.shape == (6, 0) and LP.policy("ddim", 0.0).stochastic is False


@pytest.mark.parametrize("name, match", [("dpmpp_2m", "deterministic"), ("heun", "deterministic"),
                                         ("pc", "not single Gaussians"), ("euler_maruyama", "not single Gaussians"),
                                         ("nope", "choose one of")])
def test_samplers_without_a_logprob_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        LP.policy(name)


def test_noise_level_checks():
    with pytest.raises(ValueError, match="has no noise level"):
        LP.policy("ddpm", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LP.policy("ddim", 1.5)
    assert LP.policy("flow_sde").level == 0.7 and LP.policy("ddim").level == 1.0


def test_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(a, std[:, None]),
                                            torch.distributions.Normal(b, std[:, None])).sum(1)
    torch.testing.assert_close(LP.kl_normal(a, b, std), ref)


class _Scaled(torch.nn.Module):
    """A denoiser with one weight: D = theta * the mixture's exact denoiser."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(1.1, dtype=torch.float64))
        self.gm = mixture_2d()

    def forward(self, x, sigma, **cond):
        return self.theta * self.gm.denoise(x, sigma)


def test_differentiable_rollout_is_the_rollout_with_a_gradient():
    """Same draws, same sample as rollout; the gradient through all steps matches finite
    differences, checkpointing does not change it, and grad_from = n leaves no gradient."""
    den = _Scaled()
    sig = grids.make("karras", 5, 0.05, 20.0)
    steps = LP.plan(sig, LP.policy("flow_sde", 0.8))
    x = noise(6, 2, sigma_max=20.0, seed=2)
    z = torch.randn(steps.n, 6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = LP.rollout(den, x, steps, noises=z, reference=lambda xx, s: den.gm.denoise(xx, s))
    out, kl = LP.differentiable_rollout(den, x, steps, z, reference=lambda xx, s: den.gm.denoise(xx, s))
    torch.testing.assert_close(out, ref.sample)
    torch.testing.assert_close(kl, ref.kl.sum(1))
    f = lambda: (LP.differentiable_rollout(den, x, steps, z)[0] ** 2).sum()  # noqa: E731
    (g,) = torch.autograd.grad(f(), den.theta)
    (g2,) = torch.autograd.grad((LP.differentiable_rollout(den, x, steps, z, checkpoint=True)[0] ** 2).sum(), den.theta)
    h = 1e-6
    with torch.no_grad():
        den.theta += h
        up = f()
        den.theta -= 2 * h
        down = f()
        den.theta += h
    assert float(g) == pytest.approx(float((up - down) / (2 * h)), rel=1e-5)
    torch.testing.assert_close(g, g2)
    last, _ = LP.differentiable_rollout(den, x, steps, z, grad_from=steps.n)
    assert not last.requires_grad
