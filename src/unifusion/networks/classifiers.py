"""The classifiers the package ships, as plain networks: a small CNN for sklearn's 8x8 digits
and a multi-head CNN for the procedural `shapes` (weights digits_classifier.safetensors and
shapes_classifier.safetensors next to this file, trained by benchmarks/train_digits_classifier.py
and benchmarks/train_shapes_classifier.py). Evaluation wraps them as feature extractors
(evaluation/features.py); the perceptual distance (perceptual.py) uses their conv bodies.

Weights are read with safetensors only; pickled checkpoints are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIGITS_WEIGHTS = Path(__file__).with_name("digits_classifier.safetensors")
SHAPES_WEIGHTS = Path(__file__).with_name("shapes_classifier.safetensors")


def _check_images(x: Tensor, channels: int, where: str) -> Tensor:
    """x if it is (N, channels, H, W), else a ValueError naming `where` and the shape found."""
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{where} expects images (N, {channels}, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    return x


def _load_safetensors(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """State dict and metadata of a safetensors file; pickled checkpoints are refused with the
    one-line conversion (safeio.read_safetensors)."""
    from ..safeio import read_safetensors

    return read_safetensors(path, with_metadata=True)


# ------------------------------------------------------------------------------- digits
class DigitsClassifier(nn.Module):
    """Small CNN for 8x8x1 digits; the 128-d penultimate activations are the features."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),   # (N, 32, 8, 8)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),  # (N, 64, 8, 8)
            nn.MaxPool2d(2),                             # (N, 64, 4, 4)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),  # (N, 64, 4, 4)
            nn.MaxPool2d(2),                             # (N, 64, 2, 2)
            nn.Flatten(),                                # (N, 256)
            nn.Linear(256, self.feature_dim), nn.ReLU(),  # (N, 128): the features
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 8, 8) in [-1, 1] -> (N, 128). Inputs are clamped to [-1, 1] first, as samples
        are before they are written out, so overshooting samples are scored as they would be saved."""
        _check_images(x, 1, "DigitsClassifier")
        if x.shape[-2:] != (8, 8):
            raise ValueError(f"DigitsClassifier expects 8x8 images, got {tuple(x.shape[-2:])}")
        return self.body(x.float().clamp(-1, 1))

    def logits(self, x: Tensor) -> Tensor:
        """(N, 1, 8, 8) -> (N, 10) class logits."""
        return self.head(self.dropout(self.features(x)))

    forward = logits


def load_digits_classifier(path=DIGITS_WEIGHTS) -> tuple[DigitsClassifier, dict]:
    """The shipped (or a given) digits classifier in eval mode, and its training metadata."""
    state, meta = _load_safetensors(path)
    net = DigitsClassifier()
    net.load_state_dict(state, strict=True)
    info = json.loads(meta.get("unifusion", "{}"))
    return net.eval(), info



SHAPES_HEADS = {"shape": 3, "colour": 8, "size": 2, "count": 3, "class": 24}  # of the main object; count 1..3


class ShapesClassifier(nn.Module):
    """Small CNN for the procedural `shapes` images (3, H, W): heads for the main object's
    shape, colour, size, the object count and the class (shape x colour); the 128-d penultimate
    activations are the features.

    Images are first box-resampled to 32x32 (a 64x64 shapes image becomes, up to rounding, its
    32x32 rendering), because size is relative to the image: a conv net with global pooling sees
    pixels, and trained on both resolutions it confused a small object at 64 with a large one at
    32 (size 64% and count 61% right at 64x64). FID on shapes-64 is thus measured at 32x32, as
    Inception measures every resolution at 299x299. `body` is fully convolutional, so the
    perceptual distance runs it at the native resolution."""

    feature_dim = 128
    input_size = 32

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),      # (N, 32, H, W)
            nn.MaxPool2d(2),                                                    # (N, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),     # (N, 64, H/2, W/2)
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),     # (N, 64, H/2, W/2)
            nn.MaxPool2d(2),                                                    # (N, 64, H/4, W/4)
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),   # (N, 128, H/4, W/4)
            nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),  # (N, 128, H/4, W/4)
        )
        self.project = nn.Sequential(nn.Linear(256, self.feature_dim), nn.ReLU())  # [avg, max] pool -> features
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({k: nn.Linear(self.feature_dim, n) for k, n in SHAPES_HEADS.items()})

    def features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 128); inputs are clamped to [-1, 1] first, as samples
        are before they are written out."""
        _check_images(x, 3, "ShapesClassifier")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"ShapesClassifier expects images of at least 16x16, got {tuple(x.shape[-2:])}")
        x = x.float().clamp(-1, 1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        h = self.body(x)
        return self.project(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))

    def logits(self, x: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) -> {head: (N, classes)} for the heads in SHAPES_HEADS."""
        f = self.dropout(self.features(x))
        return {k: head(f) for k, head in self.heads.items()}

    forward = logits


def load_shapes_classifier(path=SHAPES_WEIGHTS) -> tuple[ShapesClassifier, dict]:
    """The shipped (or a given) shapes classifier in eval mode, and its training metadata."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no shapes classifier at {path}; train it with "
                                f"`python benchmarks/train_shapes_classifier.py`")
    state, meta = _load_safetensors(path)
    net = ShapesClassifier()
    net.load_state_dict(state, strict=True)
    return net.eval(), json.loads(meta.get("unifusion", "{}"))


# ------------------------------------------------------------------------------- shapes attributes
SHAPES_ATTRIBUTES_WEIGHTS = Path(__file__).with_name("shapes_attributes.safetensors")
# head -> classes; in the `shapes` label order (data/shapes.py: SHAPES, COLOURS, SIZES, RELATIONS), with
# a last "none" class where object 1 may be absent; "count" is count - 1 (1..3 objects)
ATTRIBUTE_HEADS = {"shape": 3, "colour": 8, "size": 2,            # object 0, the main (largest) object
                   "shape2": 3 + 1, "colour2": 8 + 1, "size2": 2 + 1,  # object 1 (the one the caption names
                   "count": 3,                                    # second), last class: none
                   "relation": 4 + 1}                             # of object 0 to object 1; last: none


class ShapesAttributeClassifier(nn.Module):
    """Multi-head CNN reading the caption's attributes off a `shapes` image (standard or t2i):
    the main object's shape, colour and size, the second object's (or "none"), the object count
    and the relation of object 0 to object 1 (or "none"): what GenEval-style prompt-following
    scores need (evaluation/geneval.py). Like ShapesClassifier, inputs are box-resampled to 32x32.

    Which object is which matters here, so besides the [avg, max]-pooled features the heads see
    two attention-pooled ones: a 1x1 convolution scores every cell of the 8x8 map for each role
    (main, second), a softmax over the cells turns each score map into weights, and the features
    and the (x, y) centre under each weighting are pooled (a spatial soft-argmax; the relation
    is then read from the two centres). Separate from ShapesClassifier, whose features (FID)
    must not change."""

    input_size = 32

    def __init__(self, width: int = 32, hidden: int = 192, dropout: float = 0.1):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),                  # (N, w, 32, 32)
            nn.MaxPool2d(2),                                                              # (N, w, 16, 16)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),          # (N, 2w, 16, 16)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),      # (N, 2w, 16, 16)
            nn.MaxPool2d(2),                                                              # (N, 2w, 8, 8)
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),      # (N, 4w, 8, 8)
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),      # (N, 4w, 8, 8)
        )
        self.roles = nn.Conv2d(4 * w, 2, 1)                                               # (N, 2, 8, 8) scores
        self.project = nn.Sequential(nn.Linear(4 * 4 * w + 6, hidden), nn.ReLU())        # -> (N, hidden)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in ATTRIBUTE_HEADS.items()})

    def features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] (clamped first) -> (N, hidden)."""
        _check_images(x, 3, "ShapesAttributeClassifier")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"ShapesAttributeClassifier expects images of at least 16x16, got {tuple(x.shape[-2:])}")
        x = x.float().clamp(-1, 1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        h = self.body(x)                                                   # (N, C, 8, 8)
        a = self.roles(h).flatten(2).softmax(-1)                           # (N, 2, 64): weights per role
        side = h.shape[-1]
        c = (torch.arange(side, device=h.device, dtype=h.dtype) + 0.5) / side
        xy = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)  # (64, 2): cell centres (x, y)
        pooled = a @ h.flatten(2).transpose(1, 2)                          # (N, 2, C)
        centre = a @ xy                                                    # (N, 2, 2)
        return self.project(torch.cat([h.mean((2, 3)), h.amax((2, 3)), pooled.flatten(1), centre.flatten(1),
                                       centre[:, 0] - centre[:, 1]], 1))

    def logits(self, x: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) -> {head: (N, classes)} for the heads in ATTRIBUTE_HEADS."""
        f = self.dropout(self.features(x))
        return {k: head(f) for k, head in self.heads.items()}

    forward = logits

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 500) -> dict[str, Tensor]:
        """Predicted labels (N,) int64 per head, in the data's convention: "count" as 1..3, the
        "none" class of shape2 / colour2 / size2 / relation as -1. Runs in eval mode."""
        was = self.training
        self.eval()
        try:
            parts = [{k: v.argmax(1) for k, v in self.logits(x[i:i + batch_size]).items()}
                     for i in range(0, len(x), batch_size)]
        finally:
            self.train(was)
        out = {k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
               for k in ATTRIBUTE_HEADS}
        out["count"] = out["count"] + 1
        for k in ("shape2", "colour2", "size2", "relation"):
            out[k] = torch.where(out[k] == ATTRIBUTE_HEADS[k] - 1, -1, out[k])
        return out


def load_shapes_attributes(path=SHAPES_ATTRIBUTES_WEIGHTS) -> tuple[ShapesAttributeClassifier, dict]:
    """The shipped (or a given) shapes attribute classifier in eval mode, and its training metadata
    (held-out accuracy per head and variant, the command, the date)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no shapes attribute classifier at {path}; train it with "
                                f"`python benchmarks/train_shapes_attributes.py`")
    state, meta = _load_safetensors(path)
    info = json.loads(meta.get("unifusion", "{}"))
    net = ShapesAttributeClassifier(**info.get("kwargs", {}))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return net.eval(), info
