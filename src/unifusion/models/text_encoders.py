"""Frozen text encoders for text conditioning: turn captions into what a denoiser attends to.

    enc = load_text_encoder(path)           # a unifusion text-image model (run or model folder), or a
                                            # transformers CLIPTextModel / T5EncoderModel folder
    tokens, mask, pooled = enc.encode(["a large red square"])   # (B, L, width), (B, L) bool, (B, pooled_dim)
    enc.describe()                           # {"kind", "path", "digest", "width", "pooled_dim", "context_length"}

A text-conditional model records describe() in its spec (as a latent model records its
autoencoder) and refuses another encoder by digest (check_text_encoder). The encoder is frozen
(eval mode, no gradients) and never part of the model's state_dict, optimizer, EMA or DDP.

transformers is an optional extra (`pip install unifusion[transformers]`): CLIP's pooled vector is
its pooler_output (the EOS token's final state); T5 has none, so its pooled vector is the mean of
the real tokens' states. A folder without its tokenizer files is refused with one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

TRANSFORMERS_TYPES = {"clip_text_model": "CLIPTextModel", "clip": "CLIPTextModel", "t5": "T5EncoderModel"}


class OwnTextEncoder:
    """The text tower of a unifusion text-image model (models/textimage.py)."""

    kind = "unifusion"

    def __init__(self, model, origin: dict):
        self.model, self.origin = model.eval().requires_grad_(False), origin
        self.width = int(model.text.width)
        self.pooled_dim = self.width
        self.context_length = int(model.context_length)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        tokens, mask, pooled = self.model.encode_text(list(captions))
        return tokens.float(), mask, pooled.float()

    def similarity(self, x: Tensor, captions: list[str]) -> Tensor:
        """The image-text score of images with captions (cosine in the shared space)."""
        with torch.no_grad():
            return self.model.similarity(x, list(captions))

    def to(self, device):
        self.model.to(device)
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, **self.origin, "width": self.width, "pooled_dim": self.pooled_dim,
                "context_length": self.context_length}


class TransformersTextEncoder:
    """A local transformers CLIPTextModel or T5EncoderModel folder with its tokenizer."""

    kind = "transformers"

    def __init__(self, folder: Path, origin: dict, device="cpu"):
        try:
            import transformers
        except ImportError:
            raise ValueError(f"{folder} is a transformers model folder; install the optional extra: "
                             "pip install 'unifusion[transformers]'") from None
        config = json.loads((folder / "config.json").read_text())
        cls_name = TRANSFORMERS_TYPES[config.get("model_type")]
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # no tokenizer files: transformers raises several kinds
            raise ValueError(f"{folder} has no usable tokenizer ({type(e).__name__}); save it there with "
                             "tokenizer.save_pretrained(FOLDER) next to the model") from None
        self.model = getattr(transformers, cls_name).from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True).to(device).eval().requires_grad_(False)
        self.origin, self.cls_name = origin, cls_name
        self.width = int(self.model.config.hidden_size if cls_name == "CLIPTextModel" else self.model.config.d_model)
        self.pooled_dim = self.width
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0)
                                  or getattr(self.tokenizer, "model_max_length", 77))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state.float() * mask[..., None]
        if self.cls_name == "CLIPTextModel":
            pooled = out.pooler_output.float()
        else:  # T5: the mean of the real tokens
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return tokens, mask, pooled

    def similarity(self, x, captions):
        raise ValueError("a transformers text encoder has no image tower: no image-text score")

    def to(self, device):
        self.model.to(device)
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, **self.origin, "width": self.width, "pooled_dim": self.pooled_dim,
                "context_length": self.context_length}


def is_transformers_folder(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in TRANSFORMERS_TYPES
    except (ValueError, OSError):
        return False


def _digest_of(files: list[Path]) -> str:
    from .autoencoder import file_digest
    import hashlib
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(file_digest(f).encode())
    return h.hexdigest()


def load_text_encoder(path: str | Path, device="cpu"):
    """A frozen text encoder (module docstring) from a unifusion text-image model or run, or a
    transformers folder; a one-line ValueError for anything else."""
    from . import io
    from .autoencoder import _model_folder, file_digest
    p = Path(path)
    if not p.exists():
        raise ValueError(f"text encoder {path} does not exist; give a text-image run (`unifusion encoder train`) or "
                         "a transformers CLIPTextModel / T5EncoderModel folder")
    if is_transformers_folder(p):
        weights = sorted(p.glob("*.safetensors"))
        if not weights:
            raise ValueError(f"{p} has no .safetensors weights (pickled .bin files are not loaded); save the model "
                             "with save_pretrained(FOLDER, safe_serialization=True)")
        origin = {"path": str(p.resolve()), "digest": _digest_of(weights)}
        return TransformersTextEncoder(p, origin, device)
    folder = _model_folder(p)
    if folder is None:
        raise ValueError(f"{path} is not a finished text-image run or model folder (no spec.json; a run still "
                         "training has none: use its finished <run>/model)")
    spec = io.read(folder)[0]
    if spec.family != "text-image":
        raise ValueError(f"{path} is a {spec.family} model, not a text encoder; give a run of `unifusion encoder "
                         "train` (family text-image) or a transformers text model folder")
    model = io.load(folder, device=device)
    used = folder / (io.EMA_FILE if model.info["weights"] == "ema" else io.WEIGHTS_FILE)
    return OwnTextEncoder(model, {"path": str(folder.resolve()), "digest": file_digest(used)})


def check_text_encoder(enc, recorded: dict) -> None:
    """Raise one ValueError when `enc` is not the encoder `recorded` describes (its weights or its
    feature sizes differ): a model conditions on the features of the encoder it was trained with."""
    have = enc.describe()
    for key in ("width", "pooled_dim"):
        if recorded.get(key) is not None and int(recorded[key]) != have[key]:
            raise ValueError(f"this model was trained with text features of {key} {recorded[key]} "
                             f"({recorded.get('path')}), but {have['path']} gives {have[key]}; pass the encoder it "
                             "was trained with")
    if recorded.get("digest") and recorded["digest"] != have["digest"]:
        raise ValueError(f"this model was trained with text encoder {recorded.get('path')} (digest "
                         f"{str(recorded['digest'])[:16]}), not {have['path']} (digest {have['digest'][:16]}): its "
                         "weights changed; restore that encoder or retrain the model")
