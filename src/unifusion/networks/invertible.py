"""Normalizing flows: invertible layers and the NICE, RealNVP and Glow architectures.

Every invertible layer is an nn.Module f with

    forward(x) -> (y, logdet)     y = f(x), logdet = log|det df/dx| per example, shape (B,)
    inverse(y) -> x               x = f^{-1}(y)

on vectors (B, D) or images (B, C, H, W); logdet has x's dtype and device. A composition
f = f_K o ... o f_1 has logdet = sum_k logdet_k, so by the change of variables

    log p(x) = log N(f(x); 0, I) + log|det df/dx|

(the model family computes this; standard_normal_log_prob is the first term). The whole
architectures (NICE, RealNVP, Glow) take `shape` ([D] or [C, H, W]) plus JSON-able keyword
arguments and return z flat, (B, prod(shape)); inverse(z) gives x back in the input shape.

Multi-scale flows (RealNVP, Glow on images) factor out half of the channels after each scale but
the last: those go straight to z. z is the concatenation, in this order, of the factored-out
parts (first scale first) and then the final scale's output, each flattened row-major (C, H, W).

VariationalDequantizer is Flow++'s q(u | x) for variational dequantization (Ho et al. 2019).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import zero_


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per example: -|z|^2 / 2 - (D / 2) log(2 pi), summed over all but dim 0 -> (B,)."""
    d = z[0].numel()
    return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)


def _per_example(value: Tensor, x: Tensor) -> Tensor:
    """A 0-d logdet shared by every example -> (B,) in x's dtype (a fresh tensor, not a view)."""
    return value.to(x.dtype).repeat(x.shape[0])


# ---------------------------------------------------------------------------------------------
# masks


def checkerboard_mask(channels: int, height: int, width: int, parity: int = 0) -> Tensor:
    """(C, H, W) 0/1 mask: m[c, i, j] = 1 where (i + j + parity) is even (RealNVP's spatial mask)."""
    i = torch.arange(height)[:, None]
    j = torch.arange(width)[None, :]
    board = ((i + j + parity) % 2 == 0).float()  # (H, W)
    return board.expand(channels, height, width).clone()


def channel_mask(channels: int, height: int, width: int, parity: int = 0) -> Tensor:
    """(C, H, W) 0/1 mask: the first C//2 channels are 1 for parity 0, the others for parity 1."""
    if channels < 2:
        raise ValueError(f"channel_mask needs at least 2 channels, got {channels}: use checkerboard_mask "
                         f"(or squeeze the image first)")
    first = (torch.arange(channels) < channels // 2).float()
    m = first if parity % 2 == 0 else 1 - first
    return m[:, None, None].expand(channels, height, width).clone()


def alternating_mask(features: int, parity: int = 0) -> Tensor:
    """(D,) 0/1 mask: m[i] = 1 where (i + parity) is even (even features for parity 0, odd for 1)."""
    return ((torch.arange(features) + parity) % 2 == 0).float()


# ---------------------------------------------------------------------------------------------
# coupling networks


class MLPCouplingNet(nn.Module):
    """(B, features_in) -> (B, features_out): `depth` hidden Linear+ReLU layers, then a Linear
    initialised at zero, so a coupling using it starts as the identity (zero shift and log-scale)."""

    def __init__(self, features_in: int, features_out: int, hidden: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPCouplingNet needs depth >= 1 hidden layers, got {depth}")
        layers: list[nn.Module] = []
        width = features_in
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(zero_(nn.Linear(width, features_out)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvCouplingNet(nn.Module):
    """(B, channels_in, H, W) -> (B, channels_out, H, W): conv3x3 -> ReLU -> conv1x1 -> ReLU ->
    conv3x3 (Glow's coupling net without its ActNorms); the last conv starts at zero."""

    def __init__(self, channels_in: int, channels_out: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            zero_(nn.Conv2d(hidden, channels_out, 3, padding=1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# invertible layers


def _net_input(masked: Tensor, cond: Tensor | None) -> Tensor:
    """The coupling net sees m*x, with the conditioning (if any) concatenated along dim 1."""
    return masked if cond is None else torch.cat([masked, cond.to(masked.dtype)], dim=1)


class AdditiveCoupling(nn.Module):
    """NICE (Dinh et al. 2014): y = m*x + (1-m)*(x + t(m*x)); the Jacobian is unit triangular, so
    logdet = 0 exactly. `mask` is a fixed 0/1 tensor broadcastable to one example; `net` maps
    an input of x's shape to the same shape. inverse: x = m*y + (1-m)*(y - t(m*y))."""

    def __init__(self, mask: Tensor, net: nn.Module):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().float(), persistent=False)
        self.net = net

    def _shift(self, masked: Tensor, cond: Tensor | None) -> Tensor:
        return (1 - self.mask) * self.net(_net_input(masked, cond))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x + self._shift(self.mask * x, cond), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        return y - self._shift(self.mask * y, cond)


class AffineCoupling(nn.Module):
    """RealNVP / Glow: y = m*x + (1-m)*(x * exp(log_s) + t), with (s_raw, t) = net(m*x) split in
    two along dim 1 (the net outputs twice x's channels or features), and

        scale="tanh":     log_s = a * tanh(s_raw), a a learnable per-channel/feature scale (init 1)
        scale="sigmoid":  s = sigmoid(s_raw + 2),  log_s = logsigmoid(s_raw + 2)  (Glow)

    logdet = sum((1-m) * log_s). The net's outputs are zeroed on the masked part, so y = x there
    exactly. With a zero-initialised net the "tanh" coupling starts as the identity; the
    "sigmoid" one as a scaling of the unmasked part by sigmoid(2) ~ 0.88, as in Glow.

    forward/inverse take an optional `cond` (B, C', ...) concatenated to m*x along dim 1 as the
    net's input (the net then takes C + C' channels); the Jacobian is still taken in x only.
    """

    def __init__(self, mask: Tensor, net: nn.Module, scale: str = "tanh"):
        super().__init__()
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"AffineCoupling scale must be 'tanh' or 'sigmoid', got {scale!r}")
        mask = mask.detach().clone().float()
        self.register_buffer("mask", mask, persistent=False)
        self.net, self.scale = net, scale
        if scale == "tanh":  # one per channel (images) or feature (vectors): mask.shape[0]
            self.scale_param = nn.Parameter(torch.ones(mask.shape[0], *[1] * (mask.ndim - 1)))
        else:
            self.scale_param = None

    def _log_scale_shift(self, masked: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.net(_net_input(masked, cond))
        if h.shape[1] != 2 * masked.shape[1]:
            raise ValueError(f"AffineCoupling's net must output 2 x {masked.shape[1]} channels/features "
                             f"(log-scale and shift), got {h.shape[1]}")
        s_raw, t = h.chunk(2, dim=1)
        if self.scale == "tanh":
            log_s = self.scale_param * torch.tanh(s_raw)
        else:
            log_s = F.logsigmoid(s_raw + 2.0)
        keep = 1 - self.mask
        return keep * log_s, keep * t

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_s, t = self._log_scale_shift(self.mask * x, cond)
        return x * torch.exp(log_s) + t, log_s.flatten(1).sum(1)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        log_s, t = self._log_scale_shift(self.mask * y, cond)  # m*y = m*x
        return (y - t) * torch.exp(-log_s)


class DiagonalScale(nn.Module):
    """NICE's last layer: y = x * exp(s), s learnable of one example's shape (init 0);
    logdet = sum(s) for every example."""

    def __init__(self, shape):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(*shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale), _per_example(self.log_scale.sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale)


class ActNorm(nn.Module):
    """Glow's activation normalisation: y = (x + b) * exp(log_s) per channel (dim 1), on (B, C)
    or (B, C, H, W); logdet = H * W * sum(log_s) (1 * sum for vectors).

    Data-dependent initialisation: while the persistent buffer `initialized` is 0, the first
    forward sets b = -mean and log_s = -log(std + 1e-6) from its batch (per channel, over the
    batch and spatial dims), so that batch comes out with zero mean and unit variance per channel.
    Under torch.distributed with world size > 1 the per-channel sums, sums of squares and counts
    are all-reduced first: every rank gets the global batch's statistics and identical parameters.
    inverse before initialisation uses the current parameters (the identity at construction).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._ready = False  # a Python mirror of `initialized`: reading the buffer in every forward
        # would be a device sync and a torch.compile graph break

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # the loaded buffer decides again at the next forward

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *[1] * (x.ndim - 2))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        # sums in float64 (no cancellation in E[x^2] - E[x]^2); MPS has no float64
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        xt = x.detach().to(acc).transpose(0, 1).reshape(x.shape[1], -1)  # (C, N)
        stats = torch.stack([xt.sum(1), xt.pow(2).sum(1), torch.full_like(xt[:, 0], xt.shape[1])])  # (3, C)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        total, total_sq, count = stats.unbind(0)
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._ready:
            if not bool(self.initialized):
                self._initialize(x)
            self._ready = True
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        spatial = x[0, 0].numel()
        return y, _per_example(spatial * self.log_scale.sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.bias, y)


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution, LU-parametrised: W = P L (U + diag(sign_s * exp(log_abs_s)))
    with P a fixed permutation, L unit lower-triangular, U strictly upper-triangular, started from
    a random orthogonal matrix (QR of a Gaussian from torch's global RNG). y[:, i] = sum_j W_ij x[:, j]
    at every pixel (or as a linear map on (B, D) vectors); logdet = H * W * sum(log_abs_s).
    inverse applies W^{-1}, computed in float64 (float32 on MPS)."""

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)  # q = p @ lower @ upper
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lower, -1))  # only the strict lower part is used
        self.upper = nn.Parameter(torch.triu(upper, 1))  # only the strict upper part is used
        self.log_abs_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> Tensor:
        """W (C, C), rebuilt from the LU factors."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_abs_s))
        return self.perm @ lower @ upper

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        spatial = x[0, 0].numel()
        return self._mix(self.weight(), x), _per_example(spatial * self.log_abs_s.sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        w = self.weight()
        acc = torch.float32 if w.device.type == "mps" else torch.float64
        return self._mix(torch.linalg.inv(w.to(acc)), y)


class Squeeze(nn.Module):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), each 2x2 patch stacked into channels
    (channel 4c + 2a + b holds x[c, 2i + a, 2j + b]); a permutation, so logdet = 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"Squeeze needs images (B, C, H, W), got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Squeeze needs even height and width, got {H}x{W}: use an image size "
                             f"divisible by 2**num_scales (or fewer scales)")
        y = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        return y, x.new_zeros(B)

    def inverse(self, y: Tensor) -> Tensor:
        B, C4, h, w = y.shape
        if C4 % 4:
            raise ValueError(f"Squeeze.inverse needs a multiple of 4 channels, got {C4}")
        return y.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * h, 2 * w)


# ---------------------------------------------------------------------------------------------
# whole architectures


def _check_shape(name: str, shape) -> tuple[int, ...]:
    ok = (isinstance(shape, (list, tuple)) and len(shape) in (1, 3)
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape))
    if not ok:
        raise ValueError(f"{name} shape must be [D] for vectors or [C, H, W] for images (positive ints), "
                         f"got {shape!r}")
    return tuple(shape)


def _check_positive(name: str, **values) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} needs {k} to be a positive int, got {v!r}")


def _check_halvable(name: str, shape: tuple[int, ...], halvings: int, arg: str, value: int) -> None:
    """Raise unless H and W are divisible by 2**halvings (the squeezes a multi-scale flow makes)."""
    _, H, W = shape
    k = 2 ** halvings
    if H % k or W % k:
        fits = 0
        while H % 2 ** (fits + 1) == 0 and W % 2 ** (fits + 1) == 0:
            fits += 1
        most = fits + (value - halvings)  # the largest `arg` whose halvings fit
        fewer = f" or {arg} <= {most}" if most >= 1 else ""
        raise ValueError(f"{name} cannot squeeze shape {list(shape)} with {arg}={value}: height and width "
                         f"must be divisible by {k}; use an image size divisible by {k}{fewer}")


class _Flow(nn.Module):
    """A sequence of stages of invertible layers; after every stage but the last, the channels
    from keep on (dim 1) are factored out to z. Subclasses fill in self.stages, self._keep and
    self._z_shapes (per-example shapes of the factored parts, then of the final output)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = _check_shape(type(self).__name__, shape)
        self.dim = math.prod(self.shape)
        self._flatten = False  # NICE: run on (B, prod(shape)) whatever the input shape
        self.stages = nn.ModuleList()
        self._keep: list[int] = []
        self._z_shapes: list[tuple[int, ...]] = []

    @property
    def z_shapes(self) -> list[tuple[int, ...]]:
        """Per-example shapes of z's pieces, in z's order: factored-out parts, then the final output."""
        return list(self._z_shapes)

    def _add_stage(self, layers: list[nn.Module]) -> None:
        self.stages.append(nn.ModuleList(layers))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, *shape) -> (z (B, prod(shape)), log|det dz/dx| (B,))."""
        if tuple(x.shape[1:]) != self.shape:
            dims = ", ".join(map(str, self.shape))
            raise ValueError(f"{type(self).__name__} was built for inputs of shape (B, {dims}), got {tuple(x.shape)}")
        B = x.shape[0]
        h = x.reshape(B, -1) if self._flatten else x
        logdet = x.new_zeros(B)
        zs = []
        for i, stage in enumerate(self.stages):
            for layer in stage:
                h, ld = layer(h)
                logdet = logdet + ld
            if i < len(self.stages) - 1:
                keep = self._keep[i]
                zs.append(h[:, keep:].reshape(B, -1))
                h = h[:, :keep]
        zs.append(h.reshape(B, -1))
        return torch.cat(zs, dim=1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        """z (B, prod(shape)) -> x (B, *shape)."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}.inverse needs z of shape (B, {self.dim}), got {tuple(z.shape)}")
        B = z.shape[0]
        pieces = torch.split(z, [math.prod(s) for s in self._z_shapes], dim=1)
        h = pieces[-1].reshape(B, *self._z_shapes[-1])
        for i in reversed(range(len(self.stages))):
            if i < len(self.stages) - 1:
                h = torch.cat([h, pieces[i].reshape(B, *self._z_shapes[i])], dim=1)
            for layer in reversed(self.stages[i]):
                h = layer.inverse(h)
        return h.reshape(B, *self.shape)


class NICE(_Flow):
    """NICE (Dinh et al. 2014): images are flattened to D = C*H*W features; `couplings` additive
    couplings with alternating even/odd masks and MLP nets of `depth` hidden layers of width
    `hidden`, then a DiagonalScale. logdet = sum(s) (the couplings are volume-preserving)."""

    def __init__(self, shape, hidden: int = 256, depth: int = 4, couplings: int = 4):
        super().__init__(shape)
        _check_positive("NICE", hidden=hidden, depth=depth, couplings=couplings)
        self._flatten = True
        D = self.dim
        layers: list[nn.Module] = [AdditiveCoupling(alternating_mask(D, k % 2), MLPCouplingNet(D, D, hidden, depth))
                                   for k in range(couplings)]
        layers.append(DiagonalScale([D]))
        self._add_stage(layers)
        self._z_shapes = [(D,)]


class RealNVP(_Flow):
    """RealNVP (Dinh et al. 2016, ICLR 2017) with tanh-bounded affine couplings and conv3x3-1x1-3x3 nets.

    Images [C, H, W]: for each of the first num_scales - 1 scales: `blocks` checkerboard couplings
    (alternating parity), Squeeze, `blocks` channel-mask couplings, then half of the (4C)
    channels are factored out to z; the last scale is `blocks + 1` checkerboard couplings. H and W
    must be divisible by 2**(num_scales - 1). Checkerboard comes first because a channel mask
    needs >= 2 channels, which single-channel images only have after a squeeze.
    Vectors [D]: 2 * blocks couplings with alternating masks and MLP nets (num_scales unused).
    """

    def __init__(self, shape, hidden: int = 64, num_scales: int = 2, blocks: int = 3):
        super().__init__(shape)
        _check_positive("RealNVP", hidden=hidden, num_scales=num_scales, blocks=blocks)
        if len(self.shape) == 1:
            (D,) = self.shape
            self._add_stage([AffineCoupling(alternating_mask(D, k % 2), MLPCouplingNet(D, 2 * D, hidden), "tanh")
                             for k in range(2 * blocks)])
            self._z_shapes = [(D,)]
            return
        _check_halvable("RealNVP", self.shape, num_scales - 1, "num_scales", num_scales)
        C, H, W = self.shape

        def couplings(n, mask_fn):
            return [AffineCoupling(mask_fn(C, H, W, k % 2), ConvCouplingNet(C, 2 * C, hidden), "tanh")
                    for k in range(n)]

        for _ in range(num_scales - 1):
            layers = couplings(blocks, checkerboard_mask) + [Squeeze()]
            C, H, W = 4 * C, H // 2, W // 2
            layers += couplings(blocks, channel_mask)
            self._add_stage(layers)
            keep = C // 2
            self._keep.append(keep)
            self._z_shapes.append((C - keep, H, W))
            C = keep
        self._add_stage(couplings(blocks + 1, checkerboard_mask))
        self._z_shapes.append((C, H, W))


class Glow(_Flow):
    """Glow (Kingma & Dhariwal 2018): flow steps [ActNorm, InvertibleConv1x1, AffineCoupling
    (sigmoid scale)], the coupling's mask alternating between halves from step to step.

    Images [C, H, W]: per level: Squeeze, `steps` flow steps with channel masks, then half of the
    channels are factored out to z (not after the last level). H and W must be divisible by
    2**num_levels. Vectors [D]: `steps` flow steps with the 1x1 convolution as an invertible
    linear map and alternating masks (num_levels unused). ActNorm initialises from the first
    batch it sees (the model's data-dependent initialisation).
    """

    def __init__(self, shape, hidden: int = 64, num_levels: int = 2, steps: int = 4):
        super().__init__(shape)
        _check_positive("Glow", hidden=hidden, num_levels=num_levels, steps=steps)
        if len(self.shape) == 1:
            (D,) = self.shape
            layers: list[nn.Module] = []
            for k in range(steps):
                layers += [ActNorm(D), InvertibleConv1x1(D),
                           AffineCoupling(alternating_mask(D, k % 2), MLPCouplingNet(D, 2 * D, hidden), "sigmoid")]
            self._add_stage(layers)
            self._z_shapes = [(D,)]
            return
        _check_halvable("Glow", self.shape, num_levels, "num_levels", num_levels)
        C, H, W = self.shape
        for level in range(num_levels):
            layers = [Squeeze()]
            C, H, W = 4 * C, H // 2, W // 2
            for k in range(steps):
                layers += [ActNorm(C), InvertibleConv1x1(C),
                           AffineCoupling(channel_mask(C, H, W, k % 2), ConvCouplingNet(C, 2 * C, hidden), "sigmoid")]
            self._add_stage(layers)
            if level < num_levels - 1:
                keep = C // 2
                self._keep.append(keep)
                self._z_shapes.append((C - keep, H, W))
                C = keep
        self._z_shapes.append((C, H, W))


class VariationalDequantizer(nn.Module):
    """Flow++'s variational dequantization noise q(u | x), u in (0, 1)^shape (Ho et al. 2019).

    forward(x, eps) with eps ~ N(0, I) of x's shape: h = g(eps; x), `couplings` tanh affine
    couplings (checkerboard masks for images, alternating for vectors) whose nets see the masked
    h and x concatenated along dim 1; then u = sigmoid(h). By the change of variables

        log q(u | x) = log N(eps; 0, I) - log|det dh/deps| - sum log sigmoid'(h),

    with log sigmoid'(h) = logsigmoid(h) + logsigmoid(-h). Returns (u, log_q), log_q shaped (B,).
    x goes in as given: scale it to O(1) (e.g. [0, 1] or [-1, 1]) before calling.
    """

    def __init__(self, shape, hidden: int = 32, couplings: int = 2):
        super().__init__()
        self.shape = _check_shape("VariationalDequantizer", shape)
        _check_positive("VariationalDequantizer", hidden=hidden, couplings=couplings)
        if len(self.shape) == 3:
            C, H, W = self.shape
            layers = [AffineCoupling(checkerboard_mask(C, H, W, k % 2), ConvCouplingNet(2 * C, 2 * C, hidden), "tanh")
                      for k in range(couplings)]
        else:
            (D,) = self.shape
            layers = [AffineCoupling(alternating_mask(D, k % 2), MLPCouplingNet(2 * D, 2 * D, hidden), "tanh")
                      for k in range(couplings)]
        self.couplings = nn.ModuleList(layers)

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.shape or eps.shape != x.shape:
            dims = ", ".join(map(str, self.shape))
            raise ValueError(f"VariationalDequantizer needs x and eps both of shape (B, {dims}), "
                             f"got {tuple(x.shape)} and {tuple(eps.shape)}")
        h, logdet = eps, eps.new_zeros(eps.shape[0])
        for layer in self.couplings:
            h, ld = layer(h, cond=x)
            logdet = logdet + ld
        log_sigmoid_grad = (F.logsigmoid(h) + F.logsigmoid(-h)).flatten(1).sum(1)
        return torch.sigmoid(h), standard_normal_log_prob(eps) - logdet - log_sigmoid_grad

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw eps ~ N(0, I) and return forward(x, eps) = (u, log q(u | x))."""
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self(x, eps)


FLOW_NETWORKS: dict[str, type[nn.Module]] = {"NICE": NICE, "RealNVP": RealNVP, "Glow": Glow}

__all__ = ["AdditiveCoupling", "AffineCoupling", "DiagonalScale", "ActNorm", "InvertibleConv1x1", "Squeeze",
           "MLPCouplingNet", "ConvCouplingNet", "checkerboard_mask", "channel_mask", "alternating_mask",
           "NICE", "RealNVP", "Glow", "VariationalDequantizer", "FLOW_NETWORKS", "standard_normal_log_prob"]
