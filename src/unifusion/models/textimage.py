"""The text-image encoder family ("text-image"): a text transformer and an image encoder trained
contrastively on captioned images (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023), whose
text tower then conditions denoisers (models/conditioning.py TextConditioning).

    loss "clip"    symmetric InfoNCE over the batch, learned temperature (init 1/0.07, capped at 100)
    loss "siglip"  pairwise sigmoid over every (image, caption) pair, learned temperature and bias
                   (open_clip's init: log t' = log 10, b = -10)

Per example (B,) as every family's loss (contrastive.py): under DDP each rank gathers every rank's
features (with gradient) and computes only its own rows, in column blocks of `chunk` (0: the
whole micro-batch), so no rank ever forms the B x B similarity matrix. The negatives of a row
are the global micro-batch (all ranks' rows of one accumulation step).

The tokenizer (data/tokenizer.py) is trained on the training captions when the run starts and
travels inside the spec (training["tokenizer"], its tokenizer.json text, and its sha256), so a
model folder is self-contained; `unifusion train` also writes it next to the weights as
tokenizer.json. Captions reach the loss as `batch["cond"]["caption"]` (a list of strings; the
family wraps its source with data.captioned).

    model = uf.models.load("runs/clip")
    tokens, mask, pooled = model.encode_text(["a large red square"])   # what conditioning uses
    z_img, z_txt = model.embed_images(x), model.embed_texts(captions)  # unit vectors
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import contrastive, networks
from ..data.tokenizer import Tokenizer, train_tokenizer
from .base import Model
from .options import option
from .spec import ModelSpec

LOSSES = ("clip", "siglip")
TOKENIZER_CAPTIONS = 50_000  # training captions the tokenizer is fitted on (the vocabulary of shapes is ~25 words)


@dataclass
class TextImageOptions:
    loss: str = option("clip", "contrastive loss: clip (softmax InfoNCE, learned temperature) | siglip (pairwise "
                               "sigmoid, learned temperature and bias)", choices=LOSSES)
    chunk: int = option(0, "columns of the similarity computed at once per rank (0 = the whole micro-batch); "
                           "bounds memory at B_local x chunk", minimum=0)
    width: int = option(128, "text transformer width (its token features condition denoisers)", minimum=8)
    layers: int = option(4, "text transformer layers", minimum=1)
    heads: int = option(4, "text transformer attention heads", minimum=1)
    embed_dim: int = option(128, "dimension of the shared image-text embedding", minimum=8)
    image_channels: int = option(32, "image encoder base channels", minimum=4)
    context_length: int = option(0, "tokens per caption incl. BOS/EOS (0 = the longest training caption, rounded "
                                    "up to a multiple of 8)", minimum=0)


class TextImageModel(Model):
    """A contrastive text-image encoder (module docstring)."""

    options = TextImageOptions
    previews = False  # no sample grids during training: it does not generate
    scores = "retrieval"  # `unifusion eval`: zero-shot attribute accuracy and retrieval recall@k

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        t = spec.training
        self.tokenizer = Tokenizer(t["tokenizer"])
        self.context_length = int(spec.network["kwargs"]["context_length"])
        self.text = networks.from_description(spec.network)
        self.image = networks.from_description(t["image_network"])
        self.loss_kind, self.chunk = t["loss"], int(t.get("chunk") or 0) or None
        clip = self.loss_kind == "clip"
        self.logit_scale = nn.Parameter(torch.tensor(contrastive.CLIP_LOGIT_SCALE_INIT if clip
                                                     else contrastive.SIGLIP_LOGIT_SCALE_INIT))
        self.logit_bias = nn.Parameter(torch.tensor(0.0 if clip else contrastive.SIGLIP_LOGIT_BIAS_INIT),
                                       requires_grad=not clip)

    # ---------------------------------------------------------------- spec
    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.network != "auto":
            raise ValueError("--family text-image has its own two towers: set them with --width, --layers, --heads, "
                             "--embed-dim, --image-channels instead of --network")
        if cfg.reflow or cfg.init_from:
            raise ValueError("--family text-image trains from captioned images: drop --reflow / --init-from")

    @classmethod
    def spec_from_config(cls, cfg, source, data: dict, made: dict) -> ModelSpec:
        from ..data.source import caption_list
        o = cfg.options
        shape = tuple(source.shape)
        if getattr(source, "kind", "image") != "image" or len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"--family text-image trains on square captioned images; --data {cfg.data} holds "
                             f"{getattr(source, 'kind', '?')} examples of shape {shape}")
        captions = caption_list(source, TOKENIZER_CAPTIONS, what=f"--data {cfg.data}")
        tok = train_tokenizer(captions)
        length = o.context_length or tok.context_length(captions)
        text = networks.check_description({"class": "TextTransformer", "kwargs": {
            "vocab_size": tok.vocab_size, "context_length": length, "width": o.width, "layers": o.layers,
            "heads": o.heads, "mlp_ratio": 4.0, "embed_dim": o.embed_dim}})
        image = networks.check_description({"class": "ImageEncoder", "kwargs": {
            "in_channels": shape[0], "resolution": shape[1], "base_channels": o.image_channels,
            "embed_dim": o.embed_dim}})
        training = {"loss": o.loss, "chunk": o.chunk, "image_network": image, "tokenizer": tok.json_text,
                    "tokenizer_digest": tok.digest(), "captions": len(captions)}
        return ModelSpec(family=cls.family, network=text, process=None, parametrization=None, grid=None,
                         data=data, training=training).validate()

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        spec.network = networks.check_description(spec.network)
        t = spec.training or {}
        if spec.network["class"] != "TextTransformer":
            raise ValueError(f"the text-image family's text tower is a TextTransformer, got {spec.network['class']}")
        missing = sorted({"loss", "image_network", "tokenizer"} - set(t))
        if missing:
            raise ValueError(f"a text-image spec's training needs {missing}")
        if t["loss"] not in LOSSES:
            raise ValueError(f"loss {t['loss']!r} is unknown; choose one of {list(LOSSES)}")
        t["image_network"] = networks.check_description(t["image_network"])
        for name in ("process", "parametrization", "grid"):
            if getattr(spec, name) is not None:
                raise ValueError(f"a text-image encoder has no {name}; set it to null")
        if spec.conditioning.get("kind") != "none":
            raise ValueError("a text-image encoder is trained on captions, not conditioned")

    def data_source(self, source):
        from ..data.source import captioned
        return captioned(source)

    # ---------------------------------------------------------------- towers
    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer.encode(list(captions), self.context_length)
        return ids.to(self.device), mask.to(self.device)

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, width), mask (B, L), pooled (B, width)): the text tower's features, what a
        text-conditional denoiser receives (padding rows of tokens are zero)."""
        ids, mask = self.tokenize(captions)
        tokens, pooled = self.text(ids, mask)
        return tokens, mask, pooled

    def embed_texts(self, captions: list[str]) -> Tensor:
        """(B, embed_dim) unit vectors in the shared space."""
        return F.normalize(self.text.project(self.encode_text(captions)[2]), dim=-1)

    def embed_images(self, x: Tensor) -> Tensor:
        """(B, embed_dim) unit vectors of images in [-1, 1]."""
        return F.normalize(self.image(x.to(self.device, self.logit_scale.dtype)), dim=-1)

    def similarity(self, x: Tensor, captions: list[str]) -> Tensor:
        """(B,) cosine of each image with its caption (the image-text score, e.g. of generated samples)."""
        return (self.embed_images(x) * self.embed_texts(captions)).sum(-1)

    # ---------------------------------------------------------------- loss
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        captions = (batch.get("cond") or {}).get("caption")
        if captions is None:
            raise ValueError("the text-image family trains on captioned images: the batch has no cond.caption")
        img = self.embed_images(batch["x0"])
        txt = self.embed_texts(captions)
        img_all, txt_all = contrastive.gather_features(img), contrastive.gather_features(txt)
        offset = contrastive.rank_offset(len(img))
        if self.loss_kind == "clip":
            return contrastive.clip_loss_rows(img, txt, img_all, txt_all, offset, self.logit_scale, self.chunk)
        return contrastive.siglip_loss_rows(img, txt_all, offset, self.logit_scale, self.logit_bias, self.chunk)

    def extra_files(self) -> dict[str, str]:
        """Files a model folder holds besides the spec and weights (models.io.save)."""
        return {"tokenizer.json": self.tokenizer.json_text}

    @property
    def temperature(self) -> float:
        return 1.0 / math.exp(self.logit_scale.item())
