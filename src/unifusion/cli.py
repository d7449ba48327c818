"""The `unifusion` command: parse, then call. No logic here."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: one clear line, no traceback
        print(f"unifusion: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unifusion", description="Diffusion and flow models from one formulation.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample an exact 2-D Gaussian mixture with several samplers and plot it")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("train", help="train a model; no arguments trains the embedded default (digits)",
                   description="unifusion train [CONFIG.yaml] [--key value ...]: any TrainConfig key, "
                               "e.g. --data moons --network mlp-2d --steps 2000 --out runs/moons --resume")
    sm = sub.add_parser("sample", help="sample a trained checkpoint into an .npz (and a grid PNG)")
    sm.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its latest)")
    sm.add_argument("--sampler", default="dpmpp_2m")
    sm.add_argument("--nfe", type=int, default=20)
    sm.add_argument("--n", type=int, default=None, help="how many samples (default: one per seed)")
    sm.add_argument("--seeds", default=None, help="e.g. 0-63 or 1,5,9 (default 0..n-1)")
    sm.add_argument("--out", required=True, help="output .npz: x (N, C, H, W) in [-1, 1], and y when conditional")
    sm.add_argument("--grid", default=None, help="also write the samples as one PNG grid")
    sm.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional)")
    sm.add_argument("--label", type=int, default=None, help="one class for all samples (default seed %% classes)")
    sm.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ev = sub.add_parser("eval", help="sample a checkpoint and score it: FID/KID/precision/recall, accuracy, "
                                     "copy rate, time; --sweep over samplers x NFE (x CFG scale)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Draw N samples per setting (seeds 0..N-1) and score them against the "
                                    "training data; writes eval.csv, eval.json and plots to <run>/eval.",
                        epilog="examples:\n"
                               "  unifusion eval --checkpoint runs/digits                      # dpmpp_2m, NFE 20\n"
                               "  unifusion eval --checkpoint runs/digits --sampler heun --nfe 35 --nll 297\n"
                               "  unifusion eval --checkpoint runs/digits --sweep --grid karras,tuned\n"
                               "  unifusion eval --checkpoint runs/digits --sweep --samplers dpmpp_2m --nfes 20 "
                               "--cfg-scales 0,1,1.5,2,3,5")
    from .evaluation.evaluate import add_arguments
    add_arguments(ev)
    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench.add_argument("what", choices=["samplers"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "demo":
        from .evaluation.demo import run
        run(out=args.out, seed=args.seed)
    elif args.command == "train":
        from .config import load
        from .training.loop import train
        config_path = extra.pop(0) if extra and not extra[0].startswith("--") else None
        cfg = load(config_path, overrides(extra))
        res = train(cfg)
        if res["rank"] != 0:  # rank 0 reports for the run
            return 130 if res["interrupted"] else 0
        if res["interrupted"]:
            print(f"interrupted; checkpoint saved to {res['checkpoint']}. Continue with: unifusion train"
                  f"{' ' + config_path if config_path else ''} --out {cfg.out} --resume")
            return 130
        print(f"done. outputs in {res['out']}:\n  checkpoint:   {res['checkpoint']}\n  samples:      {res['samples']}"
              f"\n  loss curve:   {res['loss_curve']}\n  log:          {res['log']}")
    elif args.command == "sample":
        from .training.sample_cli import run_sample
        run_sample(args)
    elif args.command == "eval":
        from .evaluation.evaluate import run as run_eval
        run_eval(args)
    elif args.command == "bench":
        from .evaluation.sampler_bench import main as bench_main
        return bench_main(args.rest) or 0
    return 0


def overrides(tokens: list[str]) -> dict:
    """['--steps', '10', '--resume'] -> {'steps': '10', 'resume': 'true'}."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise SystemExit(f"unifusion train: expected --key value, got {tok!r}")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                val, i = tokens[i + 1], i + 1
            else:
                val = "true"
        out[key] = val
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
