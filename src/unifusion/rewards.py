"""Rewards for fine-tuning (training/finetune.py): a reward is one function

    reward(x, cond) -> Tensor (B,)

of decoded samples x (data space: images (B, C, H, W) in [-1, 1], or vectors (B, D)) and their
condition (None, {"y": labels (B,)} or {"caption": [str] * B}); higher is better. On the command
line it is a built-in name below or `module:function` (an importable module; the current folder is
searched first), with keyword options from --reward-args '{key: value}' passed through.

Built-ins, each with the range of its values:

    classifier         log p(target | x) under a shipped classifier (digits 8x8, shapes RGB); (-inf, 0] nats,
                       0 = the classifier is certain. target: "label" (the sample's own class: prompt alignment of
                       a class-conditional model), a class index, attributes of the shapes' main object
                       ("colour=red", "colour=red,shape=circle", sizes, count), or "caption" (a text model's
                       prompt: log p of the size, colour and shape its caption names). Differentiable.
    compressibility    minus the size of the image as a JPEG (quality 95) or PNG file, in kB; (-inf, 0]. On 8x8
                       digits about -0.45..-0.35 (JPEG: a ~330-byte header plus the coded pixels). Not differentiable.
    incompressibility  the size itself, [0, inf) kB. Not differentiable.
    quadratic          -||x - center||^2 / (2 scale^2): the analytic reward of the 2-D toys; (-inf, 0], 0 at the
                       centre. For a Gaussian-mixture reference the KL-regularised optimum p_ref exp(r / beta) is
                       again a Gaussian mixture (`tilt`), so its exact samples are known. Differentiable.
"""
from __future__ import annotations

import importlib
import io
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Reward:
    """A reward function with what the fine-tuning loop needs to know about it."""
    fn: Callable
    name: str
    range: str = "unknown (a user function)"
    differentiable: bool | None = None  # None: unknown until tried (a user function)

    def __call__(self, x: Tensor, cond: dict | None) -> Tensor:
        return self.fn(x, cond)


BUILTIN: dict[str, tuple[Callable, str, bool]] = {}  # name -> (factory(spec, **options) -> fn, range, differentiable)


def builtin(name: str, range: str, differentiable: bool):
    def wrap(factory):
        BUILTIN[name] = (factory, range, differentiable)
        return factory
    return wrap


def names() -> list[str]:
    return sorted(BUILTIN)


def describe() -> str:
    """One line per built-in: name, range, differentiable (for --help)."""
    return "\n".join(f"  {n:<18} {r}{'' if d else ' (not differentiable)'}" for n, (_, r, d) in sorted(BUILTIN.items()))


def load(name: str, spec, options: dict | None = None) -> Reward:
    """The reward `name` (a built-in, or module:function) for a model of this spec (its data shape
    and conditioning). A bad name, module, attribute or option is a one-line ValueError."""
    options = dict(options or {})
    if name in BUILTIN:
        factory, rng, diff = BUILTIN[name]
        try:
            fn = factory(spec, **options)
        except TypeError as e:
            raise ValueError(f"--reward {name}: {e}; see the built-in's options in `unifusion finetune --help`") from None
        return Reward(fn, name, rng, diff)
    module, colon, attr = name.partition(":")
    if not colon or not module or not attr:
        raise ValueError(f"--reward {name!r} is neither a built-in ({', '.join(names())}) nor module:function")
    if os.getcwd() not in sys.path:  # `unifusion` run as a console script does not search the current folder
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"--reward {name}: cannot import {module!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward {name}: {module} has no callable {attr!r}")
    return Reward((lambda x, cond: fn(x, cond, **options)) if options else fn, name)


# ------------------------------------------------------------------------------ helpers
def image_shape(spec) -> tuple[int, ...]:
    """The shape of a decoded sample: a latent model's images, else the data's own."""
    data = spec.data
    return tuple(data["image_shape"]) if data.get("kind") == "latent" else tuple(data["shape"])


def _images(x: Tensor, what: str) -> Tensor:
    if x.ndim != 4:
        raise ValueError(f"the {what} reward needs images (B, C, H, W), got samples of shape {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------ classifier
ATTRIBUTES = ("shape", "colour", "size", "count")


@builtin("classifier", "(-inf, 0] nats: log p(target | x); 0 = the classifier is certain", True)
def classifier(spec, target="label", network: str = "auto"):
    """log p(target | x) under the shipped digits or shapes classifier (module docstring)."""
    from .data import shapes as S
    from .networks.classifiers import load_digits_classifier, load_shapes_classifier
    shape = image_shape(spec)
    if network == "auto":
        network = "digits" if shape == (1, 8, 8) else "shapes" if len(shape) == 3 and shape[0] == 3 else None
        if network is None:
            raise ValueError(f"--reward classifier: no shipped classifier reads samples of shape {shape} (digits: "
                             "(1, 8, 8); shapes: (3, H, W)); give your own reward as module:function")
    if network not in ("digits", "shapes"):
        raise ValueError(f"--reward classifier: network must be auto, digits or shapes, got {network!r}")
    net = (load_digits_classifier if network == "digits" else load_shapes_classifier)()[0]
    for p in net.parameters():
        p.requires_grad_(False)
    kind = spec.conditioning.get("kind", "none")
    classes = 10 if network == "digits" else S.NUM_CLASSES
    target = str(target).strip()
    if target == "label" and kind != "class":
        raise ValueError("--reward classifier: target 'label' needs a class-conditional model; give a class "
                         "(--reward-args '{target: 3}')" + (" or 'caption'" if kind == "text" else ""))
    if target == "label" and spec.num_classes != classes:
        raise ValueError(f"--reward classifier: the model has {spec.num_classes} classes but the {network} classifier "
                         f"{classes}; give a target")
    if target == "caption" and (kind != "text" or network != "shapes"):
        raise ValueError("--reward classifier: target 'caption' needs a text-conditional model of shapes images")
    wanted: dict[str, int] = {}
    if target not in ("label", "caption"):
        if re.fullmatch(r"\d+", target):
            if not int(target) < classes:
                raise ValueError(f"--reward classifier: class {target} is not one of the {classes} classes")
            wanted["class"] = int(target)
        elif network == "digits":
            raise ValueError(f"--reward classifier: digits targets are 'label' or a class 0-9, got {target!r}")
        else:
            wanted = _attributes(target, S)

    def log_probs(x: Tensor) -> dict[str, Tensor]:
        net.to(x.device)
        out = net.logits(_images(x, "classifier"))
        return {k: v.log_softmax(1) for k, v in (out.items() if isinstance(out, dict) else {"class": out}.items())}

    def reward(x: Tensor, cond: dict | None) -> Tensor:
        lp = log_probs(x)
        if target == "label":
            y = torch.as_tensor((cond or {})["y"], device=x.device).long()
            return lp["class"].gather(1, y[:, None])[:, 0]
        if target == "caption":
            parsed = [_caption(c, S) for c in (cond or {})["caption"]]
            total = x.new_zeros(len(x))
            for head in ("size", "colour", "shape"):
                idx = torch.tensor([p.get(head, -1) for p in parsed], device=x.device)
                got = lp[head].gather(1, idx.clamp(min=0)[:, None])[:, 0]
                total = total + torch.where(idx >= 0, got, torch.zeros_like(got))
            return total
        return sum(lp[head][:, k] for head, k in wanted.items())
    return reward


def _attributes(text: str, S) -> dict[str, int]:
    """'colour=red,shape=circle' -> {"colour": 1, "shape": 0} (head -> class index of ShapesClassifier)."""
    values = {"shape": list(S.SHAPES), "colour": list(S.COLOUR_NAMES), "size": list(S.SIZES), "count": ["1", "2", "3"]}
    out = {}
    for part in text.split(","):
        head, eq, value = part.strip().partition("=")
        head = "colour" if head == "color" else head
        if not eq or head not in values or value.strip() not in values[head]:
            raise ValueError(f"--reward classifier: target {text!r}: give 'label', a class index, or head=value pairs "
                             f"from {', '.join(f'{h}: {v}' for h, v in values.items())}")
        out[head] = values[head].index(value.strip())
    return out


def _caption(text: str, S) -> dict[str, int]:
    """The main object's size / colour / shape named at the start of a shapes caption ('a large red circle ...')."""
    m = re.match(r"\s*an?\s+(?:(small|large)\s+)?(?:(\w+)\s+)?(circle|square|triangle)", text)
    if not m:
        return {}
    out = {"shape": S.SHAPES.index(m.group(3))}
    if m.group(1):
        out["size"] = S.SIZES.index(m.group(1))
    if m.group(2) in S.COLOUR_NAMES:
        out["colour"] = S.COLOUR_NAMES.index(m.group(2))
    return out


# ------------------------------------------------------------------------------ compressibility
def file_kb(x: Tensor, format: str = "jpeg", quality: int = 95) -> Tensor:
    """The size in kB (1000 bytes) of each image of x (B, C, H, W) in [-1, 1] saved as 8-bit JPEG or PNG."""
    import numpy as np
    from PIL import Image
    a = ((_images(x, "compressibility").detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    sizes = []
    for img in a.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else np.ascontiguousarray(img))
        pil.save(buf, format="JPEG", quality=int(quality)) if format == "jpeg" else pil.save(buf, format="PNG")
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=x.device)


def _format(format: str) -> str:
    if format not in ("jpeg", "png"):
        raise ValueError(f"--reward compressibility: format must be jpeg or png, got {format!r}")
    return format


@builtin("compressibility", "(-inf, 0] kB: minus the JPEG (or PNG) file size", False)
def compressibility(spec, format: str = "jpeg", quality: int = 95):
    """DDPO's JPEG compressibility: -size in kB."""
    _check_image_spec(spec, "compressibility")
    fmt = _format(format)
    return lambda x, cond: -file_kb(x, fmt, quality)


@builtin("incompressibility", "[0, inf) kB: the JPEG (or PNG) file size", False)
def incompressibility(spec, format: str = "jpeg", quality: int = 95):
    """DDPO's JPEG incompressibility: +size in kB."""
    _check_image_spec(spec, "incompressibility")
    fmt = _format(format)
    return lambda x, cond: file_kb(x, fmt, quality)


def _check_image_spec(spec, what: str) -> None:
    shape = image_shape(spec)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"--reward {what} needs a model of images (1 or 3 channels), not of shape {shape}")


# ------------------------------------------------------------------------------ the analytic toy reward
class Quadratic:
    """r(x) = -||x - c||^2 / (2 l^2) (c: center, l: scale)."""

    def __init__(self, center: Tensor, scale: float):
        self.center, self.scale = center.to(torch.float64), float(scale)

    def __call__(self, x: Tensor, cond: dict | None = None) -> Tensor:
        d = x.flatten(1) - self.center.to(x.device, x.dtype)
        return -0.5 * (d * d).sum(1) / self.scale**2

    def tilt(self, weights: Tensor, means: Tensor, covs: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        """The Gaussian mixture p(x) exp(r(x) / beta) / Z for p = sum_k w_k N(mu_k, S_k): with tau^2 =
        l^2 beta, component k becomes N(P_k (S_k^-1 mu_k + c / tau^2), P_k), P_k = (S_k^-1 + I / tau^2)^-1,
        with weight proportional to w_k N(c; mu_k, S_k + tau^2 I) (a product of two Gaussians)."""
        w, mu, S = weights.double(), means.double(), covs.double()
        d = mu.shape[1]
        tau2 = self.scale**2 * beta
        eye = torch.eye(d, dtype=torch.float64)
        prec = torch.linalg.inv(S) + eye / tau2
        P = torch.linalg.inv(prec)
        P = 0.5 * (P + P.transpose(1, 2))
        m = torch.einsum("kij,kj->ki", P, torch.einsum("kij,kj->ki", torch.linalg.inv(S), mu) + self.center / tau2)
        C = S + tau2 * eye
        diff = self.center - mu
        logN = -0.5 * torch.einsum("ki,kij,kj->k", diff, torch.linalg.inv(C), diff) - 0.5 * torch.logdet(C) \
            - 0.5 * d * math.log(2 * math.pi)
        logw = w.log() + logN
        return (logw - logw.logsumexp(0)).exp(), m, P


@builtin("quadratic", "(-inf, 0]: -||x - center||^2 / (2 scale^2); 0 at the centre", True)
def quadratic(spec, center=None, scale: float = 1.0):
    shape = tuple(spec.data["shape"])
    d = math.prod(shape)
    c = torch.zeros(d, dtype=torch.float64) if center is None else torch.as_tensor(center, dtype=torch.float64).flatten()
    if c.numel() != d:
        raise ValueError(f"--reward quadratic: center has {c.numel()} values, the samples {d} (shape {shape})")
    if not float(scale) > 0:
        raise ValueError(f"--reward quadratic: scale must be > 0, got {scale}")
    return Quadratic(c, float(scale))
