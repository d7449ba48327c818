"""Normalizing flows (networks/invertible.py): math against math.

Every layer and architecture is checked for x -> z -> x round trips and for logdet against
log|det| of the autograd Jacobian (float64, inputs of at most 16 dimensions), after random
parameter perturbations so no map is the identity. A RealNVP fitted by maximum likelihood must
recover an analytic correlated Gaussian's log-density.
"""
import inspect
import json
import math

import pytest
import torch
import torch.distributed as dist
from torch.autograd.functional import jacobian

from unifusion.networks.invertible import (
    FLOW_NETWORKS, ActNorm, AdditiveCoupling, AffineCoupling, ConvCouplingNet, DiagonalScale, Glow,
    InvertibleConv1x1, MLPCouplingNet, NICE, RealNVP, Squeeze, VariationalDequantizer, alternating_mask,
    channel_mask, checkerboard_mask, standard_normal_log_prob,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

F64 = torch.float64


def perturb_(module, scale=0.1, seed=1):
    """Add small noise to every parameter: lifts the zero-init, so no coupling is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ready(module, shape, seed=0):
    """float64, data-dependent init done on a batch (ActNorm), then perturbed."""
    module = module.double()
    with torch.no_grad():
        module(2.0 * randn(8, *shape, seed=seed + 100) + 0.5)
    return perturb_(module, seed=seed + 1)


def autograd_logdet(fn, x):
    """log|det d fn(x)/dx| per example of x (B, ...), from the full Jacobian of the flattened map."""
    out = []
    for xi in x:
        J = jacobian(lambda v: fn(v.unsqueeze(0)).reshape(-1), xi)
        out.append(torch.linalg.slogdet(J.reshape(J.shape[0], -1))[1])
    return torch.stack(out)


# -- layers: (factory, one example's shape); each input has at most 16 dimensions

LAYERS = {
    "additive-alternating": (lambda: AdditiveCoupling(alternating_mask(6, 0), MLPCouplingNet(6, 6, 8)), [6]),
    "additive-checkerboard": (lambda: AdditiveCoupling(checkerboard_mask(2, 2, 2, 1), ConvCouplingNet(2, 2, 8)),
                              [2, 2, 2]),
    "affine-tanh-alternating": (lambda: AffineCoupling(alternating_mask(6, 1), MLPCouplingNet(6, 12, 8), "tanh"),
                                [6]),
    "affine-sigmoid-alternating": (lambda: AffineCoupling(alternating_mask(6, 0), MLPCouplingNet(6, 12, 8, 3),
                                                          "sigmoid"), [6]),
    "affine-tanh-checkerboard": (lambda: AffineCoupling(checkerboard_mask(1, 4, 4, 0), ConvCouplingNet(1, 2, 8),
                                                        "tanh"), [1, 4, 4]),
    "affine-sigmoid-checkerboard": (lambda: AffineCoupling(checkerboard_mask(2, 2, 2, 1), ConvCouplingNet(2, 4, 8),
                                                           "sigmoid"), [2, 2, 2]),
    "affine-tanh-channel": (lambda: AffineCoupling(channel_mask(4, 2, 2, 1), ConvCouplingNet(4, 8, 8), "tanh"),
                            [4, 2, 2]),
    "affine-sigmoid-channel": (lambda: AffineCoupling(channel_mask(4, 2, 2, 0), ConvCouplingNet(4, 8, 8), "sigmoid"),
                               [4, 2, 2]),
    "diagonal-scale-vector": (lambda: DiagonalScale([6]), [6]),
    "diagonal-scale-image": (lambda: DiagonalScale([2, 2, 2]), [2, 2, 2]),
    "actnorm-vector": (lambda: ActNorm(6), [6]),
    "actnorm-image": (lambda: ActNorm(4), [4, 2, 2]),
    "invconv-vector": (lambda: InvertibleConv1x1(5), [5]),
    "invconv-image": (lambda: InvertibleConv1x1(4), [4, 2, 2]),
    "squeeze-1ch": (lambda: Squeeze(), [1, 4, 4]),
    "squeeze-2ch": (lambda: Squeeze(), [2, 2, 2]),
}


def make_layer(name, seed=0):
    factory, shape = LAYERS[name]
    torch.manual_seed(seed)  # InvertibleConv1x1 draws its orthogonal start from the global RNG
    return ready(factory(), shape, seed), shape


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trip(name):
    layer, shape = make_layer(name)
    x = randn(4, *shape, seed=3)
    y, logdet = layer(x)
    assert logdet.shape == (4,) and logdet.dtype == F64
    if not isinstance(layer, Squeeze):
        assert (y - x).abs().max() > 1e-3  # perturbed: not the identity
    assert (layer.inverse(y) - x).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_logdet_is_log_abs_det_jacobian(name):
    layer, shape = make_layer(name)
    x = randn(2, *shape, seed=4)
    _, logdet = layer(x)
    expected = autograd_logdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, expected, atol=1e-8, rtol=1e-8)


def test_additive_coupling_logdet_is_exactly_zero():
    for name in ("additive-alternating", "additive-checkerboard"):
        layer, shape = make_layer(name)
        _, logdet = layer(randn(3, *shape, seed=5))
        assert torch.equal(logdet, torch.zeros(3, dtype=F64))


def test_couplings_start_as_identity_and_keep_the_masked_part():
    x = randn(3, 6, seed=6)
    m = alternating_mask(6, 0)
    for layer in (AdditiveCoupling(m, MLPCouplingNet(6, 6, 8)), AffineCoupling(m, MLPCouplingNet(6, 12, 8), "tanh")):
        y, logdet = layer.double()(x)
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3, dtype=F64))
    # Glow's sigmoid scale starts at sigmoid(2) on the transformed half (zero net output)
    y, logdet = AffineCoupling(m, MLPCouplingNet(6, 12, 8), "sigmoid").double()(x)
    torch.testing.assert_close(y, m * x + (1 - m) * x * torch.sigmoid(torch.tensor(2.0, dtype=F64)))
    torch.testing.assert_close(logdet, torch.full((3,), -3 * math.log1p(math.exp(-2.0)), dtype=F64))
    # after perturbation the masked part still passes through unchanged, bit for bit
    layer, _ = make_layer("affine-tanh-channel")
    x = randn(3, 4, 2, 2, seed=7)
    y, _ = layer(x)
    assert torch.equal(y[:, 2:], x[:, 2:]) and not torch.allclose(y[:, :2], x[:, :2])


def test_masks():
    cb = checkerboard_mask(3, 4, 4, 0)
    assert cb.shape == (3, 4, 4) and cb.sum() == 24 and cb[0, 0, 0] == 1 and cb[0, 0, 1] == 0
    assert torch.equal(cb + checkerboard_mask(3, 4, 4, 1), torch.ones(3, 4, 4))
    ch = channel_mask(4, 2, 3, 0)
    assert torch.equal(ch[:2], torch.ones(2, 2, 3)) and torch.equal(ch[2:], torch.zeros(2, 2, 3))
    assert torch.equal(ch + channel_mask(4, 2, 3, 1), torch.ones(4, 2, 3))
    assert alternating_mask(5, 0).tolist() == [1, 0, 1, 0, 1] and alternating_mask(5, 1).tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="at least 2 channels.*checkerboard_mask"):
        channel_mask(1, 4, 4)


def test_squeeze_layout_and_bad_sizes():
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    y, _ = Squeeze()(x)
    assert y.shape == (1, 8, 2, 2)
    assert y[0, :4, 0, 0].tolist() == [0, 1, 4, 5]  # channel 4c + 2a + b holds x[c, 2i + a, 2j + b]
    assert y[0, 4:, 1, 1].tolist() == [26, 27, 30, 31]
    with pytest.raises(ValueError, match=r"even height and width, got 7x7: use an image size divisible by 2\*\*num_sc"):
        Squeeze()(torch.zeros(1, 1, 7, 7))
    with pytest.raises(ValueError, match="got 4x5"):
        Squeeze()(torch.zeros(1, 1, 4, 5))


def test_invertible_conv_starts_orthogonal_and_matches_a_linear_map():
    torch.manual_seed(0)
    conv = InvertibleConv1x1(4).double()
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=F64), atol=1e-6, rtol=0)  # built in float32
    assert abs(conv.log_abs_s.sum().item()) < 1e-6  # |det| of an orthogonal matrix is 1
    perturb_(conv)
    x = randn(2, 4, 3, 3, seed=8)
    y, logdet = conv(x)
    w = conv.weight()
    torch.testing.assert_close(y, torch.einsum("ij,bjhw->bihw", w, x))
    torch.testing.assert_close(logdet, torch.full((2,), 9 * torch.linalg.slogdet(w)[1].item(), dtype=F64))


# -- ActNorm's data-dependent initialisation


@pytest.mark.parametrize("shape", [[3], [3, 4, 5]])
def test_actnorm_data_dependent_init(shape):
    norm = ActNorm(3).double()
    assert norm.initialized.item() == 0
    centre = torch.tensor([3.0, -1.0, 0.5], dtype=F64).view(1, 3, *[1] * (len(shape) - 1))
    spread = torch.tensor([5.0, 0.2, 1.0], dtype=F64).view(1, 3, *[1] * (len(shape) - 1))
    x = centre + spread * randn(64, *shape, seed=9)
    y, _ = norm(x)
    dims = [0] + list(range(2, y.ndim))
    torch.testing.assert_close(y.mean(dims), torch.zeros(3, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.std(dims, unbiased=False), torch.ones(3, dtype=F64), atol=1e-5, rtol=0)
    assert norm.initialized.item() == 1

    # a second batch does not re-initialise
    params = [p.detach().clone() for p in norm.parameters()]
    norm(10.0 * randn(64, *shape, seed=10) - 4.0)
    assert all(torch.equal(p, q) for p, q in zip(params, norm.parameters()))

    # the flag travels with the state dict: a loaded ActNorm does not re-initialise either
    state = norm.state_dict()
    assert "initialized" in state and state["initialized"].item() == 1
    fresh = ActNorm(3).double()
    fresh.load_state_dict(state)
    y2, _ = fresh(x)
    torch.testing.assert_close(y2, y)
    z = 7.0 + randn(16, *shape, seed=11)
    torch.testing.assert_close(fresh(z)[0], norm(z)[0])


def test_actnorm_all_reduces_statistics_across_ranks(monkeypatch):
    """Two ranks, simulated in-process: all_reduce sums this rank's tensor with what the other rank
    contributed to the same call. Both end with the parameters of an ActNorm initialised on the
    concatenated (global) batch, batch sizes unequal."""
    batches = [2.0 + 3.0 * randn(5, 3, 2, 2, seed=12), -1.0 + 0.5 * randn(9, 3, 2, 2, seed=13)]
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    contributions = [[], []]  # per rank, what each all_reduce call received

    def run(rank, peer_contributions):
        calls = iter(peer_contributions or [])

        def all_reduce(tensor, op=None, group=None, async_op=False):
            contributions[rank].append(tensor.clone())
            if peer_contributions is not None:
                tensor.add_(next(calls))

        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        norm = ActNorm(3).double()
        norm(batches[rank])
        return norm

    for rank in (0, 1):  # first pass: record each rank's local statistics
        run(rank, None)
    local = [list(c) for c in contributions]
    ranks = [run(0, local[1]), run(1, local[0])]
    monkeypatch.undo()
    reference = ActNorm(3).double()
    reference(torch.cat(batches))
    for norm in ranks:
        torch.testing.assert_close(norm.bias, reference.bias)
        torch.testing.assert_close(norm.log_scale, reference.log_scale)


# -- whole architectures

TINY = {"NICE": dict(hidden=16, depth=2, couplings=4), "RealNVP": dict(hidden=8, blocks=2),
        "Glow": dict(hidden=8, steps=2)}


def make_flow(name, shape, seed=0, **kw):
    torch.manual_seed(seed)
    return ready(FLOW_NETWORKS[name](shape, **{**TINY[name], **kw}), shape, seed)


def test_registry_and_json_kwargs():
    assert set(FLOW_NETWORKS) == {"NICE", "RealNVP", "Glow"}
    for cls in FLOW_NETWORKS.values():
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop("self"), params.pop("shape")
        defaults = {k: p.default for k, p in params.items()}
        assert all(v is not inspect.Parameter.empty for v in defaults.values())
        kwargs = json.loads(json.dumps({"shape": [1, 8, 8], **defaults}))
        assert cls(**kwargs).dim == 64


@pytest.mark.parametrize("name", sorted(FLOW_NETWORKS))
@pytest.mark.parametrize("shape", [[2], [6], [1, 8, 8], [3, 4, 4]])
def test_architecture_round_trip(name, shape):
    flow = make_flow(name, shape)
    x = randn(3, *shape, seed=14)
    z, logdet = flow(x)
    d = math.prod(shape)
    assert z.shape == (3, d) and logdet.shape == (3,) and z.dtype == logdet.dtype == F64
    assert (z - x.reshape(3, -1)).abs().max() > 1e-3
    assert (flow.inverse(z) - x).abs().max() < 1e-5
    # and the other way round, from latents to data and back
    z2 = randn(3, d, seed=15)
    torch.testing.assert_close(flow(flow.inverse(z2))[0], z2, atol=1e-8, rtol=1e-8)


# Glow on [4, 2, 2] can only squeeze once: num_levels=1 there
JACOBIAN_CASES = [(name, shape) for name in sorted(FLOW_NETWORKS) for shape in ([2], [6], [1, 4, 4], [4, 2, 2])]


@pytest.mark.parametrize("name,shape", JACOBIAN_CASES)
def test_architecture_log_density_through_the_jacobian(name, shape):
    """log N(z) + logdet equals the log-density from the Jacobian of the whole x -> z map
    (multi-scale: the factored-out channels included)."""
    kw = {"num_levels": 1} if name == "Glow" and shape == [4, 2, 2] else {}
    flow = make_flow(name, shape, **kw)
    x = randn(2, *shape, seed=16)
    z, logdet = flow(x)
    assert z.shape == (2, math.prod(shape))
    expected = standard_normal_log_prob(z) + autograd_logdet(lambda v: flow(v)[0], x)
    torch.testing.assert_close(standard_normal_log_prob(z) + logdet, expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name,kw,factored", [("RealNVP", {"num_scales": 2}, 8), ("RealNVP", {"num_scales": 3}, 12),
                                              ("Glow", {"num_levels": 2}, 8)])
def test_multiscale_factor_out(name, kw, factored):
    """The factored-out channels come first in z and leave the flow: changing the last stage's
    parameters changes only the rest of z."""
    flow = make_flow(name, [1, 8, 8] if kw.get("num_scales") == 3 else [1, 4, 4], **kw)
    shape = flow.shape
    x = randn(3, *shape, seed=17)
    z, _ = flow(x)
    assert z.shape == (3, math.prod(shape))
    first = sum(math.prod(s) for s in flow.z_shapes[:-1])
    assert first == (factored if name == "Glow" or kw["num_scales"] == 2 else 48)
    perturb_(flow.stages[-1], seed=18)
    z2, _ = flow(x)
    assert torch.equal(z2[:, :first], z[:, :first]) and (z2[:, first:] - z[:, first:]).abs().max() > 1e-3
    assert (flow.inverse(z2) - x).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(FLOW_NETWORKS))
def test_architecture_float32(name):
    flow = make_flow(name, [3, 4, 4]).float()
    x = randn(4, 3, 4, 4, seed=19, dtype=torch.float32)
    z, logdet = flow(x)
    assert z.dtype == logdet.dtype == torch.float32 and torch.isfinite(logdet).all()
    assert (flow.inverse(z) - x).abs().max() < 1e-4


def test_realnvp_and_nice_start_as_volume_preserving_maps():
    """Zero-initialised nets: RealNVP starts as the identity, NICE as x * exp(0)."""
    for cls in (RealNVP, NICE):
        flow = cls([3, 4, 4], hidden=8).double()
        x = randn(2, 3, 4, 4, seed=20)
        z, logdet = flow(x)
        assert torch.equal(logdet, torch.zeros(2, dtype=F64))
        if cls is NICE:
            assert torch.equal(z, x.reshape(2, -1))


def test_bad_shapes_raise_one_clear_error():
    with pytest.raises(ValueError, match=r"RealNVP cannot squeeze shape \[1, 6, 6\] with num_scales=3.*divisible by 4"
                                         r".*num_scales <= 2"):
        RealNVP([1, 6, 6], num_scales=3)
    with pytest.raises(ValueError, match=r"Glow cannot squeeze shape \[3, 6, 6\] with num_levels=2.*divisible by 4"
                                         r".*num_levels <= 1"):
        Glow([3, 6, 6], num_levels=2)
    with pytest.raises(ValueError, match=r"Glow cannot squeeze shape \[1, 5, 5\].*use an image size divisible by 2$"):
        Glow([1, 5, 5], num_levels=1)
    RealNVP([1, 6, 6], num_scales=2), Glow([3, 6, 6], num_levels=1)  # these fit
    with pytest.raises(ValueError, match=r"shape must be \[D\] for vectors or \[C, H, W\] for images"):
        NICE([4, 4])
    flow = RealNVP([1, 4, 4], hidden=8)
    with pytest.raises(ValueError, match=r"built for inputs of shape \(B, 1, 4, 4\), got \(2, 1, 8, 8\)"):
        flow(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"needs z of shape \(B, 16\)"):
        flow.inverse(torch.zeros(2, 15))


# -- variational dequantization


@pytest.mark.parametrize("shape", [[2], [5], [1, 4, 4], [2, 2, 2]])
def test_variational_dequantizer_density(shape):
    torch.manual_seed(0)
    deq = perturb_(VariationalDequantizer(shape, hidden=8).double(), scale=0.3)
    x = randn(2, *shape, seed=21)
    eps = randn(2, *shape, seed=22)
    u, log_q = deq(x, eps)
    assert u.shape == x.shape and log_q.shape == (2,)
    assert ((u > 0) & (u < 1)).all()
    expected = standard_normal_log_prob(eps) - torch.cat([
        autograd_logdet(lambda e: deq(x[i:i + 1], e)[0], eps[i:i + 1]) for i in range(2)])  # Jacobian in eps, x fixed
    torch.testing.assert_close(log_q, expected, atol=1e-8, rtol=1e-8)
    # q depends on x: another x gives another u for the same eps
    assert (deq(x + 1.0, eps)[0] - u).abs().max() > 1e-4
    u2, log_q2 = deq.sample(x, generator=torch.Generator().manual_seed(0))
    assert ((u2 > 0) & (u2 < 1)).all() and torch.isfinite(log_q2).all()


# -- learning


def test_realnvp_fits_a_correlated_gaussian():
    """Maximum likelihood on samples of N(mu, Sigma), Sigma non-diagonal: the learned
    log N(f(x)) + log|det df/dx| matches the analytic log-density on held-out points."""
    torch.manual_seed(0)
    gauss = torch.distributions.MultivariateNormal(torch.tensor([1.0, -0.5]),
                                                   torch.tensor([[1.0, 0.8], [0.8, 1.0]]))
    flow = RealNVP([2], hidden=32, blocks=3)
    held_out = gauss.sample((100,))

    def error():
        with torch.no_grad():
            z, logdet = flow(held_out)
            return (standard_normal_log_prob(z) + logdet - gauss.log_prob(held_out)).abs().mean().item()

    untrained = error()
    steps = 500
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        z, logdet = flow(gauss.sample((256,)))
        loss = -(standard_normal_log_prob(z) + logdet).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    trained = error()
    assert untrained > 0.5
    assert trained < 0.06, f"mean |log p_flow - log p_true| = {trained:.4f} nats (untrained {untrained:.3f})"
