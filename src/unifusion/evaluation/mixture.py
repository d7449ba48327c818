"""An exact oracle: a Gaussian mixture with full covariances, p_0 = sum_k pi_k N(mu_k, S_k).

At noise level sigma, p_sigma = sum_k pi_k N(mu_k, S_k + sigma^2 I), so the denoiser, score,
log-density, class posterior and the PF-ODE's right-hand side are closed forms. With the
eigendecomposition S_k = U_k diag(l_k) U_k^T and y_k = U_k^T (x - mu_k):

    E[x_0 | x, k] = mu_k + U_k diag(l / (l + sigma^2)) y_k
    E[n   | x, k] =        U_k diag(sigma / (l + sigma^2)) y_k
    (x - D) / sigma = sum_k w_k U_k diag(sigma / (l + sigma^2)) y_k      (finite at sigma = 0)

with responsibilities w_k = p(k | x, sigma). Samplers are measured against `pf_ode`, the PF-ODE
solved by an 8th-order adaptive method to 1e-12 relative and absolute tolerance.
"""
from __future__ import annotations

import math

import torch
from scipy.integrate import solve_ivp
from torch import Tensor


class GaussianMixture:
    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, labels: Tensor | None = None):
        self.weights = weights.to(torch.float64) / weights.sum()
        self.means = means.to(torch.float64)  # (K, d)
        covs = covs.to(torch.float64)
        self.lam, self.U = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))  # (K, d), (K, d, d)
        if (self.lam <= 0).any():
            raise ValueError("mixture covariances must be positive definite")
        self.labels = labels  # (K,) class of each component, or None
        self.K, self.dim = self.means.shape

    @classmethod
    def random(cls, dim: int, components: int, seed: int = 0, spread: float = 2.0, scale: float = 0.4,
               classes: int | None = None) -> "GaussianMixture":
        """Random means of size ~spread, random rotations and eigenvalues in scale^2 * [0.05, 1]."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread / math.sqrt(max(dim / 2, 1))
        Q, _ = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=torch.float64))
        lam = scale**2 * (0.05 + 0.95 * torch.rand(components, dim, generator=g, dtype=torch.float64))
        covs = Q @ torch.diag_embed(lam) @ Q.transpose(1, 2)
        w = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        labels = torch.arange(components) % classes if classes else None
        return cls(w, means, covs, labels)

    @classmethod
    def stiff(cls, dim: int, components: int, seed: int = 0, rank: int = 4, floor: float = 1e-4,
              scale: float = 0.4, spread: float = 2.0) -> "GaussianMixture":
        """Components with a rank-`rank` covariance plus `floor` x scale^2 in every direction: most
        directions have a very small variance, so the PF-ODE is stiff near sigma = 0 (the denoiser
        changes fast in x there), which a few-step solver finds hard."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread / math.sqrt(max(dim / 2, 1))
        A = torch.randn(components, dim, rank, generator=g, dtype=torch.float64) * scale / math.sqrt(rank)
        covs = A @ A.transpose(1, 2) + floor * scale**2 * torch.eye(dim, dtype=torch.float64)
        return cls(0.5 + torch.rand(components, generator=g, dtype=torch.float64), means, covs)

    # ---------------------------------------------------------------- closed forms at level sigma
    def _parts(self, x: Tensor, sigma, y: Tensor | None = None):
        """log(pi_k N(x; mu_k, S_k + sigma^2 I)) (B, K), y_k (B, K, d), 1/(l + sigma^2) (B, K, d)."""
        x = x.to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2
        yk = torch.einsum("kij,bki->bkj", self.U, x[:, None, :] - self.means[None])
        inv = 1 / (self.lam[None] + s2)
        logN = -0.5 * (yk**2 * inv).sum(-1) + 0.5 * inv.log().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        logw = self.weights.log()[None].expand_as(logN)
        if y is not None:  # condition on the class: keep only its components
            keep = self.labels[None, :].to(y.device) == y[:, None]
            logw = torch.where(keep, logw, torch.full_like(logw, -math.inf))
        return logw + logN, yk, inv

    def _mix(self, x, sigma, y, coef_fn):
        """sum_k w_k U_k diag(coef_fn(l, inv)) y_k, shaped like x."""
        logp, yk, inv = self._parts(x, sigma, y)
        w = torch.softmax(logp, dim=1)
        vk = torch.einsum("kij,bkj->bki", self.U, coef_fn(self.lam[None], inv) * yk)
        return (w[..., None] * vk).sum(1)

    def log_prob(self, x: Tensor, sigma=0.0, y: Tensor | None = None) -> Tensor:
        """log p_sigma(x) (or log p_sigma(x | y) with y), shape (B,)."""
        logp, _, _ = self._parts(x, sigma, y)
        if y is not None:  # renormalize by the class prior
            prior = torch.zeros(int(self.labels.max()) + 1, dtype=torch.float64)
            prior.index_add_(0, self.labels, self.weights)
            return torch.logsumexp(logp, 1) - prior.log()[y]
        return torch.logsumexp(logp, 1)

    def denoise(self, x: Tensor, sigma, y: Tensor | None = None) -> Tensor:
        """E[x_0 | x] at level sigma (class-conditional with y).

        At sigma = inf, x is the unit noise direction n = lim x / sigma (the samplers' convention) and
        the result is E[x_0] (E[x_0 | y] with y): with x = sigma n, the log-responsibilities
        log pi_k - 1/2 (sigma n - mu_k)^T (S_k + sigma^2 I)^{-1} (sigma n - mu_k) - 1/2 log det(S_k + sigma^2 I)
        differ between components by log pi_k + O(1/sigma), so p(k | x) -> pi_k, and each posterior mean
        mu_k + S_k (S_k + sigma^2 I)^{-1} (sigma n - mu_k) = mu_k + S_k n / sigma + O(1/sigma^2) -> mu_k."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        at_inf = torch.isinf(s)
        if at_inf.any():  # the finite rows as usual (a stand-in level for the others), then the limit
            post = self.denoise(x, torch.where(at_inf, torch.ones_like(s), s), y)
            return torch.where(at_inf[:, None], self.mean(y).to(x.dtype), post)
        logp, _, _ = self._parts(x, sigma, y)
        w = torch.softmax(logp, dim=1)
        _, yk, inv = self._parts(x, sigma, None)
        post = self.means[None] + torch.einsum("kij,bkj->bki", self.U, self.lam[None] * inv * yk)
        return (w[..., None] * post).sum(1).to(x.dtype)

    def mean(self, y: Tensor | None = None) -> Tensor:
        """E[x_0] as (1, d), or E[x_0 | y] per label as (B, d): the weighted means of the components."""
        if y is None:
            return (self.weights[:, None] * self.means).sum(0, keepdim=True)
        w = torch.where(self.labels[None, :].to(y.device) == y[:, None], self.weights, torch.zeros_like(self.weights))
        return (w @ self.means) / w.sum(1, keepdim=True)

    def eps(self, x: Tensor, sigma, y: Tensor | None = None) -> Tensor:
        """E[n | x] at level sigma, computed from the posterior of n (not from the denoiser)."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        return self._mix(x, sigma, y, lambda lam, inv: s * inv).to(x.dtype)

    def score(self, x: Tensor, sigma, y: Tensor | None = None) -> Tensor:
        return (-self._mix(x, sigma, y, lambda lam, inv: inv)).to(x.dtype)

    def class_log_prob(self, x: Tensor, sigma, y: Tensor) -> Tensor:
        """log p(y | x, sigma) for the component labels."""
        logp, _, _ = self._parts(x, sigma, None)
        C = int(self.labels.max()) + 1
        by_class = torch.stack([torch.logsumexp(logp[:, self.labels == c], 1) for c in range(C)], 1)
        return (by_class - torch.logsumexp(by_class, 1, keepdim=True)).gather(1, y[:, None])[:, 0]

    def ode_rhs(self, x: Tensor, sigma, y: Tensor | None = None) -> Tensor:
        """dx/dsigma = (x - D) / sigma, written so it is finite at sigma = 0."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        return self._mix(x, sigma, y, lambda lam, inv: s * inv)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws from p_0 and their component indices."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("bij,bj->bi", self.U[k], self.lam[k].sqrt() * z)
        return x, k

    # ---------------------------------------------------------------- reference PF-ODE solution
    def pf_ode(self, x: Tensor, sigma_start: float, sigma_end: float, y: Tensor | None = None,
               tol: float = 1e-12) -> Tensor:
        """Solve the PF-ODE from x at sigma_start to sigma_end (may be 0) with DOP853."""
        B, shape = x.shape[0], x.shape

        def rhs(s, state):
            xt = torch.from_numpy(state).reshape(B, self.dim)
            return self.ode_rhs(xt, s, y).flatten().numpy()

        sol = solve_ivp(rhs, (sigma_start, sigma_end), x.detach().to(torch.float64).flatten().numpy(),
                        method="DOP853", rtol=tol, atol=tol)
        if not sol.success:
            raise RuntimeError(f"reference PF-ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(x.dtype)
