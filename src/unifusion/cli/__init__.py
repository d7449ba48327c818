"""The `unifusion` command: parse, then call. No logic here.

Exit codes: 0 success; 2 a user-caused failure (bad flag, config, data, checkpoint, unwritable
folder, full disk), printed as one line `unifusion: error: ...` naming the problem and the fix;
130 interrupted (Ctrl-C / SIGTERM; `train` saves a checkpoint first); 1 an internal error (a bug:
the traceback is printed).
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

EXIT_USER, EXIT_INTERRUPTED = 2, 130
# command -> (module, function(args)), imported only when the command runs
RUNNERS = {"sample": (".sample", "run_sample"), "eval": ("..evaluation.evaluate", "run"),
           "calibrate": (".calibrate", "run_calibrate"), "couple": (".couple", "run_couple"),
           "encode": (".encode", "run_encode"), "ema": (".ema", "run_ema"),
           "finetune": (".finetune", "run_finetune")}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("unifusion: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, RuntimeError, NotImplementedError) as e:  # bad input: one line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.strerror and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            msg += "; nothing was replaced: free some space and retry"
        print(f"unifusion: error: {msg}", file=sys.stderr)
        if _collective_failed(e):
            # a peer that died or froze mid-collective can leave the process group's threads waiting on
            # it, and the interpreter's teardown would wait on them forever; checkpoints are already safe
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USER)
        return EXIT_USER


def _collective_failed(e: BaseException) -> bool:
    """An error in a process that ran collectives (torchrun): gloo reports a peer's timeout or reset
    as a plain RuntimeError, so any error there counts."""
    dist = sys.modules.get("unifusion.training.distributed")
    return bool(getattr(dist, "STARTED", False))


def _version() -> str:
    from .. import __version__
    return __version__


def parser() -> argparse.ArgumentParser:
    from .. import config
    from ..samplers import grids, names
    class fmt(argparse.RawDescriptionHelpFormatter):
        """Examples kept as written, and every option's default shown (unless its help names it)."""

        def _get_help_string(self, action):
            text = action.help or ""
            if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                return text
            return f"{text} (default: %(default)s)"
    p = argparse.ArgumentParser(prog="unifusion", description="Diffusion and flow models from one formulation.")
    p.add_argument("--version", action="version", version=f"unifusion {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample an exact 2-D Gaussian mixture with several samplers and plot it",
                          formatter_class=fmt)
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="seed of the mixture and the noise")

    sub.add_parser("train", help="train a model; no arguments trains the embedded default (digits)", add_help=False,
                   formatter_class=fmt, usage="unifusion train [CONFIG.yaml] [--key value ...]",
                   description="Train a model. Keys come from defaults, then CONFIG.yaml, then --key value flags "
                               "(an example config: examples/digits.yaml).\n\n" + config.help_text())

    sampler_list = "samplers: " + ", ".join(names()) + "\nnoise grids: " + ", ".join(sorted(grids.GRIDS) + ["native"])
    sm = sub.add_parser("sample", help="sample a trained model into an .npz (and a grid PNG)", formatter_class=fmt,
                        epilog=sampler_list + "\n\nexample:\n  unifusion sample --checkpoint runs/digits --nfe 20 "
                                              "--seeds 0-63 --out s.npz --png s.png")
    sm.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint), a checkpoint folder "
                                                        "or a model folder (spec.json + weights)")
    sm.add_argument("--sampler", default=None, help="sampler name (list below; default: the model's own, recorded "
                                                    "when it was trained: e.g. unipc for EDM, dpmpp_2m for models "
                                                    "trained before that, euler or consistency for a few-step student)")
    sm.add_argument("--nfe", type=int, default=None, help="denoiser-call budget (default: the model's own: 20, or a "
                                                          "few-step student's K)")
    sm.add_argument("--n", type=int, default=None, help="how many samples (default: one per seed)")
    sm.add_argument("--seeds", default=None, help="e.g. 0-63 or 1,5,9 (default 0..n-1)")
    sm.add_argument("--out", required=True, help="output .npz: x (N, C, H, W) in [-1, 1], and y when conditional")
    sm.add_argument("--png", default=None, help="also write the samples as one PNG image grid here")
    sm.add_argument("--grid", default=None, help=argparse.SUPPRESS)  # deprecated: --png (eval's --grid is a noise grid)
    sm.add_argument("--noise-grid", default=None, help="sigma grid (default: the model's own, usually 'native')")
    sm.add_argument("--sigma-min", type=float, default=None, help="default: the model's own range")
    sm.add_argument("--sigma-max", type=float, default=None, help="default: the model's own range (inf: pure noise)")
    sm.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional)")
    sm.add_argument("--temperature", type=float, default=1.0,
                    help="scale of the starting noise (flows: z ~ N(0, T^2 I); < 1 trades diversity for quality)")
    sm.add_argument("--label", type=int, default=None, help="one class for all samples (default seed %% classes)")
    sm.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="a text-conditional model's prompt (repeat for several; \"\" is unconditional): --n / "
                         "--seeds samples each, one grid row per prompt (default 8 each)")
    sm.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (an empty line is the "
                                                                   "unconditional prompt)")
    sm.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    sm.add_argument("--size", default=None, metavar="WxH", help="a DiT / MM-DiT's samples at this size, width x height "
                                                              "in pixels, e.g. 48x32 (multiples of the patch; default: "
                                                              "the trained size, or the most frequent of several)")
    sm.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sm.add_argument("--overwrite", action="store_true", help="replace an --out .npz that `sample` did not write")

    ev = sub.add_parser("eval", help="sample a model and score it: FID/KID/precision/recall, accuracy, "
                                     "copy rate, time; --sweep over samplers x NFE (x CFG scale)",
                        formatter_class=fmt,
                        description="Draw N samples per setting (seeds 0..N-1) and score them against the "
                                    "training data; writes eval.csv, eval.json and plots to <run>/eval.",
                        epilog="examples:\n"
                               "  unifusion eval --checkpoint runs/digits                      # its own sampler and NFE\n"
                               "  unifusion eval --checkpoint runs/digits --sampler heun --nfe 35 --nll 297\n"
                               "  unifusion eval --checkpoint runs/digits --sweep --grid karras,tuned\n"
                               "  unifusion eval --checkpoint runs/digits --sweep --samplers dpmpp_2m --nfes 20 "
                               "--cfg-scales 0,1,1.5,2,3,5\n\n" + sampler_list)
    from ..evaluation.evaluate import add_arguments
    add_arguments(ev)
    ca = sub.add_parser("calibrate", help="fit a sampler's sigma grid at one NFE to a trained model",
                        formatter_class=fmt,
                        description="Solve the PF-ODE accurately from --n-ref noises, move the sampler's noise "
                                    "levels to minimise the final-sample error against that reference, and report "
                                    "the error on --n-val other noises next to the karras and tuned grids.",
                        epilog="examples:\n"
                               "  unifusion calibrate --checkpoint runs/digits --sampler dpmpp_2m --nfe 10\n"
                               "  unifusion calibrate --checkpoint runs/digits --sampler ipndm --nfe 5 "
                               "--fit-labels 0-4 --val-labels 5-9\n"
                               "  unifusion eval --checkpoint runs/digits --sampler dpmpp_2m --nfe 10 "
                               "--grid karras,tuned,calibrated\n\n" + sampler_list)
    ca.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint folder or a model folder")
    ca.add_argument("--sampler", default="dpmpp_2m", help="a deterministic fixed-step sampler")
    ca.add_argument("--nfe", type=int, default=10, help="the denoiser-call budget to calibrate for")
    ca.add_argument("--n-ref", type=int, default=64, help="noises fitted on")
    ca.add_argument("--n-val", type=int, default=64, help="held-out noises the report is measured on")
    ca.add_argument("--method", default="auto", help="gradient | powell | nelder-mead | auto")
    ca.add_argument("--fit-labels", default=None, help="class labels of the fit noises, e.g. 0-4 (default all)")
    ca.add_argument("--val-labels", default=None, help="class labels of the held-out noises, e.g. 5-9 (default all)")
    ca.add_argument("--seed", type=int, default=0, help="seed of the noises")
    ca.add_argument("--out", default=None, help="calibration JSON (default <run>/calibration/SAMPLER-nfeN.json); an "
                                                "existing file must be a calibration")
    ca.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a calibration")
    ca.add_argument("--save-to-model", action="store_true",
                    help="also store it in the model folder's spec.json as the default grid for this sampler and NFE")
    ca.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    em = sub.add_parser("ema", help="post-hoc EMA: reconstruct an EMA of any length from a run's snapshots",
                        formatter_class=fmt,
                        description="Karras et al. 2024 (EDM2): a run trained with --posthoc-every K saved two "
                                    "power-function EMA profiles every K steps; any relative std is a least-squares "
                                    "combination of those snapshots. Each std is written as a normal model folder.",
                        epilog="examples:\n"
                               "  unifusion train --posthoc-every 100 --out runs/digits\n"
                               "  unifusion ema --checkpoint runs/digits --std 0.05,0.10,0.15\n"
                               "  unifusion eval --checkpoint runs/digits/posthoc-ema/std-0.100\n"
                               "  unifusion eval --checkpoint runs/digits --ema-sweep 0.02,0.05,0.1,0.15,0.2")
    em.add_argument("--checkpoint", required=True, help="the run folder (its posthoc/ snapshots)")
    em.add_argument("--std", required=True, help="relative stds of the EMAs to reconstruct, e.g. 0.05,0.10,0.15")
    em.add_argument("--at", type=int, default=None, help="the step to reconstruct at (default: the last snapshot)")
    em.add_argument("--out", default=None, help="output folder (default <run>/posthoc-ema; one std-X folder per std)")
    em.add_argument("--overwrite", action="store_true", help="replace std-X folders made at another step or of "
                                                             "another run")
    cp = sub.add_parser("couple", help="draw (noise, sample, label) couplings from a trained model into shards, "
                                       "for reflow and distillation", formatter_class=fmt,
                        description="Sample a teacher from seeds 0..n-1 with any sampler and store each unit noise, "
                                    "its sample and its label in safetensors shards plus index.json. An interrupted "
                                    "run resumes at the first missing shard (no seed duplicated or skipped).",
                        epilog="examples:\n"
                               "  unifusion couple --checkpoint runs/flow --sampler dopri5 --nfe 200 --n 20000 "
                               "--out runs/couplings\n"
                               "  unifusion train --data runs/couplings --reflow --process flow --parametrization "
                               "velocity --init-from runs/flow --out runs/2rf")
    cp.add_argument("--checkpoint", required=True, help="the teacher: a run, checkpoint or model folder")
    cp.add_argument("--sampler", default="dpmpp_2m", help="sampler of the teacher")
    cp.add_argument("--nfe", type=int, default=20, help="denoiser-call budget of the teacher's sampler")
    cp.add_argument("--n", type=int, required=True, help="how many couplings (seeds 0..n-1)")
    cp.add_argument("--out", required=True, help="output folder (shards + index.json)")
    cp.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale of the teacher")
    cp.add_argument("--shard-size", type=int, default=5000, help="couplings per shard")
    cp.add_argument("--batch-size", type=int, default=500, help="samples per batch")
    cp.add_argument("--no-ema", action="store_true", help="use the teacher's raw weights instead of its EMA")
    cp.add_argument("--overwrite", action="store_true", help="delete the couplings already in --out (e.g. of "
                                                             "another teacher) and draw anew")
    en = sub.add_parser("encode", help="encode images into autoencoder latents on disk (shards + index), to train "
                                       "diffusion in latent space", formatter_class=fmt,
                        description="Run every image of --data (in order) through the autoencoder and store the "
                                    "normalised posterior mean and std, labels and captions in safetensors shards "
                                    "plus index.json. An interrupted run resumes at the first missing shard; "
                                    "rerunning on a complete folder does nothing.",
                        epilog="examples:\n"
                               "  unifusion encode --autoencoder runs/ae --data shapes-32-train --out runs/latents\n"
                               "  unifusion encode --autoencoder sd-vae/ --data photos/ --image-size 64 --out lat\n"
                               "  unifusion train --data runs/latents --out runs/ldm\n"
                               "  unifusion sample --checkpoint runs/ldm --n 64 --out s.npz --png s.png  # images")
    en.add_argument("--autoencoder", required=True, help="a unifusion autoencoder (a finished run or its model "
                                                         "folder) or a diffusers AutoencoderKL folder")
    en.add_argument("--data", required=True, help="the images: a dataset name, an image folder, tar shards or .npz")
    en.add_argument("--out", required=True, help="output folder (shards + index.json)")
    en.add_argument("--batch-size", type=int, default=64, help="images per autoencoder call")
    en.add_argument("--per-shard", type=int, default=4096, help="latents per shard")
    en.add_argument("--n", type=int, default=None, help="encode the first N images (default: all)")
    en.add_argument("--image-size", type=int, default=0, help="image folders and tar shards: resize + center-crop "
                                                              "to this size (0 = keep)")
    en.add_argument("--channels", type=int, default=0, help="image folders and tar shards: 1 or 3 (0 = infer)")
    en.add_argument("--keep-size", action="store_true", help="image folders and tar shards: encode each image at its "
                                                             "own size (latents of several sizes: train --pack-tokens)")
    en.add_argument("--max-area", type=int, default=0, help="image folders and tar shards: each image at its own size, "
                                                            "scaled down to at most this many pixels (implies "
                                                            "--keep-size)")
    en.add_argument("--skip-corrupt", action="store_true", help="image folders and tar shards: skip unreadable "
                                                                "images and the damaged part of a truncated shard")
    en.add_argument("--overwrite", action="store_true", help="delete the latents already in --out (e.g. of an "
                                                             "earlier autoencoder) and encode anew")
    ae = sub.add_parser("autoencoder", help="train a KL autoencoder for latent diffusion; measure its latent "
                                            "statistics", formatter_class=fmt,
                        description="train: the training loop with --family autoencoder (defaults: --data shapes-32 "
                                    "--network ae-f4 --out runs/ae), then the latent statistics written into "
                                    "<out>/model. stats: measure them again, or for a checkpoint.",
                        epilog="examples:\n"
                               "  unifusion autoencoder train --steps 800 --out runs/ae\n"
                               "  unifusion autoencoder train --network ae-f8 --disc-weight 0.1 --disc-start 400\n"
                               "  unifusion autoencoder stats --checkpoint runs/ae --n 4096\n"
                               "  unifusion eval --checkpoint runs/ae          # PSNR, SSIM, rFID\n"
                               "  unifusion autoencoder train --help           # every key")
    ae.add_argument("what", choices=["train", "stats"], help="train | stats")
    ae.add_argument("rest", nargs=argparse.REMAINDER, help="train: [CONFIG.yaml] [--key value ...]; stats: "
                                                           "--checkpoint RUN [--n N] [--out DIR]")
    te = sub.add_parser("encoder", help="train a contrastive text-image encoder (CLIP / SigLIP loss) whose text tower "
                                        "conditions text-to-image models", formatter_class=fmt,
                        description="train: the training loop with --family text-image (defaults: --data "
                                    "shapes-t2i-32-train:20000 --loss clip --out runs/text-encoder).",
                        epilog="examples:\n"
                               "  unifusion encoder train --loss siglip --out runs/siglip\n"
                               "  unifusion eval --checkpoint runs/text-encoder     # zero-shot attributes, retrieval\n"
                               "  unifusion train --data runs/latents --text-encoder runs/text-encoder --network "
                               "mmdit-s --out runs/t2i\n"
                               "  unifusion sample --checkpoint runs/t2i --prompt 'a large red square' --n 8 "
                               "--out s.npz --png s.png\n"
                               "  unifusion encoder train --help              # every key")
    te.add_argument("what", choices=["train"], help="train")
    te.add_argument("rest", nargs=argparse.REMAINDER, help="[CONFIG.yaml] [--key value ...]")
    ft = sub.add_parser("finetune", help="reward fine-tuning of a trained model: ddpo, grpo (Flow-GRPO) or draft "
                                         "(DRaFT-K)", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Treat the sampler as a policy and maximise E[reward] - beta KL to the frozen "
                                    "reference (see README, 'Reward fine-tuning'). Writes checkpoints, log.jsonl, "
                                    "reward.png and <out>/model, an ordinary model folder.")
    from .finetune import add_arguments as finetune_arguments
    finetune_arguments(ft)
    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench.add_argument("what", choices=["samplers"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")
    return p


def _main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command != "train":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("sample", "eval", "calibrate", "couple", "encode"):
        from ..training.distributed import set_threads
        set_threads()  # the CPU thread policy of training applies to sampling too
    if args.command == "demo":
        from ..evaluation.demo import run
        run(out=args.out, seed=args.seed)
    elif args.command == "train":
        from .train import run_train
        if any(t in ("-h", "--help") for t in extra):
            family = _family_flag(extra)
            if family is None:
                p._subparsers._group_actions[0].choices["train"].print_help()
            else:  # only the shared keys and that family's own
                from .. import config
                from ..models import registry
                registry.get(family)  # an unknown family: one line naming the known ones
                print(f"usage: unifusion train [CONFIG.yaml] --family {family} [--key value ...]\n\n"
                      + config.help_text(family))
            return 0
        return run_train(extra)
    elif args.command in RUNNERS:  # commands that take the parsed arguments
        import importlib
        module, name = RUNNERS[args.command]
        getattr(importlib.import_module(module, __package__), name)(args)
    elif args.command == "autoencoder":
        from .autoencoder import run_autoencoder
        return run_autoencoder(args.what, args.rest)
    elif args.command == "encoder":
        from .encoder import run_encoder
        return run_encoder(args.what, args.rest)
    elif args.command == "bench":
        from ..evaluation.sampler_bench import main as bench_main
        return bench_main(args.rest) or 0
    return 0


def _family_flag(tokens: list[str]) -> str | None:
    """The value of --family in train's tokens (--family X or --family=X), if given."""
    for i, tok in enumerate(tokens):
        if tok.startswith("--family="):
            return tok.split("=", 1)[1]
        if tok == "--family" and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


if __name__ == "__main__":
    sys.exit(main())
