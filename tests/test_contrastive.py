"""CLIP / SigLIP per-example losses: chunked == full-matrix reference, rows split over ranks ==
one process, a real 2-process gloo run, the minimum at aligned features, the init constants."""
import math

import pytest
import torch
import torch.nn.functional as F

from unifusion import contrastive as C

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

B, D = 10, 6


def features(seed=0, b=B, d=D):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)  # correlated pairs
    return img.requires_grad_(), txt.requires_grad_()


def scalars(scale, bias=None):
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    return (s,) if bias is None else (s, torch.tensor(bias, dtype=torch.float64, requires_grad=True))


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


def by_hand_clip(img, txt, t):
    # CLIP written out per pair: -log softmax of the positive in each row and each column
    logits = [[t * float(img[i] @ txt[j]) for j in range(len(img))] for i in range(len(img))]
    rows = [math.log(sum(math.exp(v) for v in logits[i])) - logits[i][i] for i in range(len(img))]
    cols = [math.log(sum(math.exp(logits[j][i]) for j in range(len(img)))) - logits[i][i] for i in range(len(img))]
    return sum(rows + cols) / (2 * len(img))


def test_naive_references_match_the_formulas_written_out():
    img, txt = features()
    with torch.no_grad():
        t = 3.0
        assert C.clip_loss_naive(img, txt, torch.tensor(math.log(t), dtype=torch.float64)).item() == \
            pytest.approx(by_hand_clip(img, txt, t), rel=1e-12)
        # the clamp: log 1000 acts as log 100
        assert C.clip_loss_naive(img, txt, torch.tensor(math.log(1000.0), dtype=torch.float64)).item() == \
            pytest.approx(by_hand_clip(img, txt, 100.0), rel=1e-10)
        b = -2.0
        want = sum(-math.log(1 / (1 + math.exp(-(1 if i == j else -1) * (t * float(img[i] @ txt[j]) + b))))
                   for i in range(B) for j in range(B)) / B
        got = C.siglip_loss_naive(img, txt, torch.tensor(math.log(t), dtype=torch.float64),
                                  torch.tensor(b, dtype=torch.float64))
        assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 7, B, B + 5])
def test_chunked_clip_rows_equal_the_naive_loss_and_its_gradients(chunk):
    img, txt = features()
    (s,) = scalars(2.5)
    want = C.clip_loss_naive(img, txt, s)
    rows = C.clip_loss_rows(img, txt, img, txt, 0, s, chunk=chunk)
    assert rows.shape == (B,)
    torch.testing.assert_close(rows.mean(), want, rtol=1e-12, atol=0)
    for a, b in zip(grads(rows.mean(), img, txt, s), grads(want, img, txt, s)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 7, B, B + 5])
def test_chunked_siglip_rows_equal_the_naive_loss_and_its_gradients(chunk):
    img, txt = features()
    s, b = scalars(1.7, -3.0)
    want = C.siglip_loss_naive(img, txt, s, b)
    rows = C.siglip_loss_rows(img, txt, 0, s, b, chunk=chunk)
    assert rows.shape == (B,)
    torch.testing.assert_close(rows.mean(), want, rtol=1e-12, atol=0)
    for a, g in zip(grads(rows.mean(), img, txt, s, b), grads(want, img, txt, s, b)):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("ranks,chunk", [(2, None), (2, 3), (5, 1), (5, 4)])
def test_rows_split_over_simulated_ranks_give_the_full_batch_loss_and_gradients(loss, ranks, chunk):
    # rank k holds rows [k*b, (k+1)*b) and sees the global matrices, as after gather_features.
    # With shared leaves, backward of sum_k mean_k / K is what DDP computes: all_gather's backward
    # sums every rank's gradient into the owner, DDP averages over the K ranks (see the gloo test)
    img, txt = features(seed=3)
    s, bias = scalars(2.0, -1.5)
    b = B // ranks
    total, means = 0.0, 0.0
    for k in range(ranks):
        o = k * b
        if loss == "clip":
            rows = C.clip_loss_rows(img[o:o + b], txt[o:o + b], img, txt, o, s, chunk=chunk)
        else:
            rows = C.siglip_loss_rows(img[o:o + b], txt, o, s, bias, chunk=chunk)
        assert rows.shape == (b,)
        total = total + rows.sum() / B
        means = means + rows.mean() / ranks
    want = C.clip_loss_naive(img, txt, s) if loss == "clip" else C.siglip_loss_naive(img, txt, s, bias)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(means, want, rtol=1e-12, atol=0)
    leaves = (img, txt, s) if loss == "clip" else (img, txt, s, bias)
    for a, g in zip(grads(total, *leaves), grads(want, *leaves)):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_chunked_rows_keep_no_similarity_block_for_backward(loss):
    # what autograd stores between forward and backward: with chunk = 8 nothing as large as this
    # rank's (B_local, B) similarity rows (the blocks are recomputed in backward); without a chunk
    # the (B_local, B) logits are stored
    b_local, b, d = 16, 64, 4
    img, txt = features(b=b, d=d)
    s, bias = scalars(1.0, -1.0)
    for chunk, stores_rows in ((8, False), (None, True)):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if loss == "clip":
                rows = C.clip_loss_rows(img[:b_local], txt[:b_local], img, txt, 0, s, chunk=chunk)
            else:
                rows = C.siglip_loss_rows(img[:b_local], txt, 0, s, bias, chunk=chunk)
        assert (max(sizes) >= b_local * b) == stores_rows, (chunk, max(sizes))
        rows.mean().backward()  # and the recomputation works
        assert img.grad is not None and torch.isfinite(img.grad).all()
        img.grad = None


def test_rows_reject_an_offset_outside_the_batch():
    img, txt = features()
    (s,) = scalars(1.0)
    with pytest.raises(ValueError, match="do not fit"):
        C.clip_loss_rows(img[:4], txt[:4], img, txt, 8, s)
    with pytest.raises(ValueError, match="do not fit"):
        C.siglip_loss_rows(img[:4], txt, -1, s, s)
    with pytest.raises(ValueError, match="chunk"):
        C.siglip_loss_rows(img, txt, 0, s, s, chunk=0)


def test_losses_are_smallest_for_aligned_features():
    # orthonormal pairs x_i = y_i = e_i: every positive has similarity 1, every negative 0, the
    # closed forms below; any perturbation of the texts (or a permutation of the pairs) costs more
    b, t, bias = 6, 5.0, -2.0
    e = torch.eye(b, 8, dtype=torch.float64)
    ls, lb = torch.tensor(math.log(t), dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    clip_best = C.clip_loss_rows(e, e, e, e, 0, ls)
    siglip_best = C.siglip_loss_rows(e, e, 0, ls, lb)
    torch.testing.assert_close(clip_best, torch.full((b,), math.log(math.exp(t) + b - 1) - t, dtype=torch.float64))
    want = math.log1p(math.exp(-(t + bias))) + (b - 1) * math.log1p(math.exp(bias))
    torch.testing.assert_close(siglip_best, torch.full((b,), want, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = F.normalize(e + 0.3 * torch.randn(b, 8, generator=g, dtype=torch.float64), dim=1)
        assert C.clip_loss_naive(e, other, ls) > clip_best.mean()
        assert C.siglip_loss_naive(e, other, ls, lb) > siglip_best.mean()
    perm = torch.roll(torch.arange(b), 1)
    assert C.clip_loss_naive(e, e[perm], ls) > clip_best.mean() + 1
    assert C.siglip_loss_naive(e, e[perm], ls, lb) > siglip_best.mean() + 1


def test_init_constants_are_clip_and_siglip_ones():
    assert math.exp(C.CLIP_LOGIT_SCALE_INIT) == pytest.approx(1 / 0.07)
    assert math.exp(C.LOGIT_SCALE_MAX) == pytest.approx(100.0)
    # open_clip SigLIP: init_logit_scale = log(10), init_logit_bias = -10
    assert C.SIGLIP_LOGIT_SCALE_INIT == math.log(10) and C.SIGLIP_LOGIT_BIAS_INIT == -10.0
    # the point of b = -10 (SigLIP §3.2): at init every pair reads as a likely negative, so the
    # B - 1 negatives per row cost little and the first steps are not dominated by them
    img, txt = features(b=16, d=32)
    with torch.no_grad():
        rows = C.siglip_loss_rows(img, txt, 0, torch.tensor(C.SIGLIP_LOGIT_SCALE_INIT, dtype=torch.float64),
                                  torch.tensor(C.SIGLIP_LOGIT_BIAS_INIT, dtype=torch.float64))
    assert (rows < 0.1 * 16 + 20).all()


def test_gather_features_is_the_identity_with_one_process():
    x = torch.randn(3, 4)
    assert C.gather_features(x) is x and C.rank_offset(3) == 0


# ---- a real 2-process run (gloo): gathered, chunked per-rank losses == one process on the full batch

WORLD, B_LOCAL, IN_DIM = 2, 3, 5


def _encoders():
    torch.manual_seed(0)
    return torch.nn.Linear(IN_DIM, D).double(), torch.nn.Linear(IN_DIM, D).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(WORLD * B_LOCAL, IN_DIM, generator=g, dtype=torch.float64),
            torch.randn(WORLD * B_LOCAL, IN_DIM, generator=g, dtype=torch.float64))


def _losses(img_net, txt_net, xi, xt, gather, chunk):
    """(clip rows, siglip rows, (scale, bias)) of these inputs, features gathered by `gather`
    (the identity: the whole batch in one process)."""
    scale = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    img, txt = F.normalize(img_net(xi), dim=1), F.normalize(txt_net(xt), dim=1)
    img_all, txt_all = gather(img), gather(txt)
    o = C.rank_offset(img.shape[0]) if gather is C.gather_features else 0
    clip = C.clip_loss_rows(img, txt, img_all, txt_all, o, scale, chunk=chunk)
    siglip = C.siglip_loss_rows(img, txt_all, o, scale, bias, chunk=chunk)
    return clip, siglip, (scale, bias)


def _flat_grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def _worker(rank, path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        img_net, txt_net = _encoders()
        xi, xt = _data()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        params = list(img_net.parameters()) + list(txt_net.parameters())
        clip, siglip, extra = _losses(img_net, txt_net, xi[rows], xt[rows], C.gather_features, chunk=2)
        assert C.gather_features(xi[rows]).shape == xi.shape and C.rank_offset(B_LOCAL) == rank * B_LOCAL
        for name, local in (("clip", clip), ("siglip", siglip)):
            scalars_used = list(extra[:1] if name == "clip" else extra)  # CLIP has no bias
            g = _flat_grads(local.mean(), params + scalars_used)
            dist.all_reduce(g)  # DDP's gradient average
            g /= WORLD
            # the reference: one process, the whole batch, no gather, no chunks
            c1, s1, e1 = _losses(img_net, txt_net, xi, xt, lambda x: x, chunk=None)
            full = c1 if name == "clip" else s1
            want = _flat_grads(full.mean(), params + list(e1[:len(scalars_used)]))
            mean = local.mean().detach().clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(mean / WORLD, full.mean().detach(), rtol=1e-12, atol=0, msg=name)
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12, msg=name)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_gathered_chunked_loss_equals_one_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    assert dist.is_available()  # the CPU build ships gloo
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
