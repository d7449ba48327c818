"""`unifusion couple`: (noise, sample, label) couplings from any trained model with any sampler,
into resumable disk shards (data/couplings.py) for reflow and distillation."""
from __future__ import annotations

import torch

from .. import models
from ..data.couplings import write_couplings
from ..models.base import seed_noise


def run_couple(args) -> dict:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.load(args.checkpoint, use_ema=not args.no_ema, device=device)
    spec = model.spec
    if model.one_pass:
        raise ValueError(f"a {spec.family} model maps noise to data in one exact inverse pass; its couplings need no "
                         "sampler (draw them with model.sample(noise=...)) and reflow would not straighten them")
    from ..samplers import names
    if args.sampler not in names():
        raise ValueError(f"unknown sampler {args.sampler!r}; choose from {names()}")
    header = {"teacher": {"where": str(model.info.get("where")), "step": model.info.get("step"),
                          "weights": model.info.get("weights"), "family": spec.family,
                          "process": spec.process, "parametrization": spec.parametrization},
              "sampler": {"name": args.sampler, "nfe": args.nfe, "cfg": args.cfg},
              "shape": list(spec.shape), "num_classes": spec.num_classes,
              "class_names": spec.conditioning.get("class_names"), "kind": "image" if spec.data.get("range") else
              "latent", "data_source": spec.data.get("source"), "data_options": spec.data.get("options") or {}}
    latent = spec.data.get("kind") == "latent"
    if latent:  # couplings in the teacher's latent space: a student trained on them decodes with its autoencoder
        header["kind"] = "latent"
        header["latent"] = {k: spec.data[k] for k in ("autoencoder", "image_shape", "image_range", "latents")
                            if k in spec.data}

    def draw(seeds: list[int]) -> dict:
        noise = seed_noise(spec.shape, seeds)
        with torch.no_grad():
            x, cond = model.sample(seeds=seeds, noise=noise, sampler=args.sampler, nfe=args.nfe, cfg=args.cfg,
                                   batch_size=args.batch_size, return_cond=True,
                                   **({"decode": False} if latent else {}))
        out = {"noise": noise, "x0": x.float()}
        if spec.num_classes:
            out["y"] = cond["y"].long()
        return out

    index = write_couplings(args.out, args.n, args.shard_size, draw, header)
    print(f"wrote {index['count']} couplings of {spec.shape} ({args.sampler}, NFE {args.nfe}) to {args.out}; "
          f"train on them with `unifusion train --data {args.out} --reflow --process flow --parametrization "
          f"velocity [--init-from {args.checkpoint}]`")
    return index
