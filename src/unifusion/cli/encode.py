"""`unifusion encode`: images from any data source -> autoencoder latents in resumable disk shards
(data/latents.py), for `unifusion train --data DIR`."""
from __future__ import annotations

import torch

from .. import data as datasets
from ..data import latents


def run_encode(args) -> dict:
    if args.per_shard < 1 or args.batch_size < 1:
        raise ValueError(f"--per-shard and --batch-size must be >= 1, got {args.per_shard} and {args.batch_size}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if latents.is_latents(args.data):
        raise ValueError(f"--data {args.data} is already a latents folder; give the image data it was encoded from")
    from ..models.autoencoder import load_autoencoder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ae = load_autoencoder(args.autoencoder, device=device)
    options = {k: v for k, v in (("image_size", args.image_size), ("channels", args.channels),
                                 ("skip_corrupt", args.skip_corrupt), ("keep_size", getattr(args, "keep_size", False)),
                                 ("max_area", getattr(args, "max_area", 0))) if v}
    try:
        source = datasets.load(args.data, **options)
    except ValueError as e:  # an image folder of mixed sizes: name the size the autoencoder takes
        raise latents.size_hint(e, ae) from None
    # nothing is written (or, with --overwrite, deleted) before the first shard is encoded
    index, written = latents.encode_latents(ae, source, args.out, data=latents.source_name(args.data),
                                            data_options=options, count=args.n, per_shard=args.per_shard,
                                            batch_size=args.batch_size, overwrite=args.overwrite)
    shape = "x".join(map(str, index["shape"]))
    if written == 0:
        print(f"{args.out} already holds all {index['count']} latents ({shape}) of {args.data}; nothing to do")
    else:
        print(f"wrote {index['count']} latents ({shape}, posterior mean and std) of {args.data} to {args.out}; "
              f"train on them with `unifusion train --data {args.out}`")
    return {"out": str(args.out), "index": index, "written": written}
