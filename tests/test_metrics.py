"""Sample-quality metrics (evaluation/metrics.py) and feature extractors (evaluation/features.py).

Each metric is checked against an independent derivation: closed-form Frechet distances of
Gaussians, a double-loop MMD^2, brute-force k-NN balls, and data whose answer is known by
construction (copies, noise, half the modes).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from unifusion import data
from unifusion.evaluation import features as fx
from unifusion.evaluation import metrics as m


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rotation(d, rng):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


# ------------------------------------------------------------------------------- Frechet
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_frechet_matches_closed_form_for_commuting_covariances(rank_deficient):
    """C1 = R diag(a) R^T, C2 = R diag(b) R^T: d = ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2."""
    rng = _rng(1)
    d = 6
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    if rank_deficient:  # singular covariances, as with fewer samples than feature dims
        a[:2] = 0
        b[1:3] = 0
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    r = _rotation(d, rng)
    c1, c2 = r @ np.diag(a) @ r.T, r @ np.diag(b) @ r.T
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert m.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expect, rel=1e-9, abs=1e-9)
    assert m.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-9, abs=1e-9)


def test_frechet_general_covariances_match_sqrtm_of_product():
    """Non-commuting full-rank covariances: agree with scipy's sqrtm of C1 C2."""
    rng = _rng(2)
    d = 5
    x, y = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    got = m.frechet_distance(mu1, c1, mu2, c2)
    assert got == pytest.approx(expect, rel=1e-8)
    assert m.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(got, rel=1e-10)  # symmetric
    assert m.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-9)  # zero on itself
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert m.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_feature_stats_unbiased():
    x = _rng(3).standard_normal((50, 4))
    mu, cov = m.feature_stats(torch.from_numpy(x).float())
    assert mu.dtype == np.float64 and cov.shape == (4, 4)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-6)


def test_fid_small_for_same_gaussian_and_monotone_in_mean_shift():
    rng = _rng(4)
    d, n = 8, 2000
    ref = rng.standard_normal((n, d))
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    fids = [m.fid(ref, rng.standard_normal((n, d)) + s) for s in shifts]
    assert fids[0] < 0.05
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    # the mean term dominates: a shift s in every coordinate adds d s^2
    assert fids[-1] == pytest.approx(d * 4, rel=0.05)


# ------------------------------------------------------------------------------------ KID
def _mmd2_loop(x, y, degree=3, coef0=1.0):
    """Unbiased MMD^2 by its definition, with explicit sums over i != j."""
    g = 1.0 / x.shape[1]
    k = lambda u, v: (g * u @ v + coef0) ** degree  # noqa: E731
    n = len(x)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(n))
    return sxx / (n * (n - 1)) + syy / (n * (n - 1)) - 2 * sxy / n ** 2


def test_kid_matches_definition_on_one_full_subset():
    rng = _rng(5)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 3)) + 0.5
    # one subset holding every vector: the permutation does not change the estimate
    got = m.kid(x, y, subsets=1, subset_size=12)
    assert got.mean == pytest.approx(_mmd2_loop(x, y), rel=1e-10)


def test_kid_unbiased_near_zero_for_same_distribution_positive_for_shift():
    rng = _rng(6)
    d = 16
    a, b = rng.standard_normal((1000, d)), rng.standard_normal((1000, d))
    same = m.kid(a, b, subsets=30, subset_size=200, generator=0)
    assert abs(same.mean) < 3 * same.std, same
    shifted = m.kid(a, b + 0.5, subsets=30, subset_size=200, generator=0)
    assert shifted.mean > 10 * max(same.std, abs(same.mean)) and shifted.mean > 3 * shifted.std, shifted
    assert m.kid(a, b, subsets=5, subset_size=100, generator=1) == m.kid(a, b, subsets=5, subset_size=100, generator=1)


# ---------------------------------------------------------------------- precision / recall
def _pr_brute(real, fake, k):
    def radii(p):
        d = np.linalg.norm(p[:, None] - p[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def cover(q, c, r):
        return np.mean([(np.linalg.norm(c - qi, axis=1) <= r).any() for qi in q])

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    rng = _rng(7)
    real, fake = rng.standard_normal((60, 3)), rng.standard_normal((45, 3)) * 1.3 + 0.4
    got = m.precision_recall(real, fake, k=3, batch=7)  # batches that do not divide N
    assert got == pytest.approx(_pr_brute(real, fake, 3))


def test_precision_recall_identical_disjoint_and_half_the_modes():
    rng = _rng(8)
    x = rng.standard_normal((200, 4))
    assert m.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert m.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # ten tight modes on a circle; the fake set covers only five of them
    angles = 2 * math.pi * np.arange(10) / 10
    centers = 10 * np.stack([np.cos(angles), np.sin(angles)], 1)
    real = np.concatenate([c + 0.1 * rng.standard_normal((50, 2)) for c in centers])
    fake = np.concatenate([c + 0.1 * rng.standard_normal((100, 2)) for c in centers[:5]])
    p, r = m.precision_recall(real, fake, k=3)
    assert p > 0.95
    assert r == pytest.approx(0.5, abs=0.05)


# ------------------------------------------------------------------------------ copy rate
@pytest.fixture(scope="module")
def digits_train():
    return data.digits(split="train")


def test_copy_rate_copies_noise_and_mix(digits_train):
    train = digits_train.x  # (1500, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    copies = train[:100]
    noise = torch.rand(100, 1, 8, 8, generator=g) * 2 - 1
    full = m.copy_rate(copies, train)
    assert full.rate == 1.0
    np.testing.assert_array_equal(full.nearest, np.arange(100))
    assert np.allclose(full.distances, 0, atol=1e-6)
    assert m.copy_rate(noise, train).rate == 0.0
    mix = m.copy_rate(torch.cat([copies, noise]), train)
    assert mix.rate == 0.5
    # a copy with a little pixel noise is still a copy; a different digit image is not
    assert m.copy_rate((copies + 0.02 * torch.randn(copies.shape, generator=g)).clamp(-1, 1), train).rate > 0.95
    held_out = data.digits(split="test").x
    assert m.copy_rate(held_out, train).rate < 0.1


def test_copy_rate_with_duplicated_training_images():
    rng = _rng(9)
    train = rng.uniform(-1, 1, (20, 16))
    train = np.concatenate([train, train[:5]])  # exact duplicates must not zero the scale
    res = m.copy_rate(train[:5], train)
    assert res.rate == 1.0 and np.isfinite(res.ratios).all()


# ---------------------------------------------------------------------------- stats cache
def test_stats_cache_round_trip_without_pickle(tmp_path):
    x = _rng(10).standard_normal((100, 5))
    p = tmp_path / "ref" / "digits_stats.npz"
    written = m.cache_stats(p, x, meta={"data": "digits", "split": "train", "features": "digits-cnn"})
    loaded = m.load_stats(p)
    np.testing.assert_array_equal(loaded.mu, written.mu)
    np.testing.assert_array_equal(loaded.cov, written.cov)
    assert loaded.n == 100 and json.loads(loaded.meta)["split"] == "train"
    with np.load(p, allow_pickle=False) as f:  # every entry is a plain array
        assert sorted(f.files) == ["cov", "meta", "mu", "n"]
        assert all(f[k].dtype != object for k in f.files)
    y = _rng(11).standard_normal((80, 5)) + 0.3
    assert m.frechet_distance(loaded.mu, loaded.cov, *m.feature_stats(y)) == pytest.approx(m.fid(x, y))
    with pytest.raises(ValueError, match="npz"):
        m.cache_stats(tmp_path / "stats.pkl", x)


# ----------------------------------------------------------------------- digits features
@pytest.fixture(scope="module")
def digits_extractor():
    return fx.digits_features()


def test_shipped_digits_classifier_small_accurate_and_documented(digits_extractor):
    assert fx.DIGITS_WEIGHTS.stat().st_size < 1_000_000
    test = data.digits(split="test")
    acc = fx.digits_accuracy(test.x, test.y, digits_extractor)
    assert acc >= 0.95, acc  # measured 0.976 when the shipped weights were trained
    meta = digits_extractor.metadata
    assert meta["test_split"] == "test" and meta["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert "train_digits_classifier.py" in meta["command"]
    assert isinstance(digits_extractor, fx.FeatureExtractor)
    f = digits_extractor(test.x[:7])
    assert f.shape == (7, digits_extractor.dim) and digits_extractor.dim == 128


def test_digits_fid_separates_real_digits_from_noise(digits_extractor, digits_train):
    test = data.digits(split="test")
    g = torch.Generator().manual_seed(0)
    ref = fx.extract(digits_extractor, digits_train.x)
    real = fx.extract(digits_extractor, test.x)
    noise = fx.extract(digits_extractor, torch.rand(len(test), 1, 8, 8, generator=g) * 2 - 1)
    fid_real, fid_noise = m.fid(ref, real), m.fid(ref, noise)
    assert fid_real < 0.1 * fid_noise, (fid_real, fid_noise)


def test_weights_loader_refuses_pickles(tmp_path):
    for name in ("weights.pth", "weights.safetensors"):  # by suffix, and by content
        p = tmp_path / name
        torch.save({"w": torch.zeros(2)}, p)
        with pytest.raises(ValueError, match="safetensors"):
            fx.InceptionV3Features.from_file(p)


# ------------------------------------------------------------------------------- Inception
def test_inception_torchvision_layout_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = fx.InceptionV3Features()
    sd = net.state_dict()
    # torchvision's Inception3 (aux_logits=True, 1000 classes) has 27,161,264 parameters
    assert sum(p.numel() for p in net.parameters()) == 27_161_264
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.num_batches_tracked",
                "Mixed_5b.branch_pool.conv.weight", "Mixed_6e.branch7x7dbl_5.bn.running_var",
                "Mixed_7c.branch3x3dbl_3b.bn.bias", "AuxLogits.conv1.conv.weight", "AuxLogits.fc.weight",
                "fc.weight"):
        assert key in sd, key
    assert "conv.bias" not in " ".join(sd)  # BasicConv2d convolutions have no bias
    # non-trivial BatchNorm statistics, so a mis-mapped buffer would change the output
    for k, v in sd.items():
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean"):
            v.normal_(0, 0.1)
    p = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    loaded = fx.InceptionV3Features.from_file(p)  # strict=True inside
    assert loaded.variant == "torchvision" and loaded.dim == 2048
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = loaded(x)
        assert out.shape == (2, 2048) and torch.isfinite(out).all()
        torch.testing.assert_close(out, net(x))
        gray = loaded(x[:, :1])  # one channel is repeated to three
        torch.testing.assert_close(gray, loaded(x[:, :1].expand(-1, 3, -1, -1)))


def test_inception_fid_variant_detected_from_weights(tmp_path):
    """pytorch-fid's TF-ported layout: 1008 classes, no AuxLogits -> variant 'fid' on load."""
    from safetensors.torch import save_file

    net = fx.InceptionV3Features("fid")
    sd = net.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in sd)
    p = tmp_path / "pt_inception.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    loaded = fx.InceptionV3Features.from_file(p)
    assert loaded.variant == "fid" and loaded.name == "inception-v3-fid"
    with torch.no_grad():
        x = torch.rand(1, 3, 8, 8) * 2 - 1
        torch.testing.assert_close(loaded(x), net(x))


def test_sliced_w2_matches_the_gaussian_shift_closed_form():
    """N(0, I) against N(m, I) in D dims: every projection is a 1-D shift by theta.m, so the
    sliced W2^2 is E[(theta.m)^2] = |m|^2 / D."""
    g = np.random.default_rng(0)
    d, n = 4, 5000
    shift = np.array([0.6, -0.3, 0.0, 0.9])
    a, b = g.standard_normal((n, d)), g.standard_normal((n, d)) + shift
    expected = np.linalg.norm(shift) / math.sqrt(d)
    assert abs(m.sliced_w2(a, b, projections=800) - expected) < 0.06 * expected
    assert m.sliced_w2(a, g.standard_normal((n // 2, d)), projections=200) < 0.1  # unequal sizes (noise only)
    with pytest.raises(ValueError, match="one dimension"):
        m.sliced_w2(a, b[:, :2])
