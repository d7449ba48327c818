"""Feature extractors for the metrics in `evaluation.metrics`: anything with `name`, `dim` and
`__call__(x) -> (N, dim)` for images x (N, C, H, W) in [-1, 1].

  * `digits_features()`: the penultimate layer of a small CNN trained on the 8x8 digits
    (weights shipped with the package, trained by benchmarks/train_digits_classifier.py).
  * `shapes_features()`: the penultimate layer of a small CNN trained on the procedural RGB
    `shapes` (32x32 and 64x64; benchmarks/train_shapes_classifier.py), whose heads also give the
    main object's shape / colour / size and the object count (`shapes_predict`, `shapes_accuracy`).
  * `InceptionV3Features.from_file(path)`: Inception-v3 pool3 (2048-d), the FID convention,
    with weights the user supplies as safetensors (nothing is downloaded).

Weights are read with safetensors only; pickled checkpoints (.pt/.pth) are refused.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.classifiers import (DIGITS_WEIGHTS, SHAPES_HEADS, SHAPES_WEIGHTS, DigitsClassifier,  # noqa: F401
                                    ShapesClassifier, _load_safetensors, load_digits_classifier,
                                    load_shapes_classifier)


@runtime_checkable
class FeatureExtractor(Protocol):
    """x (N, C, H, W) in [-1, 1] -> features (N, dim)."""
    name: str
    dim: int

    def __call__(self, x: Tensor) -> Tensor: ...


@torch.no_grad()
def extract(extractor: FeatureExtractor, x, batch_size: int = 256) -> np.ndarray:
    """Features of all of x, `batch_size` images at a time, as float64 numpy (N, dim)."""
    x = torch.as_tensor(x)
    out = [extractor(x[s:s + batch_size]).double().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


class ClassifierFeatures:
    """A FeatureExtractor around a trained classifier with features(x) and logits(x) (eval mode, no
    gradients); the subclasses name the shipped ones."""

    name = "classifier"
    dim = 0

    def __init__(self, classifier: nn.Module, metadata: dict | None = None):
        self.classifier = classifier.eval()
        self.metadata = metadata or {}

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self.classifier.features(torch.as_tensor(x))

    @torch.no_grad()
    def logits(self, x: Tensor):
        return self.classifier.logits(torch.as_tensor(x))


class DigitsFeatures(ClassifierFeatures):
    """The shipped DigitsClassifier's 128-d penultimate layer; logits (N, 10)."""

    name = "digits-cnn"
    dim = DigitsClassifier.feature_dim


def digits_features(path=DIGITS_WEIGHTS) -> DigitsFeatures:
    """The 128-d digits feature extractor with the shipped weights."""
    net, info = load_digits_classifier(path)
    return DigitsFeatures(net, info)


@torch.no_grad()
def digits_accuracy(x: Tensor, y: Tensor, extractor: DigitsFeatures | None = None,
                    batch_size: int = 512) -> float:
    """Fraction of images x (N, 1, 8, 8) the shipped classifier labels as y (N,): the
    class-conditional accuracy of samples."""
    ex = extractor or digits_features()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.shape != (len(x),):
        raise ValueError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    pred = torch.cat([ex.logits(x[s:s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])
    return float((pred == y.to(pred.device)).double().mean())


# ------------------------------------------------------------------------------- shapes
class ShapesFeatures(ClassifierFeatures):
    """The shipped ShapesClassifier's penultimate layer; logits {head: (N, classes)}."""

    name = "shapes-cnn"
    dim = ShapesClassifier.feature_dim


def shapes_features(path=SHAPES_WEIGHTS) -> ShapesFeatures:
    """The 128-d shapes feature extractor with the shipped weights."""
    net, info = load_shapes_classifier(path)
    return ShapesFeatures(net, info)


@torch.no_grad()
def shapes_predict(x: Tensor, extractor: ShapesFeatures | None = None, batch_size: int = 512) -> dict[str, Tensor]:
    """The classifier's predicted label per head (argmax; "count" as 1..3) of images x (N, 3, H, W)."""
    ex = extractor or shapes_features()
    x = torch.as_tensor(x)
    parts = [{k: v.argmax(1) for k, v in ex.logits(x[s:s + batch_size]).items()} for s in range(0, len(x), batch_size)]
    out = {k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64) for k in SHAPES_HEADS}
    out["count"] = out["count"] + 1
    return out


def shapes_accuracy(x: Tensor, y: Tensor, extractor: ShapesFeatures | None = None, batch_size: int = 512) -> float:
    """Fraction of images x (N, 3, H, W) whose predicted main-object shape AND colour equal the
    class y (N,) (= shape * 8 + colour): the class-conditional accuracy of samples."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.shape != (len(x),):
        raise ValueError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    p = shapes_predict(x, extractor, batch_size)
    n_colours = SHAPES_HEADS["colour"]
    pred = p["shape"] * n_colours + p["colour"]
    return float((pred == y.to(pred.device)).double().mean())


# ---------------------------------------------------------------------------- Inception-v3
# Module names, shapes and buffers follow torchvision's `Inception3` exactly (Szegedy et al.
# 2016), so a torchvision state dict saved as safetensors loads with strict=True. variant="fid"
# adds the three differences of the TF FID network (pytorch-fid's FIDInception*, 1008 classes,
# no aux head): average pools that exclude padding, and a max pool in the last block.

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor, fid: bool) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, fid: bool = False):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, cin, 35, 35) -> (N, 224 + pool_features, 35, 35)
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x, self.fid)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (N, 288, 35, 35) -> (N, 768, 17, 17)
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int, fid: bool = False):
        super().__init__()
        c7, self.fid = channels_7x7, fid
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, 768, 17, 17) -> (N, 768, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x, self.fid))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (N, 768, 17, 17) -> (N, 1280, 8, 8)
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str = "avg"):
        super().__init__()
        self.pool = pool  # "avg" (torchvision), "avg_nopad" or "max" (TF FID net, Mixed_7b / 7c)
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, cin, 8, 8) -> (N, 2048, 8, 8)
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            p = _avg3(x, fid=self.pool == "avg_nopad")
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(p),
        ], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: unused for features, present so torchvision weights load strictly."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv0 = BasicConv2d(cin, 128, kernel_size=1)
        self.conv1 = BasicConv2d(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.conv0(F.avg_pool2d(x, 5, stride=3)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionV3Features(nn.Module):
    """Inception-v3 pool3 features (N, 2048) of images (N, 1 or 3, H, W) in [-1, 1].

    Preprocessing (the FID convention): clamp to [-1, 1], repeat gray to 3 channels, resize to
    299x299 bilinearly (align_corners=False, no antialias, as pytorch-fid), and feed the [-1, 1]
    values directly: both the TF FID network and torchvision's ported Google weights
    (`transform_input=True` maps ImageNet-normalised input back to this range) expect x/127.5-1.

    variant="torchvision": torchvision's Inception3 layout (with AuxLogits and fc, num_classes
    from the weights). variant="fid": the TF FID network as ported by pytorch-fid (pools that
    exclude padding, max pool in Mixed_7c, 1008 classes, no AuxLogits); only with those weights
    (pt_inception-2015-12-05, converted to safetensors) are scores comparable to published FIDs.
    """

    dim = 2048

    def __init__(self, variant: str = "torchvision", num_classes: int | None = None, aux_logits: bool | None = None):
        super().__init__()
        if variant not in ("torchvision", "fid"):
            raise ValueError(f"unknown Inception variant {variant!r}; choose 'torchvision' or 'fid'")
        fid = variant == "fid"
        self.variant, self.name = variant, f"inception-v3-{variant}"
        num_classes = num_classes or (1008 if fid else 1000)
        aux_logits = (not fid) if aux_logits is None else aux_logits
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)   # (N, 32, 149, 149)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)            # (N, 32, 147, 147)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)  # (N, 64, 147, 147)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)                          # (N, 64, 73, 73)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)            # (N, 80, 73, 73)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)           # (N, 192, 71, 71)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)                          # (N, 192, 35, 35)
        self.Mixed_5b = InceptionA(192, 32, fid)                           # (N, 256, 35, 35)
        self.Mixed_5c = InceptionA(256, 64, fid)                           # (N, 288, 35, 35)
        self.Mixed_5d = InceptionA(288, 64, fid)                           # (N, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                                    # (N, 768, 17, 17)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)                          # (N, 768, 17, 17)
        self.AuxLogits = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)                                    # (N, 1280, 8, 8)
        self.Mixed_7b = InceptionE(1280, "avg_nopad" if fid else "avg")    # (N, 2048, 8, 8)
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")          # (N, 2048, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)                             # (N, 2048, 1, 1): pool3
        self.fc = nn.Linear(2048, num_classes)  # unused for features; kept for strict loading
        self.eval()

    @classmethod
    def from_file(cls, path, variant: str = "auto") -> "InceptionV3Features":
        """Load weights from a safetensors file with torchvision's key names (strict).

        variant="auto": "fid" when the file has no AuxLogits keys and a 1008-way fc (pytorch-fid's
        converted TF weights), else "torchvision". Pickled .pt/.pth files are refused with the
        one-line conversion to safetensors.
        """
        state, _ = _load_safetensors(path)
        if "fc.weight" not in state:
            raise ValueError(f"{path}: no 'fc.weight'; expected an Inception-v3 state dict with "
                             f"torchvision's key names (Conv2d_1a_3x3.conv.weight, ..., fc.weight)")
        num_classes = state["fc.weight"].shape[0]
        aux = any(k.startswith("AuxLogits.") for k in state)
        if variant == "auto":
            variant = "fid" if (num_classes == 1008 and not aux) else "torchvision"
        net = cls(variant, num_classes=num_classes, aux_logits=aux)
        net.load_state_dict(state, strict=True)
        return net.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionV3Features expects images (N, 1 or 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        p = next(self.parameters())
        x = x.to(p.device, p.dtype).clamp(-1, 1).expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return self.avgpool(x).flatten(1)  # (N, 2048)

    def train(self, mode: bool = True):
        # a feature extractor: BatchNorm must always use its running statistics
        return super().train(False)
