"""`unifusion couple`: (noise, sample, label) couplings from any trained model with any sampler,
into resumable disk shards (data/couplings.py) for reflow and distillation."""
from __future__ import annotations

import math
import warnings

import torch

from .. import models
from ..data.couplings import write_couplings
from ..models.base import seed_noise
from ..safeio import tensors_digest


def run_couple(args) -> dict:
    """Everything is checked (arguments, teacher, and the first shard's samples) before --out is
    written, so a refused command leaves it as it was."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be >= 1")
    if args.nfe < 1:
        raise ValueError(f"--nfe must be >= 1, got {args.nfe}")
    if not math.isfinite(args.cfg):
        raise ValueError(f"--cfg must be a finite number, got {args.cfg}")
    from ..samplers import names
    if args.sampler not in names():
        raise ValueError(f"unknown sampler {args.sampler!r}; choose from {names()}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.load(args.checkpoint, use_ema=not args.no_ema, device=device)
    spec = model.spec
    if model.one_pass:
        raise ValueError(f"a {spec.family} model maps noise to data in one exact inverse pass; its couplings need no "
                         "sampler (draw them with model.sample(noise=...)) and reflow would not straighten them")
    if not callable(getattr(model, "denoise", None)):
        raise ValueError(f"--checkpoint {args.checkpoint} is a model of the {spec.family} family, which has no "
                         "sampler to draw couplings with; give a diffusion or flow model (a run, checkpoint or model "
                         "folder)")
    if args.cfg != 1 and not spec.num_classes:
        raise ValueError(f"--cfg {args.cfg:g} needs a class-conditional teacher; this one is unconditional")
    header = {"teacher": {"where": str(model.info.get("where")), "step": model.info.get("step"),
                          "weights": model.info.get("weights"), "digest": tensors_digest(model.state_dict()),
                          "family": spec.family,
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
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            x, cond = model.sample(seeds=seeds, noise=noise, sampler=args.sampler, nfe=args.nfe, cfg=args.cfg,
                                   batch_size=args.batch_size, return_cond=True,
                                   **({"decode": False} if latent else {}))
        ok = torch.isfinite(x.reshape(len(seeds), -1)).all(1)
        if not bool(ok.all()):  # refused here with the sampler's diagnosis (write_couplings would refuse too)
            bad = [s for s, good in zip(seeds, ok.tolist()) if not good]
            why = next((str(w.message).split(": ", 1)[-1].split(" (")[0] for w in caught if "NaN" in str(w.message)),
                       "")
            raise ValueError(f"the teacher's samples for seed(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} are not "
                             f"finite (NaN or inf{'; ' + why if why else ''}), so nothing of this shard is stored; "
                             "check the teacher, or try another --sampler, --nfe or --cfg")
        for w in caught:  # the warnings of a good batch, as they were
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out = {"noise": noise, "x0": x.float()}
        if spec.num_classes:
            out["y"] = cond["y"].long()
        return out

    index = write_couplings(args.out, args.n, args.shard_size, draw, header, overwrite=args.overwrite)
    print(f"wrote {index['count']} couplings of {spec.shape} ({args.sampler}, NFE {args.nfe}) to {args.out}; "
          f"train on them with `unifusion train --data {args.out} --reflow --process flow --parametrization "
          f"velocity [--init-from {args.checkpoint}]`")
    return index
