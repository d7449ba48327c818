"""Sample-quality metrics on feature vectors (N, D) or images: FID, KID, precision/recall,
memorisation (copy rate), and cached reference statistics.

Every statistic is computed in float64 numpy, whatever the input (numpy array or torch tensor,
any float dtype). Features come from an extractor in `evaluation.features`; the metrics here
never know which network made them.

References
  FID        Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."
  KID        Binkowski et al. 2018, "Demystifying MMD GANs", unbiased MMD^2, cubic kernel
  P/R        Kynkaanniemi et al. 2019, "Improved precision and recall metric ..."
  copy rate  Yoon et al. 2023 ("Diffusion probabilistic models generalize when they fail to
             memorize") and Somepalli et al. 2023 use a nearest-neighbour ratio test; see
             `copy_rate` for the exact rule used here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np


def _as_2d(x, what: str) -> np.ndarray:
    """Any array-like / tensor (N, ...) -> float64 numpy (N, D), flattening trailing dims."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or len(a) == 0:
        raise ValueError(f"{what} must be (N, D) (or (N, ...) to flatten) with N >= 1, got shape {a.shape}")
    a = a.reshape(len(a), -1)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds {int((~np.isfinite(a)).sum())} NaN/inf value(s)")
    return a


# ------------------------------------------------------------------------------------- FID
def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    f = _as_2d(feats, "feats")
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    mu = f.mean(0)
    d = f - mu
    cov = d.T @ d / (len(f) - 1)
    return mu, cov


def _clip_eig(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with round-off removed: those below
    D * eps * max|w| are set to 0. Without this, sqrt turns a round-off eigenvalue of 1e-16 into
    1e-8 and a singular covariance (fewer samples than dims) gains spurious trace."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh, round-off eigenvalues (incl. negative ones) set to 0."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(_clip_eig(w))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)): the Frechet (W2) distance of two Gaussians.

    tr (C1 C2)^(1/2) is computed as tr (S C2 S)^(1/2) with S = C1^(1/2): C1 C2 and S C2 S share
    their eigenvalues (C1 C2 = S (S C2 S) S^-1 when C1 is invertible, and by continuity
    otherwise), and S C2 S is symmetric PSD, so one `eigh` gives real eigenvalues whose tiny
    negative round-off is clipped to 0. This avoids `scipy.linalg.sqrtm` on the non-symmetric
    product, which returns complex parts and fails on singular covariances (N < D features).
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, cov1 {c1.shape}, mu2 {mu2.shape}, cov2 {c2.shape}")
    s1 = _psd_sqrt(c1)
    m = s1 @ c2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(_clip_eig(eig)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt, 0.0))


def fid(feats_a, feats_b) -> float:
    """Frechet distance between the Gaussian fits of two feature sets (N_a, D), (N_b, D)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


# --------------------------------------------------------------------------- sliced W2
def sliced_w2(a, b, projections: int = 256, generator=0) -> float:
    """Sliced 2-Wasserstein distance between two point sets (N, D), (M, D):
    sqrt(E_theta W2^2(theta.a, theta.b)) over `projections` random unit directions theta, each
    1-D W2 from the sorted projections (quantiles at (i + 1/2)/n when N != M). For N(0, I)
    against N(m, I) it is |m| / sqrt(D) (the test checks this)."""
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sliced_w2 needs point sets of one dimension, got {a.shape[1]} and {b.shape[1]}")
    rng = _rng(generator)
    theta = rng.standard_normal((a.shape[1], projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    pa, pb = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)
    if len(pa) != len(pb):
        q = (np.arange(max(len(pa), len(pb))) + 0.5) / max(len(pa), len(pb))
        pa, pb = np.quantile(pa, q, axis=0), np.quantile(pb, q, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


# ------------------------------------------------------------------------------------- KID
def _rng(generator) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if hasattr(generator, "initial_seed"):  # a torch.Generator: reuse its seed
        return np.random.default_rng(generator.initial_seed())
    return np.random.default_rng(0 if generator is None else generator)


class KID(NamedTuple):
    mean: float  # mean of the unbiased MMD^2 estimates over subsets
    std: float   # their standard deviation (ddof=1), the spread over subsets


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, generator=None) -> KID:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (gamma x.y + coef0)^degree,
    gamma = 1/D by default, averaged over `subsets` random subsets of m = min(subset_size,
    N_a, N_b) vectors from each set (drawn without replacement within a subset).

    generator: np.random.Generator, an int seed, a torch.Generator (its seed) or None (seed 0),
    so the same inputs give the same numbers.
    """
    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 vectors, got m = {m}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    g = 1.0 / a.shape[1] if gamma is None else gamma
    rng = _rng(generator)
    est = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (g * x @ x.T + coef0) ** degree
        kyy = (g * y @ y.T + coef0) ** degree
        kxy = (g * x @ y.T + coef0) ** degree
        # unbiased: the diagonals k(x_i, x_i) are left out of the within-set means
        est[i] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) \
            - 2 * kxy.mean()
    return KID(float(est.mean()), float(est.std(ddof=1)) if subsets > 1 else 0.0)


# ------------------------------------------------------------------------------ distances
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances.

    |a|^2 + |b|^2 - 2 a.b runs on BLAS but leaves round-off of order eps (|a|^2 + |b|^2) where
    a = b; values below 1e-12 (|a|^2 + |b|^2) (distance below 1e-6 of the norms) are set to
    exactly 0, so identical points and duplicates are recognised as such.
    """
    na, nb = (a * a).sum(1)[:, None], (b * b).sum(1)[None, :]
    d = na + nb - 2 * a @ b.T
    d[d <= 1e-12 * (na + nb)] = 0.0
    return d


def _nn_dists(query: np.ndarray, ref: np.ndarray, k: int, batch: int, exclude_zero: bool = False):
    """Distance from each query row to its k-th nearest row of ref (k = 1: nearest) and that
    row's index, computed in row batches so memory stays at batch x len(ref).
    exclude_zero: ignore exact coincidences (distance 0), i.e. a point and its duplicates."""
    dist, idx = np.empty(len(query)), np.empty(len(query), dtype=np.int64)
    for s in range(0, len(query), batch):
        d2 = _sq_dists(query[s:s + batch], ref)
        if exclude_zero:
            d2[d2 <= 0] = np.inf
        j = np.argpartition(d2, k - 1, axis=1)[:, :k]  # the k smallest, unordered
        order = np.argsort(np.take_along_axis(d2, j, 1), axis=1)[:, -1]
        idx[s:s + batch] = j[np.arange(len(j)), order]
        dist[s:s + batch] = np.sqrt(d2[np.arange(len(j)), idx[s:s + batch]])
    return dist, idx


# ----------------------------------------------------------------------- precision / recall
class PrecisionRecall(NamedTuple):
    precision: float  # fraction of fake samples inside the real manifold estimate
    recall: float     # fraction of real samples inside the fake manifold estimate


def _coverage(points: np.ndarray, centers: np.ndarray, radii: np.ndarray, batch: int) -> float:
    """Fraction of points inside at least one ball B(center_j, radius_j)."""
    inside = 0
    r2 = radii[None, :] ** 2
    for s in range(0, len(points), batch):
        inside += int((_sq_dists(points[s:s + batch], centers) <= r2).any(1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = 3, batch: int = 1024) -> PrecisionRecall:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019).

    The real manifold is the union of balls around each real vector with radius its distance to
    its k-th nearest other real vector; precision is the fraction of fakes inside it. Recall
    swaps the roles. Distances are computed in batches of `batch` rows.
    """
    r, f = _as_2d(real, "real"), _as_2d(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if not 1 <= k < min(len(r), len(f)):
        raise ValueError(f"k must lie in 1..{min(len(r), len(f)) - 1} for {len(r)} real / {len(f)} fake, got {k}")
    # k + 1: each point is its own nearest neighbour at distance 0
    radius_r, _ = _nn_dists(r, r, k + 1, batch)
    radius_f, _ = _nn_dists(f, f, k + 1, batch)
    return PrecisionRecall(_coverage(f, r, radius_r, batch), _coverage(r, f, radius_f, batch))


# ------------------------------------------------------------------------------ copy rate
class CopyRate(NamedTuple):
    rate: float            # fraction of samples counted as copies
    distances: np.ndarray  # (N,) pixel-space L2 distance of each sample to its nearest training image
    nearest: np.ndarray    # (N,) index of that training image
    ratios: np.ndarray     # (N,) distances / (that image's distance to its nearest other training image)


def copy_rate(samples, train, alpha: float = 1 / 3, batch: int = 1024) -> CopyRate:
    """Memorisation: the fraction of samples that are near-copies of a training image.

    Rule: let t be the sample's nearest training image (pixel-space L2, images flattened) at
    distance d, and r_t the distance from t to its nearest *other* distinct training image
    (exact duplicates of t are skipped). The sample is a copy if d <= alpha * r_t, i.e. it lies
    much closer to t than any training image does: the data's own spacing around t sets the
    scale. This is the ratio test of Yoon et al. 2023 / Somepalli et al. 2023 (who compare d with
    the sample's second-nearest training distance, alpha = 1/3) with the denominator measured at
    the training image, which stays well defined when the sample sits between two near-duplicate
    training images. alpha = 1/3 as in those papers.
    """
    s, t = _as_2d(samples, "samples"), _as_2d(train, "train")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"samples and train differ in size: {s.shape[1]} vs {t.shape[1]} values per image")
    if len(t) < 2:
        raise ValueError("copy_rate needs at least 2 training images (their spacing sets the scale)")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    d, j = _nn_dists(s, t, 1, batch)
    spacing, _ = _nn_dists(t, t, 1, batch, exclude_zero=True)
    if not np.isfinite(spacing).all():
        raise ValueError("all training images are identical; the copy test needs distinct images")
    ratio = d / spacing[j]
    return CopyRate(float((ratio <= alpha).mean()), d, j, ratio)


# ---------------------------------------------------------------------------- stats cache
class Stats(NamedTuple):
    mu: np.ndarray
    cov: np.ndarray
    n: int
    meta: str  # free text, e.g. JSON naming the data set, split and feature extractor


def cache_stats(path, feats, meta: str | dict = "") -> Stats:
    """Write mean, covariance, count and `meta` (a dict is stored as JSON) of (N, D) features to
    an uncompressed .npz of plain arrays (no pickled objects) and return them."""
    mu, cov = feature_stats(feats)
    meta = json.dumps(meta, sort_keys=True) if isinstance(meta, dict) else str(meta)
    p = Path(path)
    if p.suffix != ".npz":
        raise ValueError(f"reference statistics are written as .npz, got {p}")
    p.parent.mkdir(parents=True, exist_ok=True)
    n = len(_as_2d(feats, "feats"))
    from ..safeio import atomic_path
    with atomic_path(p) as tmp:
        np.savez(tmp, mu=mu, cov=cov, n=np.int64(n), meta=np.array(meta))
    return Stats(mu, cov, n, meta)


def load_stats(path) -> Stats:
    """Read statistics written by `cache_stats` (np.load with allow_pickle=False)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"statistics file {p} does not exist")
    with np.load(p, allow_pickle=False) as f:
        missing = {"mu", "cov", "n", "meta"} - set(f.files)
        if missing:
            raise ValueError(f"{p} is not a statistics file: missing {sorted(missing)}")
        mu, cov, n, meta = f["mu"].astype(np.float64), f["cov"].astype(np.float64), int(f["n"]), str(f["meta"])
    if mu.ndim != 1 or cov.shape != (len(mu), len(mu)):
        raise ValueError(f"{p}: inconsistent shapes mu {mu.shape}, cov {cov.shape}")
    return Stats(mu, cov, n, meta)
