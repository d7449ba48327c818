"""The GPU-minded forms of the transformer layers compute what the plain ones did: adaLN as one
layer_norm + addcmul (layers.modulated_layer_norm) in DiT and MM-DiT, written out here as the code
before it (LayerNorm module, then x * (1 + scale) + shift) and compared in float64; the weight layout
(state-dict keys) is unchanged, so saved models load as they are; RMSNorm keeps float64; TF32 is
switched on for CUDA devices only; channels_last training equals the default layout on the CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from unifusion.networks import layers
from unifusion.networks.dit import DiT
from unifusion.networks.mmdit import MMDiT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# the state-dict keys of a depth-1 DiT with RMS q/k norms, as the code before the fused adaLN wrote them
DIT_KEYS = ["patch.weight", "patch.bias", "embed.noise_mlp.0.weight", "embed.noise_mlp.0.bias",
            "embed.noise_mlp.2.weight", "embed.noise_mlp.2.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
            "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight", "blocks.0.attn.proj.weight",
            "blocks.0.attn.proj.bias", "blocks.0.mlp.0.weight", "blocks.0.mlp.0.bias", "blocks.0.mlp.2.weight",
            "blocks.0.mlp.2.bias", "blocks.0.ada.weight", "blocks.0.ada.bias", "final.ada.weight", "final.ada.bias",
            "final.linear.weight", "final.linear.bias"]
STREAM = ["ada.weight", "ada.bias", "qkv.weight", "qkv.bias", "q_norm.weight", "k_norm.weight", "proj.weight",
          "proj.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
MMDIT_KEYS = (["patch.weight", "patch.bias", "embed.noise_mlp.0.weight", "embed.noise_mlp.0.bias",
               "embed.noise_mlp.2.weight", "embed.noise_mlp.2.bias", "pooled.0.weight", "pooled.0.bias",
               "pooled.2.weight", "pooled.2.bias", "context_in.weight", "context_in.bias"]
              + [f"blocks.0.{s}.{k}" for s in "xc" for k in STREAM] + [f"blocks.1.x.{k}" for k in STREAM]
              + ["blocks.1.c.ada.weight", "blocks.1.c.ada.bias", "blocks.1.c.qkv.weight", "blocks.1.c.qkv.bias",
                 "blocks.1.c.k_norm.weight", "final.ada.weight", "final.ada.bias", "final.linear.weight",
                 "final.linear.bias"])


def _old_adaln(x, shift, scale):
    """nn.LayerNorm(D, elementwise_affine=False, eps=1e-6) then modulate: the code before."""
    return torch.nn.LayerNorm(x.shape[-1], elementwise_affine=False, eps=1e-6)(x) * (1 + scale) + shift


def _old_attention(attn, x):
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(B, N, C))


def _old_dit(net, x, c_noise, emb):
    """DiT.forward as written before, block by block, on net's own weights."""
    e = net.embed(c_noise, emb, len(x))
    h = net.patch(x).flatten(2).transpose(1, 2) + net.pos
    for blk in net.blocks:
        sa, ca, ga, sm, cm, gm = blk.ada(F.silu(e))[:, None].chunk(6, dim=2)
        h = h + ga * _old_attention(blk.attn, _old_adaln(h, sa, ca))
        h = h + gm * blk.mlp(_old_adaln(h, sm, cm))
    shift, scale = net.final.ada(F.silu(e))[:, None].chunk(2, dim=2)
    return net.unpatchify(net.final.linear(_old_adaln(h, shift, scale)))


def _perturbed(net, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.mark.parametrize("qk_norm", [False, "rms", "layer"])
def test_dit_equals_the_code_before_in_float64(qk_norm):
    torch.manual_seed(0)
    net = _perturbed(DiT(input_size=8, hidden_size=32, depth=2, num_heads=4, qk_norm=qk_norm).double()).eval()
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    emb = torch.randn(3, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, emb), _old_dit(net, x, c, emb), rtol=1e-6, atol=1e-6)


def test_saved_dit_and_mmdit_weights_load_unchanged():
    """No weight changed name or shape: a state dict saved before loads strictly and gives the same output."""
    torch.manual_seed(0)
    dit = DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, qk_norm="rms")
    assert list(dit.state_dict()) == DIT_KEYS
    mm = MMDiT(hidden_size=32, depth=2, num_heads=4, context_dim=8, emb_dim=16)
    assert list(mm.state_dict()) == MMDIT_KEYS
    saved = {k: v.clone() for k, v in _perturbed(dit).state_dict().items()}
    torch.manual_seed(5)
    again = DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, qk_norm="rms")
    again.load_state_dict(saved, strict=True)
    x, c = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(again(x, c), dit(x, c))


def test_mmdit_blocks_use_the_same_adaln():
    """Each stream's pre() / post() against the LayerNorm-module code before, in float64."""
    torch.manual_seed(0)
    net = _perturbed(MMDiT(hidden_size=32, depth=2, num_heads=4, context_dim=8, emb_dim=16).double())
    s = net.blocks[0].x
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 16, 32, generator=g, dtype=torch.float64), torch.randn(2, 32, generator=g, dtype=torch.float64)
    q, k, v, mods = s.pre(x, emb)
    m = s.ada(F.silu(emb))[:, None].chunk(6, dim=2)
    h = _old_adaln(x, m[0], m[1])
    parts = s.qkv(h).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(q, s.q_norm(parts[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, parts[2], rtol=1e-12, atol=1e-12)
    out = torch.randn(2, 4, 16, 8, generator=g, dtype=torch.float64)
    y = x + m[2] * s.proj(out.transpose(1, 2).reshape(2, 16, 32))
    torch.testing.assert_close(s.post(x, out, mods), y + m[5] * s.mlp(_old_adaln(y, m[3], m[4])), rtol=1e-12, atol=1e-12)


def test_modulated_layer_norm_under_bf16_autocast_is_float32_like_before():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    shift, scale = (torch.randn(2, 1, 16, generator=g).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = layers.modulated_layer_norm(x, shift, scale)
        old = layers.modulate(F.layer_norm(x, (16,), eps=1e-6), shift, scale)
    assert new.dtype == old.dtype == torch.float32
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)


def test_rms_norm_keeps_float64_and_lifts_bf16_to_float32():
    norm = layers.RMSNorm(8)
    x = torch.randn(3, 8, dtype=torch.float64) * 1e-3 + 1
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(norm(x), want, rtol=1e-14, atol=1e-14)  # float32 would be ~1e-7 off
    xb = x.bfloat16()
    got = norm(xb)
    assert got.dtype == torch.float32  # bf16 normalised in float32, times the float32 weight
    torch.testing.assert_close(got, (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6))
                               .bfloat16().float())


def test_tf32_is_switched_on_for_cuda_devices_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        layers.use_tf32(torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        layers.use_tf32("cuda")  # setting the flags needs no device
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------ channels_last in the trainer
def _run(tmp_path, name, **kw):
    from unifusion import checkpoint
    from unifusion import config as C
    from unifusion.training import loop as L
    cfg = C.from_dict({"data": "digits-train", "network_args": {"model_channels": 8}, "batch_size": 16,
                       "steps": 4, "checkpoint_every": 2, "sample_every": 0, "log_every": 2, "warmup_steps": 2,
                       "sample_nfe": 1, "posthoc_every": 2, "out": str(tmp_path / name), **kw})
    L._preview = lambda *a, **k: tmp_path / "none.png"
    L.log_curve = lambda *a, **k: tmp_path / "none.png"
    L.train(cfg, progress=False)
    return checkpoint.load(tmp_path / name)[0]


def test_channels_last_training_equals_the_default_layout_and_resumes_exactly(tmp_path, monkeypatch):
    from unifusion.training import loop as L
    monkeypatch.setattr(L, "_preview", L._preview)
    monkeypatch.setattr(L, "log_curve", L.log_curve)
    plain = _run(tmp_path, "plain")
    cl = _run(tmp_path, "cl", channels_last=True)
    for group in ("model", "ema", "optimizer", "posthoc"):
        assert plain[group].keys() == cl[group].keys()
        for k in plain[group]:
            torch.testing.assert_close(cl[group][k], plain[group][k], rtol=1e-4, atol=1e-5, msg=f"{group} {k}")
    # resumed under channels_last (the loaded AdamW moments are put back into the weights' layout):
    # bit for bit the straight run
    _run(tmp_path, "two", channels_last=True, steps=2)
    resumed = _run(tmp_path, "two", channels_last=True, resume=True)
    for group in ("model", "ema", "optimizer", "posthoc"):
        for k in cl[group]:
            assert torch.equal(resumed[group][k], cl[group][k]), (group, k)
