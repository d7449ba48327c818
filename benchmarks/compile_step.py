"""Train-step time with and without torch.compile (inductor) on this machine's CPU.

The step is the trainer's: model.loss(batch) (the loss is the module's forward, so compiling the
model compiles the whole loss), backward, AdamW. Eager and compiled copies start from the same
weights and see the same batches; the compiled copy's first steps (compilation) are timed
separately. One thread (the trainer's CPU policy on small machines).

    python benchmarks/compile_step.py                     # default digits model + Glow, ~4 min on 2 cores
    python benchmarks/compile_step.py --steps 20 --cases digits-edm
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from unifusion import config as C
from unifusion import data, models

CASES = {
    "digits-edm": ("digits-train", {}),  # the default run: UNet, EDM, class-conditional
    "digits-flow-glow": ("digits-train", {"family": "flow-glow"}),
    "moons-mlp": ("moons", {"network": "mlp-2d", "process": "flow", "parametrization": "velocity"}),
}


def _steps(model, batches, draws, n):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(n):
        t = time.perf_counter()
        loss = model({**batches[i % len(batches)], **draws[i % len(draws)]}).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def run(name: str, steps: int, batch: int) -> dict:
    source, overrides = CASES[name]
    src = data.load(source)
    torch.manual_seed(0)
    model = models.build(C.model_spec(C.from_dict({"data": source, **overrides}), src))
    batches = [src.batch(list(range(i * batch, (i + 1) * batch))) for i in range(4)]
    model.initialize(batches[0])
    draws = [model.random(batch, torch.Generator().manual_seed(i)) for i in range(4)]
    eager = copy.deepcopy(model)
    compiled = torch.compile(copy.deepcopy(model))
    t0 = time.perf_counter()
    warm = _steps(compiled, batches, draws, 2)  # compilation of forward and backward
    compile_s = time.perf_counter() - t0
    _steps(eager, batches, draws, 2)
    # interleave the timed runs so that machine noise hits both alike
    e, c = [], []
    for _ in range(3):
        e += _steps(eager, batches, draws, steps // 3)
        c += _steps(compiled, batches, draws, steps // 3)
    me, mc = statistics.median(e), statistics.median(c)
    return {"case": name, "batch": batch, "eager_ms": 1000 * me, "compiled_ms": 1000 * mc, "speedup": me / mc,
            "compile_s": compile_s, "first_steps_ms": [round(1000 * w) for w in warm]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(c, args.steps, args.batch) for c in args.cases.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, median of {args.steps} steps")
    print("| case | eager ms/step | compiled ms/step | speed-up | compile time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup']:.2f}x | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
