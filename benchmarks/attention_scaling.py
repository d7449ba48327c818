"""Time and peak memory of the token mixers against sequence length: softmax attention, linear attention
(ReLU, SANA's) and GAU / FLASH mixed chunk attention (networks/attention.py), forward + backward, on CPU.

One sequence of N tokens (batch 1) through either one DiT block (`--part block`: adaLN, the mixer, the MLP:
what a layer of the network costs) or the mixer alone (`--part mixer`), at width 128 with 4 heads (the
mmdit-s width) by default. Each (mixer, N) runs in its own process with one thread: the time is that
process's CPU time (time.process_time, so other jobs on a shared machine do not count) per forward +
backward, the best of --repeats after one warm-up; the memory is the peak RSS during those passes minus the
RSS before them (VmHWM reset through /proc/self/clear_refs), in MiB. The crossover printed is the shortest N
from which a linear mixer is faster (and smaller) than softmax attention at every longer N measured.

    python benchmarks/attention_scaling.py                       # block, N = 256 .. 16384
    python benchmarks/attention_scaling.py --part mixer
    python benchmarks/attention_scaling.py --lengths 256,1024 --repeats 1   # smoke
    python benchmarks/attention_scaling.py --device cuda --lengths 256,1024,4096,16384,65536 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
MIXERS = ("softmax", "linear", "gau")


def rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def child(mixer: str, n: int, part: str, width: int, heads: int, repeats: int, chunk: int, device: str = "cpu") -> dict:
    import torch

    from unifusion.networks.attention import TokenMixer
    from unifusion.networks.dit import DiTBlock
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda_child(mixer, n, part, width, heads, repeats, chunk, dev)
    if part == "block":
        net = DiTBlock(width, heads, 4.0, "rms", attention=mixer, chunk_size=chunk)
        emb = torch.randn(1, width)

        def run(x):
            return net(x, emb)
    else:
        net = TokenMixer(width, heads, "rms", mixer, chunk_size=chunk)

        def run(x):
            return net(x)
    x = torch.randn(1, n, width, requires_grad=True)
    run(x).square().mean().backward()  # warm-up
    net.zero_grad(set_to_none=True)
    x.grad = None
    before, _ = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        run(x).square().mean().backward()
        best = min(best, time.process_time() - t)
        net.zero_grad(set_to_none=True)
        x.grad = None
    _, peak = rss_mib()
    return {"mixer": mixer, "n": n, "seconds": best, "peak_mib": max(0.0, peak - before)}


def _cuda_child(mixer, n, part, width, heads, repeats, chunk, dev) -> dict:
    """On a GPU: wall time after synchronize, max_memory_allocated above the inputs."""
    import torch

    from unifusion.networks.attention import TokenMixer
    from unifusion.networks.dit import DiTBlock
    net = (DiTBlock(width, heads, 4.0, "rms", attention=mixer, chunk_size=chunk) if part == "block"
           else TokenMixer(width, heads, "rms", mixer, chunk_size=chunk)).to(dev)
    emb = torch.randn(1, width, device=dev)
    x = torch.randn(1, n, width, device=dev, requires_grad=True)

    def run():
        (net(x, emb) if part == "block" else net(x)).square().mean().backward()
        net.zero_grad(set_to_none=True)
        x.grad = None
    run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return {"mixer": mixer, "n": n, "seconds": best, "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def measure(mixer, n, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mixer, str(n), "--part", args.part, "--width", str(args.width),
           "--heads", str(args.heads), "--repeats", str(args.repeats), "--chunk", str(args.chunk),
           "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        return {"mixer": mixer, "n": n, "seconds": None, "peak_mib": None, "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def crossover(rows: list[dict], mixer: str, key: str) -> int | None:
    """The shortest N from which `mixer` beats softmax on `key` at every longer N measured."""
    by = {(r["mixer"], r["n"]): r[key] for r in rows}
    ns = sorted({r["n"] for r in rows})
    best = None
    for n in reversed(ns):
        a, s = by.get((mixer, n)), by.get(("softmax", n))
        if a is None or s is None or a >= s:
            break
        best = n
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--mixers", default=",".join(MIXERS))
    ap.add_argument("--part", choices=("block", "mixer"), default="block")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64, help="GAU's chunk length")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (process CPU time, RSS) or cuda (wall time, allocated memory)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.part, args.width, args.heads, args.repeats,
                               args.chunk, args.device)))
        return
    from tables import table
    mixers = args.mixers.split(",")
    rows = []
    for n in (int(v) for v in args.lengths.split(",")):
        for m in mixers:
            r = measure(m, n, args)
            rows.append(r)
            print(f"  {m:8s} N={n:6d}: {r['seconds']} s, {r['peak_mib']} MiB", file=sys.stderr, flush=True)
    wide = []
    for n in sorted({r["n"] for r in rows}):
        row = {"n": n}
        for r in rows:
            if r["n"] == n:
                row[f"{r['mixer']}_s"], row[f"{r['mixer']}_mib"] = r["seconds"], r["peak_mib"]
        wide.append(row)
    cols = [("n", "tokens N", 0)] + [(f"{m}_s", f"{m} s", 3) for m in mixers] + \
           [(f"{m}_mib", f"{m} MiB", 0) for m in mixers]
    how = ("1 CPU thread (process CPU time, best of {r}; peak RSS increase)" if args.device == "cpu" else
           "{d} (wall time after synchronize, best of {r}; peak allocated above the inputs)")
    print(f"forward + backward of one {'DiT block' if args.part == 'block' else 'token mixer'}, width {args.width}, "
          f"{args.heads} heads, batch 1, " + how.format(r=args.repeats, d=args.device))
    print(table(wide, cols))
    for m in mixers:
        if m != "softmax":
            print(f"crossover {m} vs softmax: faster from N = {crossover(rows, m, 'seconds')}, "
                  f"smaller from N = {crossover(rows, m, 'peak_mib')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
