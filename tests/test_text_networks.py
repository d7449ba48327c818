"""Text-to-image networks: the text transformer and image encoder (contrastive towers), SD3's MM-DiT,
and the UNet's cross-attention. Tiny dims throughout; float64 where a formula is re-derived."""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from unifusion.networks import NETWORKS, PRESETS, MMDiT, UNet, build, count_parameters, describe, from_description
from unifusion.networks.mmdit import JointBlock, Stream
from unifusion.networks.text import TEXT_PRESETS, ImageEncoder, TextTransformer
from unifusion.networks.unet import CrossAttnBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB, L, CTX = 11, 7, 12


def perturb_(net, scale=0.05, seed=1):
    """Noise on every parameter: lifts the zero-inits so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def tokens(batch=3, seed=0, lengths=(7, 4, 2)):
    """ids (B, L) and a prefix mask with the given real lengths (BOS ... EOS = 2 ... 3)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths[:batch])[:, None]  # (B, L)
    ids[:, 0] = 2
    ids[torch.arange(batch), mask.sum(1) - 1] = 3
    return ids.masked_fill(~mask, 0), mask


def context(batch=3, seed=0, dim=CTX, lengths=(7, 4, 2), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, L, dim, generator=g, dtype=dtype)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths[:batch])[:, None]
    return ctx, mask


def tiny_mmdit(**kw):
    torch.manual_seed(0)
    return MMDiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4,
                           context_dim=CTX, emb_dim=10), **kw})


def tiny_unet(**kw):
    torch.manual_seed(0)
    return UNet(**{**dict(in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), resolution=8, num_heads=2), **kw})


# ---- TextTransformer, ImageEncoder

def test_text_transformer_shapes_and_pooling_at_eos():
    net = perturb_(TextTransformer(VOCAB, context_length=L, width=16, layers=2, heads=2, embed_dim=6))
    ids, mask = tokens()
    toks, pooled = net(ids, mask)
    assert toks.shape == (3, L, 16) and pooled.shape == (3, 16) and net.project(pooled).shape == (3, 6)
    eos = mask.sum(1) - 1  # prefix masks: the last real token
    torch.testing.assert_close(pooled, toks[torch.arange(3), eos], rtol=0, atol=0)
    assert torch.equal(toks[~mask], torch.zeros_like(toks[~mask]))  # padding outputs are zero
    # mask=None: every position real, pooled at the last one
    t2, p2 = net(ids[:1], None)
    torch.testing.assert_close(p2, t2[:, -1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="context length"):
        net(torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="bool"):
        net(ids, mask.long())


def test_text_transformer_outputs_depend_only_on_real_tokens():
    net = perturb_(TextTransformer(VOCAB, context_length=L, width=16, layers=2, heads=2, embed_dim=6)).eval()
    ids, mask = tokens()
    toks, pooled = net(ids, mask)
    other = ids.clone()
    other[~mask] = torch.randint(0, VOCAB, (int((~mask).sum()),), generator=torch.Generator().manual_seed(5))
    t2, p2 = net(other, mask)
    assert torch.equal(t2, toks) and torch.equal(p2, pooled)
    # a shorter row padded further: the same as running it alone at its own length
    n = int(mask[2].sum())
    t3, p3 = net(ids[2:3, :n], mask[2:3, :n])
    torch.testing.assert_close(p3, pooled[2:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t3[0], toks[2, :n], rtol=1e-5, atol=1e-6)
    # a real token does change the pooled vector
    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 1 - 4) % (VOCAB - 4) + 4
    assert (net(changed, mask)[1][0] - pooled[0]).abs().max() > 1e-4


def test_text_attention_is_masked_softmax_over_real_keys():
    # one block in float64 against attention written out over the real keys only
    net = perturb_(TextTransformer(VOCAB, context_length=L, width=8, layers=1, heads=2, embed_dim=4), scale=0.3).double()
    attn = net.blocks[0].attn
    ids, mask = tokens()
    x = torch.randn(3, L, 8, dtype=torch.float64)
    got = attn(x, mask)
    for b in range(3):
        q, k, v = attn.qkv(x[b]).reshape(L, 3, 2, 4).permute(1, 2, 0, 3)  # (heads, L, 4) each
        keep = mask[b]
        w = torch.softmax(q @ k[:, keep].transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head_dim) = 2
        want = attn.proj((w @ v[:, keep]).transpose(0, 1).reshape(L, 8))
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-12)


def test_image_encoder_shapes_and_position_information():
    enc = perturb_(ImageEncoder(in_channels=3, resolution=16, base_channels=8, embed_dim=12))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert enc(x).shape == (2, 12)
    assert ImageEncoder(resolution=64, base_channels=4, embed_dim=5)(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    # a constant image: without coordinate channels and with average pooling, every shift of a
    # centred blob would look alike; here a blob at the left and at the right embed differently
    left, right = torch.full((1, 3, 16, 16), -1.0), torch.full((1, 3, 16, 16), -1.0)
    left[..., 6:10, 1:5], right[..., 6:10, 11:15] = 1.0, 1.0
    assert (enc(left) - enc(right)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="expects images"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="resolution"):
        ImageEncoder(resolution=24)


def test_image_encoder_learns_where_a_blob_is():
    # 8x8 images with one bright 2x2 blob in one of 4 quadrants, at a random spot inside it:
    # a linear probe on the embedding must learn the quadrant (a global average pool of a
    # translation-equivariant net could not)
    torch.manual_seed(0)
    enc = ImageEncoder(in_channels=1, resolution=8, base_channels=8, embed_dim=4)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        quad = torch.randint(0, 4, (n,), generator=g)
        r = (quad // 2) * 4 + torch.randint(0, 3, (n,), generator=g)
        c = (quad % 2) * 4 + torch.randint(0, 3, (n,), generator=g)
        x = torch.full((n, 1, 8, 8), -1.0)
        for i in range(n):
            x[i, 0, r[i]:r[i] + 2, c[i]:c[i] + 2] = 1.0
        return x, quad

    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(60):
        x, y = batch(64)
        loss = F.cross_entropy(enc(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(256)
    with torch.no_grad():
        acc = (enc(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc


def test_encoder_presets_sizes_and_registration():
    assert NETWORKS["TextTransformer"] is TextTransformer and NETWORKS["ImageEncoder"] is ImageEncoder
    total = 0
    for name in ("text-s", "imgenc-32"):
        cls, kw = TEXT_PRESETS[name]
        net = cls(**({"vocab_size": 25} if cls is TextTransformer else {}), **kw)
        total += count_parameters(net)
    assert 0.5e6 < total < 2e6, total
    cls, kw = TEXT_PRESETS["text-s"]
    assert kw["width"] == 128 and kw["layers"] == 4
    # described like every network: all constructor arguments, rebuilt identically
    desc = {"class": "TextTransformer", "kwargs": {"vocab_size": VOCAB, **kw}}
    assert isinstance(from_description(desc), TextTransformer)


# ---- MM-DiT

def test_mmdit_shapes_any_grid_and_unconditional():
    net = perturb_(tiny_mmdit())
    ctx, mask = context()
    emb = torch.randn(3, 10)
    for H, W in [(8, 8), (4, 12), (6, 10)]:
        x = torch.randn(3, 4, H, W)
        assert net(x, torch.rand(3), emb, ctx, mask).shape == x.shape
    x = torch.randn(3, 4, 8, 8)
    assert net(x, torch.rand(3)).shape == x.shape  # no emb, no context
    assert net(x, torch.rand(3), emb, ctx).shape == x.shape  # context without mask: all real
    image_only = perturb_(tiny_mmdit(context_dim=0))
    assert image_only(x, torch.rand(3), emb).shape == x.shape
    assert all(b.c is None for b in image_only.blocks)
    with pytest.raises(ValueError, match="no text stream"):
        image_only(x, torch.rand(3), emb, ctx)
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(3, 4, 7, 8), torch.rand(3))
    with pytest.raises(ValueError, match=r"emb must have shape \(3, 10\)"):
        net(x, torch.rand(3), torch.randn(3, 9))
    with pytest.raises(ValueError, match="context_mask"):
        net(x, torch.rand(3), emb, ctx, mask.float())


def test_mmdit_positions_are_those_of_each_token_on_any_grid():
    net = tiny_mmdit()
    big = net.positions(6, 6)[0].reshape(6, 6, -1)
    torch.testing.assert_close(net.positions(4, 4), net.pos, rtol=0, atol=0)
    torch.testing.assert_close(net.positions(2, 5)[0], big[:2, :5].reshape(10, -1), rtol=0, atol=0)


def test_mmdit_outputs_zero_at_init_and_trains_every_parameter():
    net = tiny_mmdit()
    ctx, mask = context()
    x, emb = torch.randn(3, 4, 8, 8) * 3, torch.randn(3, 10)
    out = net(x, torch.tensor([0.1, 0.5, 0.9]), emb, ctx, mask)
    assert torch.equal(out, torch.zeros_like(out))
    # adaLN-Zero: the first steps open the gates one after the other (the final linear, then the
    # gates, then what they gate; the text stream of block 0 reaches the output only through the
    # image keys of block 1); after a few every parameter of both streams gets a gradient
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    for _ in range(4):
        loss = (net(x, torch.rand(3), emb, ctx, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, dead


def test_last_mmdit_block_has_no_text_outputs():
    net = tiny_mmdit()
    *joint, last = net.blocks
    names = {n for n, _ in last.c.named_parameters()}
    assert not any(n.startswith(("proj", "mlp", "q_norm")) for n in names), names
    assert last.c.ada.out_features == 2 * 32 and last.c.qkv.out_features == 2 * 32  # shift/scale; k, v
    for b in joint:
        assert b.c.ada.out_features == 6 * 32 and hasattr(b.c, "mlp") and hasattr(b.c, "proj")
    ctx, mask = context(dtype=torch.float32)
    x, c = torch.randn(3, 16, 32), net.context_in(ctx)
    out_x, out_c = last(x, c, torch.randn(3, 32), mask)
    assert out_x.shape == x.shape and out_c is None


def _direct_block(block: JointBlock, x, c, emb, mask, D, heads):
    """One joint block written out per example: adaLN, per-head RMSNorm of q and k, softmax over
    the concatenation [image tokens, real text tokens] (padding keys dropped, not masked)."""
    d = D // heads

    def rms(t, w):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w

    def pre(s: Stream, h, e):
        mods = s.ada(F.silu(e)).split(D)  # shift, scale, gate (attn), shift, scale, gate (mlp)
        n = F.layer_norm(h, (D,), eps=1e-6) * (1 + mods[1]) + mods[0]
        parts = s.qkv(n).reshape(len(h), -1, heads, d).permute(1, 2, 0, 3)  # (3 or 2, heads, N, d)
        if s.output:
            q, k, v = parts
            return rms(q, s.q_norm.weight), rms(k, s.k_norm.weight), v, mods
        k, v = parts
        return None, rms(k, s.k_norm.weight), v, mods

    def post(s: Stream, h, out, mods):
        h = h + mods[2] * s.proj(out.transpose(0, 1).reshape(len(h), D))
        n = F.layer_norm(h, (D,), eps=1e-6) * (1 + mods[4]) + mods[3]
        return h + mods[5] * s.mlp(n)

    xs, cs = [], []
    for b in range(len(x)):
        keep = mask[b]
        qx, kx, vx, mx = pre(block.x, x[b], emb[b])
        qc, kc, vc, mc = pre(block.c, c[b], emb[b])
        k, v = torch.cat([kx, kc[:, keep]], 1), torch.cat([vx, vc[:, keep]], 1)  # (heads, N + L_real, d)
        q = qx if qc is None else torch.cat([qx, qc], 1)
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v  # (heads, N [+ L], d)
        N = len(x[b])
        xs.append(post(block.x, x[b], out[:, :N], mx))
        cs.append(post(block.c, c[b], out[:, N:], mc) if qc is not None else None)
    return torch.stack(xs), (torch.stack(cs) if cs[0] is not None else None)


@pytest.mark.parametrize("which", [0, -1])
def test_joint_attention_block_equals_softmax_over_the_concatenation(which):
    net = perturb_(tiny_mmdit(), scale=0.2).double()
    block = net.blocks[which]
    ctx, mask = context(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(3, 16, 32, generator=g, dtype=torch.float64), net.context_in(ctx)
    emb = torch.randn(3, 32, generator=g, dtype=torch.float64)
    got_x, got_c = block(x, c, emb, mask)
    want_x, want_c = _direct_block(block, x, c, emb, mask, D=32, heads=4)
    # layers.RMSNorm computes in float32 even for float64 inputs, so q and k carry float32 rounding
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x, want_x, **tol)
    if which == -1:
        assert got_c is None and want_c is None
    else:
        # padding text rows get outputs too (nothing reads them); compare the real ones
        torch.testing.assert_close(got_c[mask], want_c[mask], **tol)


def test_mmdit_padding_text_tokens_do_not_change_the_output():
    net = perturb_(tiny_mmdit()).eval()
    ctx, mask = context()
    x, emb, t = torch.randn(3, 4, 8, 8), torch.randn(3, 10), torch.rand(3)
    out = net(x, t, emb, ctx, mask)
    garbage = ctx.clone()
    garbage[~mask] = 100 * torch.randn(int((~mask).sum()), CTX)
    assert torch.equal(net(x, t, emb, garbage, mask), out)
    # and the real text tokens, the pooled vector and the noise level all matter
    real = ctx.clone()
    real[0, 0] += 1.0
    for other in (net(x, t, emb, real, mask), net(x, t, emb + 1, ctx, mask), net(x, t + 0.3, emb, ctx, mask),
                  net(x, t, emb)):
        assert (other - out).abs().max() > 1e-4 * out.abs().max()


def test_mmdit_preset_registration_and_size():
    assert NETWORKS["MMDiT"] is MMDiT and PRESETS["mmdit-s"][0] is MMDiT
    desc = describe("mmdit-s")
    assert desc["class"] == "MMDiT" and desc["kwargs"]["context_dim"] == 128
    net = build("mmdit-s")
    assert 1e6 < count_parameters(net) < 3e6
    assert net.emb_dim == 128 and net.context_dim == 128 and (net.in_channels, net.input_size) == (4, 8)


def test_mmdit_bf16_autocast_and_gradient_checkpointing():
    net = perturb_(tiny_mmdit())
    ckpt = tiny_mmdit(gradient_checkpointing=True)
    ckpt.load_state_dict(net.state_dict())
    ctx, mask = context()
    x, emb, t = torch.randn(3, 4, 8, 8), torch.randn(3, 10), torch.rand(3)
    with torch.no_grad():
        full = net(x, t, emb, ctx, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, emb, ctx, mask)
    assert ((low.float() - full).norm() / full.norm()) < 0.05
    grads = []
    for m in (net, ckpt):
        m.train()
        (m(x, t, emb, ctx, mask) ** 2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---- UNet cross-attention

# sha256 of the "key shape" lines of each UNet preset's state_dict, taken from the UNet before
# cross-attention existed (commit 9c5723a): saved models must keep loading
UNET_STATE_FINGERPRINTS = {
    "unet-digits": (128, "8c14a371efd44f6e5f271ee35df619f029ed93f036a9cd6e7c1e91be4815c00a"),
    "unet-32": (166, "f430edbd2485d01e6b31a14d1c26c2d74017c7fd26484ff1d0545e9a9b1b4ba1"),
    "unet-cifar": (304, "e7853a5e4304b0eac0788710da909cf4521e27a93583dbfb16db5393d79aa4b2"),
}
UNET_BEFORE_CROSS_ATTENTION = "9c5723a98dfd16ed353227d7081d47a739098c7d"


def test_unet_presets_keep_their_state_dict_keys():
    unets = sorted(n for n, (cls, _) in PRESETS.items() if cls is UNet)
    assert unets == sorted(UNET_STATE_FINGERPRINTS)
    for name in unets:
        cls, kw = PRESETS[name]
        with torch.device("meta"):  # shapes only: the 38M-param preset costs nothing
            sd = cls(**kw).state_dict()
        lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sd.items())
        assert (len(sd), hashlib.sha256(lines.encode()).hexdigest()) == UNET_STATE_FINGERPRINTS[name], name


def _fill_by_name(net):
    """Weights drawn from a generator seeded by each parameter's name: independent of creation order."""
    with torch.no_grad():
        for k, p in net.state_dict().items():
            if p.is_floating_point():
                g = torch.Generator().manual_seed(int(hashlib.sha256(k.encode()).hexdigest()[:8], 16))
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# sum and sum of squares of the outputs without and with an extra embedding, computed in float64 by the UNet
# as it was before cross-attention (git show UNET_BEFORE_CROSS_ATTENTION:src/unifusion/networks/unet.py),
# with _fill_by_name weights and the inputs below
UNET_BEFORE_OUTPUTS = {
    "unet-digits": [-1.010732240560484, 0.009802295735736728, -0.97816288570723, 0.009445205498348841],
    "unet-32": [4.552882513507214, 0.0885676375506329, 4.503670475542136, 0.08528951476281413],
    "unet-cifar": [2.2992940762374974, 0.03228289340849107, 2.452977645142977, 0.03816258356165883],
}


@pytest.mark.parametrize("name", ["unet-digits", "unet-32", "unet-cifar"])
def test_unet_without_context_is_exactly_the_old_unet(name):
    shrink = {"unet-digits": dict(model_channels=8),
              "unet-32": dict(model_channels=8, resolution=8, attn_resolutions=(2,), num_heads=2),
              "unet-cifar": dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, resolution=8,
                                 attn_resolutions=(4,), num_heads=2)}[name]
    _, kw = PRESETS[name]
    kw = {**kw, **shrink}
    new = _fill_by_name(UNet(**kw).double()).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, kw["in_channels"], kw["resolution"], kw["resolution"], generator=g, dtype=torch.float64)
    c = torch.rand(2, generator=g, dtype=torch.float64)
    emb = torch.randn(2, new.emb_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        a, b = new(x, c), new(x, c, emb)
    got = [float(a.sum()), float((a * a).sum()), float(b.sum()), float((b * b).sum())]
    assert got == pytest.approx(UNET_BEFORE_OUTPUTS[name], rel=1e-9, abs=1e-12)  # float64 summation order


def test_unet_cross_attention_shapes_masking_and_zero_init():
    plain = perturb_(tiny_unet())
    net = tiny_unet(context_dim=CTX)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".cross." in k for k in missing)
    crosses = [m for m in net.modules() if isinstance(m, CrossAttnBlock)]
    assert len(crosses) == 4  # every attention block: encoder 1, middle 1, decoder 2 at 4x4
    x, c = torch.randn(3, 3, 8, 8), torch.rand(3)
    ctx, mask = context()
    with torch.no_grad():
        base = plain(x, c)
        # zero-init output projection: at init the context changes nothing; without context the
        # cross-attention is skipped
        assert torch.equal(net(x, c), base)
        torch.testing.assert_close(net(x, c, None, ctx, mask), base, rtol=0, atol=0)
        perturb_(net)
        out = net(x, c, None, ctx, mask)
        assert out.shape == x.shape
        garbage = ctx.clone()
        garbage[~mask] = 100 * torch.randn(int((~mask).sum()), CTX)
        assert torch.equal(net(x, c, None, garbage, mask), out)
        real = ctx.clone()
        real[:, 0] += 1.0
        assert (net(x, c, None, real, mask) - out).abs().max() > 1e-4 * out.abs().max()
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, c, None, ctx, mask)
    with pytest.raises(ValueError, match=r"context must have shape \(3, L, 12\)"):
        net(x, c, None, torch.randn(3, L, 5))


def test_cross_attention_equals_masked_softmax_and_checkpointing_agrees():
    block = perturb_(CrossAttnBlock(8, CTX, num_heads=2), scale=0.3).double()
    x = torch.randn(3, 8, 2, 3, dtype=torch.float64)
    ctx, mask = context(dtype=torch.float64)
    got = block(x, ctx, mask)
    for b in range(3):
        t = F.layer_norm(x[b].flatten(1).T, (8,), block.norm.weight, block.norm.bias)  # (6, 8)
        q = block.q(t).reshape(6, 2, 4).transpose(0, 1)  # (heads, 6, 4)
        k, v = block.kv(ctx[b, mask[b]]).reshape(-1, 2, 2, 4).permute(1, 2, 0, 3)  # (heads, L_real, 4)
        out = (torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(0, 1).reshape(6, 8)
        want = x[b] + block.proj(out).T.reshape(8, 2, 3)
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-12)
    # gradient checkpointing passes the context through
    net = perturb_(tiny_unet(context_dim=CTX))
    ck = tiny_unet(context_dim=CTX, gradient_checkpointing=True)
    ck.load_state_dict(net.state_dict())
    xx, cc = torch.randn(2, 3, 8, 8), torch.rand(2)
    ctx2, mask2 = context(batch=2)
    grads = []
    for m in (net, ck):
        m.train()
        (m(xx, cc, None, ctx2, mask2) ** 2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(net(xx, cc, None, ctx2, mask2)).all()
