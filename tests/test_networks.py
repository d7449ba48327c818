"""Denoiser networks: shapes for every preset, zero-init, conditioning, learning, checkpointing.

Every test uses shrunken configs (the TINY overrides below) so the file runs in seconds on CPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from unifusion.models.conditioning import ClassConditioning
from unifusion.networks import DiT, MLP, PRESETS, UNet, build, count_parameters
from unifusion.networks.layers import Attention, sinusoidal_embedding
from unifusion.networks.unet import AttnBlock, ResBlock, Upsample

# Every preset shrunk: same class and layout, widths/depths cut so a forward takes milliseconds.
TINY = {
    "mlp-2d": dict(hidden=32, depth=2, emb_dim=16),
    "unet-digits": dict(model_channels=8),
    "unet-32": dict(model_channels=8, resolution=8, attn_resolutions=(2,), num_heads=2),
    "unet-cifar": dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, resolution=8,
                       attn_resolutions=(4,), num_heads=2),
    "dit-s2": dict(input_size=8, hidden_size=32, depth=2, num_heads=2),
    "dit-b2": dict(input_size=8, hidden_size=32, depth=2, num_heads=4, qk_norm="rms"),
    "dit-l2": dict(input_size=8, hidden_size=32, depth=2, num_heads=4),
    "mmdit-s": dict(hidden_size=32, depth=2, num_heads=4, context_dim=8, emb_dim=16),
}
NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Labelled(torch.nn.Module):
    """A network with the model layer's class conditioning in front: net(x, c, y) with labels
    0..K-1, K the null label and y=None all-null (networks themselves take an embedding)."""

    def __init__(self, net, num_classes):
        super().__init__()
        self.inner, self.cond = net, ClassConditioning(num_classes, net.emb_dim)

    def forward(self, x, c, y=None):
        return self.inner(x, c, **self.cond.net_kwargs({"y": y} if y is not None else None, x.shape[0]))


def tiny(name, num_classes=0, **kw):
    torch.manual_seed(0)
    net = build(name, **{**TINY[name], **kw})
    return Labelled(net, num_classes) if num_classes else net


def example_input(net, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = getattr(net, "inner", net)
    if isinstance(net, MLP):
        shape = (batch, net.dim)
    elif isinstance(net, UNet):
        shape = (batch, net.in_channels, net.resolution, net.resolution)
    else:
        shape = (batch, net.in_channels, net.input_size, net.input_size)
    return torch.randn(shape, generator=g)


def perturb_(net, scale=0.05, seed=1):
    """Add noise to every parameter: lifts the zero-init so every path carries signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def test_tiny_configs_cover_every_preset():
    assert set(TINY) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_presets_build_and_keep_shape_fp32_and_bf16(name, num_classes):
    net = perturb_(tiny(name, num_classes=num_classes)).eval()
    x = example_input(net)
    c = torch.tensor([0.02, 1.5, 700.0])
    y = torch.tensor([0, NUM_CLASSES - 1, NUM_CLASSES]) if num_classes else None
    with torch.no_grad():
        out = net(x, c, y)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        if num_classes:
            assert net(x, c).shape == x.shape  # y=None on a conditional net: all-null
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, c, y)
    assert low.shape == x.shape and torch.isfinite(low).all()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); a few percent after the
    # whole net means the mixed-precision path computes the same function
    rel = (low.float() - out).norm() / out.norm()
    assert rel < 0.05, rel


@pytest.mark.parametrize("name", ["mlp-2d", "unet-digits", "dit-s2"])
def test_float64_networks_run(name):
    # likelihood and oracle comparisons may run a network in float64 end to end
    net = perturb_(tiny(name, num_classes=NUM_CLASSES)).double()
    x = example_input(net).double()
    out = net(x, torch.tensor([0.1, 2.0, 999.0], dtype=torch.float64), torch.tensor([0, 1, NUM_CLASSES]))
    assert out.dtype == torch.float64 and out.shape == x.shape


def test_preset_sizes_are_the_documented_ones():
    # built at full size once: DiT-S/2 and the DDPM-like UNet are the sizes __init__ states
    assert round(count_parameters(build("dit-s2")) / 1e6, 1) == 32.5
    assert round(count_parameters(build("unet-cifar")) / 1e6, 1) == 38.3
    assert count_parameters(torch.nn.Linear(3, 4)) == 3 * 4 + 4


@pytest.mark.parametrize("net", [
    pytest.param(lambda: tiny("unet-digits"), id="unet"),
    pytest.param(lambda: tiny("unet-cifar", upsample="pixelshuffle", downsample="avgpool", num_classes=3), id="unet-ps"),
    pytest.param(lambda: tiny("unet-digits", upsample="transposed"), id="unet-transposed"),
    pytest.param(lambda: tiny("dit-s2"), id="dit"),
    pytest.param(lambda: tiny("dit-b2", qk_norm="layer", num_classes=3), id="dit-qknorm"),
])
def test_unet_and_dit_output_exactly_zero_at_init(net):
    # by design: UNet's output conv and DiT's final linear (plus adaLN-Zero gates) start at zero,
    # so F = 0 and the denoiser starts at its c_skip * x baseline, whatever x, c_noise, y are
    net = net()
    x = example_input(net, batch=4) * 3
    out = net(x, torch.tensor([-3.0, 0.5, 10.0, 999.0]))
    assert torch.equal(out, torch.zeros_like(out))


def test_mlp_starts_with_identity_blocks():
    # MLP is not zero at the output (its output layer keeps the default init), but each residual
    # block's last linear is zero, so at init the output does not depend on c_noise or y
    net = tiny("mlp-2d", num_classes=3)
    x = example_input(net)
    a = net(x, torch.zeros(3), torch.tensor([0, 1, 2]))
    b = net(x, torch.full((3,), 500.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.abs().max() > 0


def test_noise_embedding_resolves_every_label_range():
    # the embedding must separate labels whatever the convention: t in [0, 1], EDM's
    # ln(sigma)/4, DDPM steps 0..999. Any two labels on a 0.01 grid (or the integer steps) must
    # be >= 0.1 apart in L2, for an embedding of norm sqrt(64) = 8; DDPM/ADM's top frequency of 1
    # would give only ~0.02 between t and t + 0.01
    for grid in (torch.linspace(0, 1, 101), torch.linspace(-3, 1.5, 451), torch.arange(1000.0)):
        E = sinusoidal_embedding(grid, 128).double()
        assert torch.allclose(E.norm(dim=1), torch.full((len(grid),), 8.0, dtype=torch.double))
        D = torch.cdist(E, E, compute_mode="donot_use_mm_for_euclid_dist")
        D.fill_diagonal_(float("inf"))
        assert D.min() >= 0.1


@pytest.mark.parametrize("name", ["mlp-2d", "unet-digits", "dit-s2"])
def test_noise_and_label_change_output_after_a_few_steps(name):
    # zero-init cuts the path from the embedding to the output at step 0; the first optimizer
    # steps must open it, so afterwards c_noise and y both move the output
    net = tiny(name, num_classes=NUM_CLASSES)
    x = example_input(net, batch=8)
    c = torch.rand(8)
    y = torch.arange(8) % NUM_CLASSES
    target = torch.randn_like(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (net(x, c, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        base = net(x, c, y)
        scale = base.norm()
        for other in (net(x, c + 0.05, y), net(x, c, (y + 1) % NUM_CLASSES)):
            assert (other - base).norm() > 1e-3 * scale
        null = torch.full_like(y, NUM_CLASSES)
        torch.testing.assert_close(net(x, c, null), net(x, c), rtol=0, atol=0)


def test_mlp_learns_a_conditional_map():
    # regression of a map that needs x, c_noise and y together: rotate x by pi * c + 2 pi y / 3.
    # Predicting zero scores E|target|^2 / 2 = 1 per coordinate; a network that learned the map
    # must explain most of that on held-out points
    torch.manual_seed(0)
    net = Labelled(MLP(dim=2, hidden=64, depth=3, emb_dim=32), 3)

    def batch(n, g):
        x, c, y = torch.randn(n, 2, generator=g), torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g)
        a = math.pi * c + 2 * math.pi * y / 3
        rot = torch.stack([x[:, 0] * a.cos() - x[:, 1] * a.sin(), x[:, 0] * a.sin() + x[:, 1] * a.cos()], 1)
        return x, c, y, rot

    held_out = batch(1024, torch.Generator().manual_seed(1))

    def mse():
        x, c, y, t = held_out
        with torch.no_grad():
            return (net(x, c, y) - t).pow(2).mean().item()

    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = mse()
    for _ in range(150):
        x, c, y, t = batch(256, g)
        loss = (net(x, c, y) - t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = mse()
    assert end < 0.2 * start and end < 0.2, (start, end)


@pytest.mark.parametrize("upsample", ["nearest", "pixelshuffle", "transposed"])
@pytest.mark.parametrize("downsample", ["conv", "avgpool"])
def test_unet_resampling_variants_shapes(upsample, downsample):
    net = perturb_(UNet(2, out_channels=3, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(), resolution=8, upsample=upsample, downsample=downsample))
    x = torch.randn(2, 2, 8, 8)
    assert net(x, torch.rand(2)).shape == (2, 3, 8, 8)
    up = Upsample(4, upsample)
    assert up(torch.randn(2, 4, 3, 5)).shape == (2, 4, 6, 10)


def test_pixelshuffle_starts_as_nearest_upsampling_of_one_conv():
    # ICNR: the four sub-pixel filters of each channel are equal at init, so the 2x2 block of
    # every output pixel is a copy of one conv output (no checkerboard)
    torch.manual_seed(0)
    up = Upsample(4, "pixelshuffle")
    x = torch.randn(2, 4, 5, 5)
    w, b = up.conv.weight[::4], up.conv.bias[::4]
    want = F.interpolate(F.conv2d(x, w, b, padding=1), scale_factor=2, mode="nearest")
    torch.testing.assert_close(up(x), want)


def test_unet_attention_runs_at_the_listed_resolution():
    net = tiny("unet-digits")  # 8x8 input, attention at 4x4
    seen = []
    for m in net.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    net(example_input(net), torch.rand(3))
    # encoder (1 block) + middle (1) + decoder (num_res_blocks + 1 = 2), all at 4x4
    assert seen == [(4, 4)] * 4
    with pytest.raises(ValueError, match="never reached"):
        UNet(1, channel_mult=(1, 2), resolution=8, attn_resolutions=(16,))


@pytest.mark.parametrize("qk_norm", [False, "rms", "layer"])
def test_attention_matches_softmax_formula(qk_norm):
    torch.manual_seed(0)
    attn = perturb_(Attention(12, num_heads=3, qk_norm=qk_norm), scale=0.3)
    x = torch.randn(2, 7, 12)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)  # (B, heads, N, 4) each

    def norm(t, layer):
        if qk_norm == "rms":
            return t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * layer.weight
        if qk_norm == "layer":
            return F.layer_norm(t, (4,), layer.weight, layer.bias, eps=1e-6)
        return t

    q, k = norm(q, attn.q_norm), norm(k, attn.k_norm)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)  # (B, heads, N, N)
    want = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_dit_unpatchify_inverts_row_major_patches():
    net = tiny("dit-s2", in_channels=3)  # p = 2, G = 4
    x = torch.randn(2, 3, 8, 8)
    # token n = row * G + col holds its patch as (p, p, C) values
    tokens = x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    torch.testing.assert_close(net.unpatchify(tokens), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["unet-digits", "dit-s2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    plain = perturb_(tiny(name, num_classes=NUM_CLASSES))
    ckpt = tiny(name, num_classes=NUM_CLASSES, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, c, y = example_input(plain, batch=4), torch.rand(4), torch.tensor([0, 1, 2, NUM_CLASSES])
    block_type = ResBlock if name.startswith("unet") else type(ckpt.inner.blocks[0])
    calls = []
    # a pre-hook: non-reentrant recomputation stops early, before a forward hook would fire
    next(m for m in ckpt.modules() if isinstance(m, block_type)).register_forward_pre_hook(lambda *a: calls.append(1))
    grads = []
    for net in (plain, ckpt):
        net.train()
        (net(x, c, y) ** 2).mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert len(calls) == 2  # the block ran again in backward: checkpointing really was on
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_conditioning_errors():
    net = tiny("mlp-2d")
    x = example_input(net)
    with pytest.raises(ValueError, match=r"shape \(3, 16\)"):  # an embedding of the wrong width
        net(x, torch.rand(3), torch.zeros(3, 5))
    cond = tiny("mlp-2d", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="0..4"):
        cond(x, torch.rand(3), torch.tensor([0, 1, NUM_CLASSES + 1]))


def test_descriptions_hold_every_argument_and_rebuild_the_same_network():
    from unifusion.networks import check_description, describe, from_description
    desc = describe("unet-digits", model_channels=8)
    assert desc["class"] == "UNet" and desc["kwargs"]["model_channels"] == 8
    assert desc["kwargs"]["channel_mult"] == [1, 2] and "dropout" in desc["kwargs"]  # defaults written out
    torch.manual_seed(0)
    a = from_description(desc)
    torch.manual_seed(0)
    b = build("unet-digits", model_channels=8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="no argument.*widht"):
        check_description({"class": "UNet", "kwargs": {"in_channels": 1, "widht": 3}})
    with pytest.raises(ValueError, match="unknown network class"):
        check_description({"class": "ResNet", "kwargs": {}})
    with pytest.raises(ValueError, match="needs argument"):
        check_description({"class": "UNet", "kwargs": {}})


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build("unet-imagenet")
    for name in PRESETS:
        assert name in str(err.value)


def test_networks_are_the_exported_classes():
    assert isinstance(tiny("mlp-2d"), MLP) and isinstance(tiny("unet-cifar"), UNet) and isinstance(tiny("dit-b2"), DiT)
