"""A perceptual distance for training losses: LPIPS-style, in the feature space of the
classifiers the package ships (nothing is downloaded).

    perceptual_distance(x, y) -> (B,)

Following LPIPS (Zhang et al. 2018, eq. 1, without its learned per-channel weights): the
activations of several conv layers of a frozen network, each unit-normalised along the channel
axis at every position, compared by squared differences summed over channels, averaged over
positions, then averaged over the layers. Each layer's term lies in [0, 4], so the distance does
too; it is 0 for identical images.

The network follows the image shape: (1, 8, 8) -> the digits classifier, (3, H, W) -> the shapes
classifier, H, W >= 16 (its conv body is fully convolutional and runs at the native resolution,
trained at 32x32). Its weights are frozen (requires_grad False)
and cached per device; the distance is differentiable with respect to both inputs, for use as
the reconstruction term of an autoencoder or the loss of a distillation student. Inputs are not
clamped (clamping would zero the gradient of pixels outside [-1, 1]).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-10  # LPIPS's epsilon in the channel normalisation

_CACHE: dict[tuple[str, str], nn.Sequential] = {}


def _network(shape: tuple[int, ...], device: torch.device) -> nn.Sequential:
    """The frozen conv body of the shipped classifier for images of `shape`, on `device`."""
    from .networks import classifiers as fx

    if len(shape) == 3 and shape == (1, 8, 8):
        kind = "digits"
    elif len(shape) == 3 and shape[0] == 3 and min(shape[1:]) >= 16:
        kind = "shapes"
    else:
        raise ValueError(f"no shipped feature network for images of shape {tuple(shape)}; "
                         f"use --distance l2 or pseudo_huber")
    key = (kind, str(device))
    if key not in _CACHE:
        net = (fx.load_digits_classifier() if kind == "digits" else fx.load_shapes_classifier())[0]
        body = net.body.to(device).eval()
        for p in body.parameters():
            p.requires_grad_(False)
        _CACHE[key] = body
    return _CACHE[key]


def _activations(body: nn.Sequential, x: Tensor) -> list[Tensor]:
    """Outputs of every ReLU that acts on a conv feature map (4-D), in depth order."""
    out = []
    for layer in body:
        x = layer(x)
        if isinstance(layer, nn.ReLU) and x.ndim == 4:
            out.append(x)
    return out


def _unit(f: Tensor) -> Tensor:
    """f / ||f|| along channels, at each position (LPIPS's normalize_tensor)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS)


def perceptual_distance(x: Tensor, y: Tensor) -> Tensor:
    """LPIPS-style distance (B,) between image batches x, y (B, C, H, W) in about [-1, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"perceptual_distance needs two batches of the same shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"no shipped feature network for images of shape {tuple(x.shape[1:])}; "
                         f"use --distance l2 or pseudo_huber")
    body = _network(tuple(x.shape[1:]), x.device)
    n = len(x)
    # one pass over both batches; float32 for a stable normalisation whatever the autocast dtype
    with torch.autocast(x.device.type, enabled=False):
        feats = _activations(body, torch.cat([x, y]).float())
    terms = [(_unit(f[:n]) - _unit(f[n:])).pow(2).sum(1).mean((1, 2)) for f in feats]
    return torch.stack(terms).mean(0)
