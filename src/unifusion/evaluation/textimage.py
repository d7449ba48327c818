"""Scores of a text-image encoder (models/textimage.py) on held-out captioned images.

Retrieval: N held-out images and their N captions, embedded; image -> text recall@k is the share of
images whose k nearest captions (cosine) include one whose text equals its own caption (captions
repeat in the shapes data, so a caption identical to the true one counts); text -> image recall@k
the share of captions whose k nearest images include one with that caption.

Zero-shot attributes (shapes data): for every held-out image, the encoder picks among captions
that differ from the main object's true phrase "a {size} {colour} {shape}" in one attribute only
(8 colours, 3 shapes, 2 sizes; for two-object images the position word among the 4 relations,
the rest of the caption true); the accuracy is the share picked right, against chance 1/8, 1/3,
1/2 and 1/4.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..safeio import atomic_write


@torch.no_grad()
def embed(model, x: torch.Tensor, captions: list[str], batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.cat([model.embed_images(x[s:s + batch_size]).cpu() for s in range(0, len(x), batch_size)])
    txts = torch.cat([model.embed_texts(captions[s:s + batch_size]).cpu() for s in range(0, len(captions), batch_size)])
    return imgs, txts


def recall_at(sim: torch.Tensor, query_caps: list[str], key_caps: list[str], ks=(1, 5)) -> dict[str, float]:
    """Recall@k of queries (rows of sim) against keys (columns): a hit when one of the k best keys
    has the query's caption."""
    order = sim.argsort(dim=1, descending=True)[:, :max(ks)].numpy()
    keys = np.array(key_caps, dtype=object)
    out = {}
    for k in ks:
        hits = [query_caps[i] in set(keys[order[i, :k]]) for i in range(len(query_caps))]
        out[f"r@{k}"] = float(np.mean(hits))
    return out


def retrieval(model, x: torch.Tensor, captions: list[str], batch_size: int = 500) -> dict:
    imgs, txts = embed(model, x, captions, batch_size)
    sim = imgs @ txts.T
    i2t, t2i = recall_at(sim, captions, captions), recall_at(sim.T, captions, captions)
    return {"image_to_text": i2t, "text_to_image": t2i, "n": len(x), "distinct_captions": len(set(captions))}


@torch.no_grad()
def zero_shot_attributes(model, x: torch.Tensor, attrs: dict, batch_size: int = 500) -> dict[str, float]:
    """Accuracy per attribute (module docstring) from the shapes attributes of the images."""
    from ..data.shapes import COLOUR_NAMES, RELATIONS, SHAPES, SIZES
    n = len(x)
    imgs = torch.cat([model.embed_images(x[s:s + batch_size]).cpu() for s in range(0, n, batch_size)])

    def phrase(size, colour, shape):
        return f"a {SIZES[size]} {COLOUR_NAMES[colour]} {SHAPES[shape]}"

    def pick(rows: list[int], candidates: list[list[str]]) -> np.ndarray:
        flat = [c for cs in candidates for c in cs]
        txt = torch.cat([model.embed_texts(flat[s:s + batch_size]).cpu() for s in range(0, len(flat), batch_size)])
        txt = txt.view(len(rows), len(candidates[0]), -1)
        return torch.einsum("nd,ncd->nc", imgs[rows], txt).argmax(1).numpy()

    sz, col, shp = attrs["size"][:, 0], attrs["colour"][:, 0], attrs["shape"][:, 0]
    rows = list(range(n))
    out = {}
    for name, truth, count, make in (
            ("colour", col, len(COLOUR_NAMES), lambda i, v: phrase(sz[i], v, shp[i])),
            ("shape", shp, len(SHAPES), lambda i, v: phrase(sz[i], col[i], v)),
            ("size", sz, len(SIZES), lambda i, v: phrase(v, col[i], shp[i]))):
        pred = pick(rows, [[make(i, v) for v in range(count)] for i in rows])
        out[name] = float((pred == truth[rows]).mean())
    two = [i for i in rows if attrs["count"][i] >= 2]
    if two:
        rel = attrs["relation"]
        second = [phrase(attrs["size"][i, 1], attrs["colour"][i, 1], attrs["shape"][i, 1]) for i in two]
        cands = [[f"{phrase(sz[i], col[i], shp[i])} {r} {second[j]}" for r in RELATIONS] for j, i in enumerate(two)]
        out["position"] = float((pick(two, cands) == rel[two]).mean())
    return out


def run_retrieval(args, model) -> dict:
    """`unifusion eval` of a text-image encoder: retrieval on N held-out images and, on shapes
    data, zero-shot attribute accuracy; a table, and <run>/eval/eval.json."""
    from .. import data as datasets
    from ..models.io import run_folder
    from .evaluate import held_out_spec
    spec = model.spec
    if args.nll:
        raise ValueError("--nll: a text-image encoder has no likelihood; drop --nll")
    source, options = spec.data.get("source"), spec.data.get("options") or {}
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "eval"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for eval.json")
    held = held_out_spec(source, options)
    data, which = ((datasets.load(held[0], **held[1]), f"held-out {held[0]}") if held else
                   (datasets.load(source, **options), f"training {source} (no held-out split known)"))
    n = min(args.n, len(data))
    x = data.arrays(n)[0] if hasattr(data, "arrays") else torch.stack([data[i]["x0"] for i in range(n)])
    captions = datasets.caption_list(data, n, what=which)
    r = {"retrieval": retrieval(model, x, captions, args.batch_size)}
    if callable(getattr(data, "attributes", None)):
        r["zero_shot"] = zero_shot_attributes(model, x, data.attributes(range(n)), args.batch_size)
    rr = r["retrieval"]
    print(f"text-image encoder: {model.info.get('where')} (step {model.info.get('step')}, loss {spec.training['loss']}, "
          f"temperature {model.temperature:.4f}); images: {which}, n = {n} ({rr['distinct_captions']} distinct captions)")
    print("| image->text r@1 | r@5 | text->image r@1 | r@5 |" + "".join(f" zero-shot {k} |" for k in r.get("zero_shot", {}))
          + "\n|---|---|---|---|" + "---|" * len(r.get("zero_shot", {})) + "\n"
          + f"| {rr['image_to_text']['r@1']:.3f} | {rr['image_to_text']['r@5']:.3f} | {rr['text_to_image']['r@1']:.3f} "
            f"| {rr['text_to_image']['r@5']:.3f} |" + "".join(f" {v:.3f} |" for v in r.get("zero_shot", {}).values()))
    result = {"checkpoint": str(args.checkpoint), "step": model.info.get("step"), "images": which, **r}
    atomic_write(out / "eval.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'eval.json'}")
    return result
