"""Packed variable-size batches (networks/packing.py, models/packing.py, data/packing.py) and the token
mixers (networks/attention.py).

A packed forward is checked against each image's own forward (float64, CPU) for DiT and MM-DiT, every
mixer and every attention backend, gradients included; the packed loss against the per-image losses;
linear attention and GAU against their quadratic forms written out here; the token-budget order against
its definition under several ranks and on resume; sampling at requested sizes; and every bad input of the
issue as one clear error."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unifusion import cli, models, networks
from unifusion import config as C
from unifusion.data.packing import PackedSource, TokenBudgetOrder
from unifusion.data.source import ArrayDataset
from unifusion.models.spec import ModelSpec
from unifusion.networks import attention as A
from unifusion.networks.dit import DiT
from unifusion.networks.mmdit import MMDiT
from unifusion.networks.packing import (
    Pack,
    Segments,
    pack_list,
    unpack_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZES = [(8, 8), (4, 12), (12, 4), (8, 8), (6, 10)]  # (h, w): squares, both aspect ratios, a repeated size
BACKENDS = ["dense", "grouped", "nested", "flex"]
CASES = ([("softmax", "relu", b) for b in BACKENDS] + [("linear", "relu", None), ("linear", "elu", None),
                                                      ("gau", "relu", None)])


def _perturbed(net, seed=1, scale=0.2):
    """adaLN-Zero nets are the identity at init: move every weight so the comparison means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _inputs(n_ctx=8, emb=32):
    g = torch.Generator().manual_seed(2)
    imgs = [torch.randn(3, h, w, generator=g, dtype=torch.float64) for h, w in SIZES]
    n = len(SIZES)
    c = torch.rand(n, generator=g, dtype=torch.float64)
    e = torch.randn(n, emb, generator=g, dtype=torch.float64)
    ctx = torch.randn(n, 5, n_ctx, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1, 4, 2])[:, None]
    weights = [torch.randn(3, h, w, generator=g, dtype=torch.float64) for h, w in SIZES]
    return imgs, c, e, ctx, mask, weights


def _grads(net, loss):
    net.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("attention,feature_map,backend", CASES)
@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_packed_forward_equals_per_image_forwards_with_gradients(kind, attention, feature_map, backend):
    torch.manual_seed(0)
    common = {"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 2, "num_heads": 4,
              "attention": attention, "feature_map": feature_map, "chunk_size": 8}
    if kind == "dit":
        net = _perturbed(DiT(qk_norm="rms", **common).double())
        extra, per = (dict), (lambda i: {})
        imgs, c, e, ctx, mask, wts = _inputs()
    else:  # depth 2: a joint block and the last block, whose text stream is keys and values only
        net = _perturbed(MMDiT(context_dim=8, emb_dim=16, **common).double())
        imgs, c, e, ctx, mask, wts = _inputs(emb=16)
        extra = lambda: {"context": ctx, "context_mask": mask}
        per = lambda i: {"context": ctx[i:i + 1], "context_mask": mask[i:i + 1]}
    tokens, pack = pack_list(imgs, 2)
    grad = backend != "flex"  # FlexAttention has no CPU backward in torch 2.13: forward only (and an error, below)
    with torch.set_grad_enabled(grad):
        out = unpack_images(net(tokens, c, e, pack=pack, backend=backend, **extra()), pack)
        singles = [net(im[None], c[i:i + 1], e[i:i + 1], **per(i))[0] for i, im in enumerate(imgs)]
    for i, (h, w) in enumerate(SIZES):
        torch.testing.assert_close(out[i, :, :h, :w], singles[i], rtol=1e-5, atol=1e-5)
        assert out[i, :, h:].abs().sum() == 0 and out[i, :, :, w:].abs().sum() == 0  # nothing outside an image
    if not grad:
        with pytest.raises(ValueError, match="no backward pass on CPU"):
            net(tokens, c, e, pack=pack, backend="flex", **extra())
        return
    g_packed = _grads(net, sum((out[i, :, :h, :w] * wts[i]).sum() for i, (h, w) in enumerate(SIZES)))
    g_single = _grads(net, sum((singles[i] * wts[i]).sum() for i in range(len(SIZES))))
    for a, b in zip(g_packed, g_single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pack_layout_round_trip_and_positions():
    imgs = [torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w) for h, w in SIZES]
    tokens, pack = pack_list(imgs, 2)
    assert tokens.shape == (sum(h * w // 4 for h, w in SIZES), 12) and pack.T == len(tokens)
    assert pack.grids.tolist() == [[h // 2, w // 2] for h, w in SIZES]
    back = unpack_images(tokens, pack)
    for i, (h, w) in enumerate(SIZES):
        assert torch.equal(back[i, :, :h, :w], imgs[i])
    # token t of image i is patch (row, col) of its own grid, row-major; its features are (p, p, C)
    i, t = 1, 5  # image (4, 12): grid 2 x 6, token 5 = (0, 5)
    assert pack.pos[pack.first[i] + t].tolist() == [0, 5]
    assert torch.equal(tokens[pack.first[i] + t], imgs[i][:, 0:2, 10:12].permute(1, 2, 0).reshape(-1))
    assert torch.equal(pack.segment_mean(torch.ones(pack.T)), torch.ones(len(SIZES)))


def test_linear_attention_and_gau_equal_their_quadratic_forms():
    """The kernels against the formulas written with the full N x N matrix (attention.py's docstring)."""
    g = torch.Generator().manual_seed(0)
    N, h, d = 11, 2, 4
    q, k, v = (torch.randn(1, N, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    for fmap, phi in (("relu", F.relu), ("elu", lambda x: F.elu(x) + 1)):
        s = torch.einsum("bnhd,bmhd->bhnm", phi(q), phi(k))  # (1, h, N, N)
        ref = torch.einsum("bhnm,bmhd->bnhd", s, v) / (s.sum(-1).transpose(1, 2)[..., None] + A.LINEAR_EPS)
        torch.testing.assert_close(A.mix("linear", q, k, v, feature_map=fmap), ref, rtol=1e-10, atol=1e-12)
    sdim, e, c = 4, 3, 4
    qg, kg = (torch.randn(1, N, 2, sdim, generator=g, dtype=torch.float64) for _ in range(2))
    vg = torch.randn(1, N, 1, e, generator=g, dtype=torch.float64)
    chunk = torch.arange(N) // c
    same = (chunk[:, None] == chunk[None, :]).double()
    quad = (F.relu(qg[0, :, 0] @ kg[0, :, 0].T / math.sqrt(sdim)) ** 2 / c * same) @ vg[0, :, 0]
    lin = qg[0, :, 1] @ (kg[0, :, 1].T @ vg[0, :, 0]) / N
    torch.testing.assert_close(A.mix("gau", qg, kg, vg, chunk_size=c)[0, :, 0], quad + lin, rtol=1e-10, atol=1e-12)


def test_attention_backends_agree_with_masked_keys():
    """Queries and keys in different orders, a masked key: every backend gives the dense reference."""
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([1, 0, 1, 2, 0, 2, 2, 1])
    kv_ids = torch.tensor([0, 1, 2, -1, 1, 0, 2, 2, 1])
    local = torch.tensor([0, 0, 1, 0, 1, 1, 2, 2])
    kv_local = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    seg = Segments(ids, local, 3, kv_ids, kv_local)
    q = torch.randn(8, 2, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(9, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ref = networks.packing.attend(q, k, v, seg, "dense")
    for b in ("grouped", "nested", "flex"):
        torch.testing.assert_close(networks.packing.attend(q, k, v, seg, b), ref, rtol=1e-10, atol=1e-12)


def _model(attention="softmax", classes=5):
    spec = ModelSpec(family="diffusion", network=networks.describe(
        "dit-s2", input_size=12, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
        attention=attention), data={"kind": "pixel", "shape": [3, 12, 12], "range": [-1.0, 1.0]},
        conditioning={"kind": "class", "num_classes": classes, "drop": 0.5}).validate()
    return _perturbed(models.build(spec).double(), scale=0.1)


def _carrier(sizes, g):
    x0 = torch.zeros(len(sizes), 3, 12, 12, dtype=torch.float64)
    for i, (h, w) in enumerate(sizes.tolist()):
        x0[i, :, :h, :w] = torch.rand(3, h, w, generator=g, dtype=torch.float64) * 2 - 1
    return x0


@pytest.mark.parametrize("attention", ["softmax", "gau"])
def test_packed_loss_is_the_mean_of_per_image_losses(attention):
    """Slots of several sizes and empty slots: the loop's mean equals the mean of each image's own loss
    (the fixed-size path at its own size, with the same draws, dropout included)."""
    m = _model(attention)
    g = torch.Generator().manual_seed(1)
    sizes = torch.tensor([[12, 12], [4, 8], [0, 0], [8, 12], [6, 2], [0, 0]])
    x0 = _carrier(sizes, g)
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in m.random(6, torch.Generator().manual_seed(3)).items()}
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = m.loss({"x0": x0, "size": sizes, "cond": {"y": y}, **d})
    per = torch.cat([m.loss({"x0": x0[i:i + 1, :, :h, :w], "cond": {"y": y[i:i + 1]}, "sigma": d["sigma"][i:i + 1],
                             "noise": d["noise"][i:i + 1, :, :h, :w], "drop": d["drop"][i:i + 1]})
                     for i, (h, w) in enumerate(sizes.tolist()) if h])
    assert loss.shape == (6,) and (loss[sizes[:, 0] == 0] == 0).all()
    torch.testing.assert_close(loss.mean(), per.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss[sizes[:, 0] > 0] * 4 / 6, per, rtol=1e-12, atol=1e-12)


def _shapes_mixed(n=64):
    from unifusion.data import load
    return load(f"shapes-mixed-train:{n}")


def test_token_budget_order_is_exact_under_ranks_and_resume():
    src = PackedSource(_shapes_mixed(), unit=4, tokens=100)
    one = src.step_order(seed=7, batch_size=8)
    for step in range(12):  # 64 images make several epochs of steps
        g = one.global_step(step)
        assert 1 <= len(g) <= 8 and src.tokens[g].sum() <= 100
        assert g == TokenBudgetOrder(src.tokens, 7, 8, 100).global_step(step)  # a fresh (resumed) order agrees
        ranks = [src.step_order(7, 8, 2, r).indices(step) for r in range(2)]
        slots = [s for pair in zip(*ranks) for s in pair]  # rank r holds slots r, r + 2, ...
        assert [i for i, _, _ in slots if i >= 0] == g and all(m == len(g) for _, m, _ in slots)
    # an epoch's steps cover every image once (the permutation of (seed, epoch))
    e0, k = [], 0
    while len(e0) < len(src):
        e0 += one.global_step(k)
        k += 1
    assert sorted(e0) == list(range(len(src)))


def test_two_ranks_equal_one_rank_and_the_weights_keep_the_objective():
    """Each rank's slots with their rows of the global draws: the mean over ranks of each rank's mean loss
    (what DDP's gradient averages) is the one-rank mean, which is the mean over the step's images."""
    m = _model()
    src = PackedSource(ArrayDataset(torch.rand(10, 3, 12, 12) * 2 - 1, torch.arange(10) % 5, 5, kind="image",
                                    source="ten"), unit=2, tokens=80)  # 36 tokens each: 2 images per step
    B, step = 4, 3
    draws = {k: (v.double() if v.is_floating_point() else v) for k, v in m.random(B, torch.Generator().manual_seed(9)).items()}

    def rank_mean(world, r):
        b = src.batch(src.step_order(0, B, world, r).indices(step))
        b = {**b, "x0": b["x0"].double(), "weight": b["weight"].double(), **{k: v[r::world] for k, v in draws.items()}}
        return m.loss(b).mean()
    one = rank_mean(1, 0)
    torch.testing.assert_close((rank_mean(2, 0) + rank_mean(2, 1)) / 2, one, rtol=1e-12, atol=1e-12)
    b = src.batch(src.step_order(0, B, 1, 0).indices(step))
    assert int((b["size"][:, 0] > 0).sum()) == 2 and torch.allclose(b["weight"][:2], torch.tensor(2.0))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A tiny DiT trained packed on shapes of nine sizes (through the loop, 6 steps)."""
    out = tmp_path_factory.mktemp("mixed") / "run"
    torch.set_num_threads(1)
    cfg = C.from_dict({"data": "shapes-mixed-train:256", "network": "dit-s2", "network_args": {
        "input_size": 32, "patch_size": 4, "in_channels": 3, "hidden_size": 32, "depth": 1, "num_heads": 2},
        "pack_tokens": 192, "batch_size": 16, "steps": 6, "out": str(out), "log_every": 3, "checkpoint_every": 3,
        "sample_every": 0, "sample_nfe": 2, "warmup_steps": 1, "device": "cpu"})
    from unifusion.training import loop
    loop.train(cfg, progress=False)
    return out


def test_a_model_trained_on_mixed_sizes_samples_at_each(mixed_run):
    m = models.load(mixed_run)
    sizes = [tuple(s) for s in m.spec.data["sizes"]]
    assert sorted(sizes) == sorted((h, w) for h, w in __import__("unifusion.data.shapes", fromlist=["x"]).MIXED_SIZES)
    assert m.spec.training["packing"] == {"tokens": 192}
    for h, w in sizes:
        x = m.sample(seeds=[0, 1], nfe=2, size=(h, w))
        assert x.shape == (2, 3, h, w) and torch.isfinite(x).all()
    # a sample depends on its seed, not on the others drawn with it; the default size is the most frequent
    assert torch.equal(m.sample(seeds=[1], nfe=2, size=(16, 32)), m.sample(seeds=[0, 1], nfe=2, size=(16, 32))[1:])
    assert m.sample(seeds=[0], nfe=2).shape[2:] == sizes[0]


def test_sample_cli_at_a_requested_size(mixed_run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--checkpoint", str(mixed_run), "--n", "2", "--nfe", "2", "--size", "48x32",
                     "--out", str(out)]) == 0
    assert np.load(out)["x"].shape == (2, 3, 32, 48)  # WIDTHxHEIGHT
    assert cli.main(["sample", "--checkpoint", str(mixed_run), "--n", "2", "--size", "46x32",
                     "--out", str(tmp_path / "t.npz")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unifusion:")]
    assert len(err) == 1 and "--size 46x32" in err[0] and "multiples of 4" in err[0]
    assert not (tmp_path / "t.npz").exists()


def test_bad_inputs_are_one_clear_error(tmp_path):
    # an image larger than the token budget: named, with the budget
    with pytest.raises(ValueError, match=r"item \d+ is 32x32 .*64 tokens.*--pack-tokens 50"):
        PackedSource(_shapes_mixed(), unit=4, tokens=50)
    # sizes the patch does not divide: a packed forward refuses; the data crops (documented), the sampler refuses
    with pytest.raises(ValueError, match="image 1 of the pack is 5x4 .*patch size 2"):
        Pack(torch.tensor([[4, 4], [4, 5]]), 2)
    crop = PackedSource(ArrayDataset(torch.zeros(3, 3, 9, 7), kind="image", source="odd"), unit=2, tokens=100)
    assert crop.sizes[0].tolist() == [8, 6] and crop[(0, 1, 1)]["size"].tolist() == [8, 6]
    m = _model()
    with pytest.raises(ValueError, match="--size 7x8 .*multiples of 2"):
        m.sample(seeds=[0], nfe=1, size=(8, 7))
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        models.packing.parse_size("48by32")
    unet = models.build(ModelSpec(family="diffusion", network=networks.describe("unet-digits"),
                                  data={"kind": "pixel", "shape": [1, 8, 8], "range": [-1.0, 1.0]}).validate())
    with pytest.raises(ValueError, match="samples only at its trained size 8x8"):
        unet.sample(seeds=[0], nfe=1, size=(16, 16))
    # mixers and backends by name; packing needs a transformer; several sizes need packing
    with pytest.raises(ValueError, match="attention must be one of"):
        DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, attention="performer")
    with pytest.raises(ValueError, match="unknown packed attention backend"):
        networks.packing.set_backend("fast")
    base = {"steps": 1, "batch_size": 8, "out": str(tmp_path / "r")}
    with pytest.raises(ValueError, match="--pack-tokens needs a transformer"):
        C.model_spec(C.from_dict({**base, "data": "shapes-mixed-train:64", "pack_tokens": 64, "network": "unet-32"}),
                     _shapes_mixed())
    with pytest.raises(ValueError, match="several sizes: train them packed with --pack-tokens"):
        C.model_spec(C.from_dict({**base, "data": "shapes-mixed-train:64", "network": "dit-s2"}), _shapes_mixed())
    with pytest.raises(ValueError, match="several sizes"):
        _shapes_mixed().arrays(10)


class _PoolAE(torch.nn.Module):
    """A stand-in autoencoder: z = W avgpool_4(x), std 0.01, no normalisation (tests/test_latents.py's kind)."""
    factor, latent_channels, image_channels, image_size, path = 4, 2, 3, None, "pool-ae"
    shift, scale = [0.0, 0.0], [1.0, 1.0]

    def __init__(self):
        super().__init__()
        self.register_buffer("W", torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))

    def encode_posterior(self, x):
        mean = torch.einsum("kc,nchw->nkhw", self.W, F.avg_pool2d(x, 4))
        return mean, torch.full_like(mean, 0.01)

    def normalize(self, z):
        return z

    def latent_shape(self, image_shape):
        return (2, image_shape[1] // 4, image_shape[2] // 4)

    def describe(self):
        return {"kind": "unifusion", "path": self.path, "digest": "0" * 64, "factor": 4, "latent_channels": 2,
                "image_channels": 3, "image_size": None, "shift": self.shift, "scale": self.scale}


def test_latents_are_encoded_per_image_at_their_own_size(tmp_path):
    from unifusion.data.latents import LatentSource, encode_latents
    src, ae = _shapes_mixed(12), _PoolAE()
    encode_latents(ae, src, tmp_path / "lat", data="shapes-mixed-train:12", per_shard=5, batch_size=4, progress=False)
    lat = LatentSource(tmp_path / "lat")
    assert lat.variable_size and lat.shape == (2, 8, 8) and lat.image_shape == (3, 32, 32)
    assert (lat.sizes(range(12)) * 4).tolist() == src.sizes(range(12)).tolist()
    for i in (0, 3, 7):
        alone = ae.encode_posterior(src[i]["x0"][None])[0][0]  # this image alone, at its size
        torch.testing.assert_close(lat[i]["x0"], alone)
        assert torch.equal(lat[i]["cond"]["y"], src[i]["cond"]["y"])
    packed = PackedSource(lat, unit=2, tokens=16)  # latents 2x2..8x8 at patch 2: 1..16 tokens
    assert packed.tokens.max() <= 16 and packed[(3, 1, 1)]["x0"].shape == (2, 8, 8)


def test_image_folders_and_tar_shards_keep_each_size_capped_by_area(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from unifusion.data import load
    rng = np.random.default_rng(0)
    shapes = [(20, 30), (64, 16), (33, 33), (8, 8)]
    (tmp_path / "f").mkdir()
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for i, (h, w) in enumerate(shapes):
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            img.save(tmp_path / "f" / f"{i}.png")
            b = io.BytesIO()
            img.save(b, format="png")
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(b.getvalue())
            tf.addfile(info, io.BytesIO(b.getvalue()))
    want = [[20, 30], [48, 12], [24, 24], [8, 8]]  # areas over 600 scaled down, aspect ratio kept
    for spec in (tmp_path / "f", tmp_path / "a.tar"):
        s = load(str(spec), max_area=600)
        assert s.variable_size and s.shape == (3, 48, 30) and s.sizes(range(4)).tolist() == want
        assert [list(s[i]["x0"].shape[1:]) for i in range(4)] == want
        assert load(str(spec), keep_size=True).sizes(range(4)).tolist() == [list(v) for v in shapes]
    with pytest.raises(ValueError, match="--keep-size"):  # without keeping sizes: the old error says how
        load(str(tmp_path / "f"))[1]
    with pytest.raises(ValueError, match="give one"):
        load(str(tmp_path / "f"), image_size=16, keep_size=True)


PACKED_RUN = {"data": "shapes-mixed-train:64", "network": "dit-s2", "network.input_size": 32, "network.patch_size": 4,
              "network.in_channels": 3, "network.hidden_size": 32, "network.depth": 1, "network.num_heads": 2,
              "pack-tokens": 96, "batch-size": 8, "steps": 4, "checkpoint-every": 4, "sample-every": 0, "sample-nfe": 2,
              "log-every": 2, "warmup-steps": 1, "device": "cpu", "threads": 1}


def test_packed_training_two_ranks_and_accumulation_equal_one_rank_and_resume_is_exact(tmp_path):
    """The loop's packed steps under 2 gloo ranks (4 slots each), under 2 accumulation steps and resumed
    after step 2 give the weights of one uninterrupted rank."""
    import os
    import subprocess
    import sys

    from unifusion import checkpoint
    from unifusion.training import loop

    def args(out, **kw):
        return [f"--{k}={v}" for k, v in {**PACKED_RUN, **kw, "out": str(out)}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, "-m", "unifusion", "train", *args(tmp_path / "one")],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "unifusion", "train", *args(tmp_path / "two")],
            "accum": [sys.executable, "-m", "unifusion", "train", *args(tmp_path / "accum", **{"grad-accum": 2})]}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k, c in runs.items()}
    flat = {k.replace("-", "_"): v for k, v in PACKED_RUN.items() if "." not in k}
    net = {k.split(".")[1]: v for k, v in PACKED_RUN.items() if "." in k}
    first = C.from_dict({**flat, "network_args": net, "steps": 2, "out": str(tmp_path / "resumed")})
    loop.train(first, progress=False)  # meanwhile, in this process: 2 steps, then resume to 4
    loop.train(C.resumed(json.loads((tmp_path / "resumed" / "config.json").read_text()), {"steps": 4}),
               progress=False)
    for name, p in procs.items():
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, (name, text[-3000:])
    ref = checkpoint.load(tmp_path / "one")[0]["model"]
    for name in ("two", "accum", "resumed"):
        other = checkpoint.load(tmp_path / name)[0]["model"]
        for k in ref:
            torch.testing.assert_close(other[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
