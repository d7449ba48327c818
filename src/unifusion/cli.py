"""The `unifusion` command: parse, then call. No logic here."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unifusion", description="Diffusion and flow models from one formulation.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample an exact 2-D Gaussian mixture with several samplers and plot it")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench.add_argument("what", choices=["samplers"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .evaluation.demo import run
        run(out=args.out, seed=args.seed)
    elif args.command == "bench":
        from .evaluation.sampler_bench import main as bench_main
        return bench_main(args.rest) or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
