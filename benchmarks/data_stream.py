"""Streaming an image folder: throughput and memory of `data.StepBatches` over a folder of
procedural 64x64 RGB PNGs, for several DataLoader worker counts.

Each worker count runs in its own subprocess (fresh allocator, its own process tree). A thread
samples the memory of that tree (the process and its DataLoader workers) every --interval
seconds from /proc: the sum of VmRSS (counts pages shared between processes once per process)
and the sum of Pss (shared pages split between their users: the tree's real footprint). The
table gives images/s over the timed steps (the first batch, which starts the workers, is timed
apart), and the tree's PSS after the first batch, at the end and at its peak: "flat" means the
end is close to the start however many steps run, i.e. the set is not accumulating in memory.

    .venv/bin/python benchmarks/data_stream.py [--n 50000] [--steps 200] [--workers 0,1,2]
                                               [--folder DIR] [--batch 128]

The folder (default: $TMPDIR/unifusion-data-stream-<n>) is generated once, with --gen-procs
processes, and reused while its `.complete` marker matches --n/--size/--classes. Images are
labelled: class k = index % --classes, in subfolders 00, 01, ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARKER = ".complete"


# ---------------------------------------------------------------------------- the folder
def draw(i: int, size: int):
    """Image i: a colour-gradient background and 3-6 random filled shapes, from seed i."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    bg = (c0 * (1 - ramp) + c1 * ramp).repeat(size, 1).astype(np.uint8)
    img = Image.fromarray(bg)
    pen = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 7)):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        box, fill = [int(x0), int(y0), int(x0 + w), int(y0 + h)], tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            pen.ellipse(box, fill=fill)
        elif shape == 1:
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    return img


def _write_range(args: tuple[str, int, int, int, int]) -> int:
    folder, start, stop, size, classes = args
    for i in range(start, stop):
        sub = Path(folder) / (f"{i % classes:02d}" if classes else "")
        draw(i, size).save(sub / f"{i:06d}.png")
    return stop - start


def ensure_folder(folder: Path, n: int, size: int, classes: int, procs: int) -> Path:
    """Generate the folder unless its marker says it already holds these images."""
    want = {"n": n, "size": size, "classes": classes}
    marker = folder / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == want:
            return folder
        raise SystemExit(f"{folder} holds another image set ({marker.read_text().strip()}); "
                         f"delete it or pass another --folder")
    for k in range(classes) or [None]:
        (folder / (f"{k:02d}" if k is not None else "")).mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(str(folder), s, min(n, s + chunk), size, classes) for s in range(0, n, chunk)]
    t0 = time.perf_counter()
    from multiprocessing import Pool
    with Pool(procs) as pool:
        done = 0
        for k in pool.imap_unordered(_write_range, jobs):
            done += k
            print(f"\rwriting {folder}: {done}/{n}", end="", file=sys.stderr, flush=True)
    print(f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    marker.write_text(json.dumps(want))  # last: a crash mid-way leaves no marker, so it is redone
    return folder


# ---------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/<pid>/task/*/children."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # the process just exited
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Samples (seconds, steps done, tree RSS sum MiB, tree PSS sum MiB, processes) until stopped."""

    def __init__(self, interval: float, progress):
        super().__init__(daemon=True)
        self.interval, self.progress, self.samples = interval, progress, []
        self._stop_event, self._t0 = threading.Event(), time.perf_counter()

    def sample(self) -> None:
        pids = tree(os.getpid())
        rss = sum(_status_kib(p, "VmRSS") for p in pids) / 1024
        pss = sum(_pss_kib(p) for p in pids) / 1024
        self.samples.append((round(time.perf_counter() - self._t0, 3), self.progress(), round(rss, 1),
                             round(pss, 1), len(pids)))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------------------- one run
def child(folder: str, workers: int, steps: int, batch: int, interval: float) -> dict:
    """Iterate `steps` batches of StepBatches with `workers` workers; timings and memory."""
    from unifusion import data

    src = data.load(folder)
    done = [0]
    mem = MemorySampler(interval, lambda: done[0])
    mem.start()
    t0 = time.perf_counter()
    checksum = 0.0
    with data.StepBatches(src, seed=0, batch_size=batch, num_workers=workers, end_step=steps + 1) as it:
        first = next(it)
        t1 = time.perf_counter()
        mem.sample()
        after_first = mem.samples[-1]
        for b in it:
            checksum += float(b["x0"][:, 0, 0, 0].sum())  # touch the batch, as a consumer would
            done[0] += 1
        t2 = time.perf_counter()
        mem.sample()
        at_end = mem.samples[-1]  # workers still alive
    mem.stop()
    return {"workers": workers, "n": len(src), "steps": steps, "batch": batch, "shape": list(first["x0"].shape),
            "first_batch_s": t1 - t0, "seconds": t2 - t1, "images_per_s": steps * batch / (t2 - t1),
            "pss_first": after_first[3], "pss_end": at_end[3], "pss_peak": max(s[3] for s in mem.samples),
            "rss_peak": max(s[2] for s in mem.samples), "main_hwm": _status_kib(os.getpid(), "VmHWM") / 1024,
            "procs": max(s[4] for s in mem.samples), "checksum": checksum, "samples": mem.samples}


def train_child(folder: str, workers: int, steps: int, interval: float) -> dict:
    """The real trainer on the folder (resized to 32x32, the unet-32 preset, batch 64): memory of
    the process tree over the run, from the first step to the last."""
    from unifusion import config
    from unifusion.training import loop as L

    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "log.jsonl"
        mem = MemorySampler(interval, lambda: len(log.read_text().splitlines()) if log.exists() else 0)
        mem.start()
        cfg = config.from_dict({"data": folder, "image_size": 32, "network": "unet-32", "batch_size": 64,
                                "steps": steps, "num_workers": workers, "log_every": 1, "sample_every": 0,
                                "checkpoint_every": steps, "sample_nfe": 2, "out": d})
        L._preview = lambda *a, **k: None  # the memory of training, not of drawing a grid
        t0 = time.perf_counter()
        L.train(cfg, progress=False)
        seconds = time.perf_counter() - t0
        mem.stop()
    running = [s for s in mem.samples if s[1] >= 1]  # from the first logged step on
    quarter = running[len(running) // 4]
    return {"workers": workers, "steps": steps, "seconds": seconds, "pss_quarter": quarter[3],
            "pss_end": running[-1][3], "pss_peak": max(s[3] for s in running), "procs": max(s[4] for s in running)}


def run_child(args, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", str(workers), "--folder", str(args.folder), "--steps",
           str(args.steps), "--batch", str(args.batch), "--interval", str(args.interval),
           "--train-steps", str(args.train_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| workers | processes | images/s | first batch s | tree PSS after 1st batch MiB | tree PSS end MiB "
            "| tree PSS peak MiB | tree RSS-sum peak MiB | main VmHWM MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['procs']} | {r['images_per_s']:.0f} | {r['first_batch_s']:.2f} "
                     f"| {r['pss_first']:.0f} | {r['pss_end']:.0f} | {r['pss_peak']:.0f} | {r['rss_peak']:.0f} "
                     f"| {r['main_hwm']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="images in the folder")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per worker count")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10, help="0: unlabelled (flat folder)")
    ap.add_argument("--gen-procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--interval", type=float, default=0.25, help="memory sampling period (s)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row and its samples here")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="instead: run the trainer this many steps on the folder per worker count")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child is not None:
        if args.train_steps:
            print(json.dumps(train_child(str(args.folder), args._child, args.train_steps, args.interval)))
        else:
            print(json.dumps(child(str(args.folder), args._child, args.steps, args.batch, args.interval)))
        return
    args.folder = args.folder or Path(tempfile.gettempdir()) / f"unifusion-data-stream-{args.n}"
    ensure_folder(args.folder, args.n, args.size, args.classes, args.gen_procs)
    rows = []
    if args.train_steps:
        print("| workers | processes | train steps | seconds | tree PSS at 1/4 MiB | tree PSS end MiB | peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for w in (int(s) for s in args.workers.split(",")):
            r = run_child(args, w)
            print(f"| {w} | {r['procs']} | {r['steps']} | {r['seconds']:.0f} | {r['pss_quarter']:.0f} | "
                  f"{r['pss_end']:.0f} | {r['pss_peak']:.0f} |", flush=True)
        return
    for w in (int(s) for s in args.workers.split(",")):
        rows.append(run_child(args, w))
        r = rows[-1]
        print(f"workers={w}: {r['images_per_s']:.0f} images/s, tree PSS {r['pss_first']:.0f} -> "
              f"{r['pss_end']:.0f} MiB (peak {r['pss_peak']:.0f})", file=sys.stderr)
    assert len({r["checksum"] for r in rows}) == 1, "the batches differ between worker counts"
    print(f"\n{args.n} PNGs {args.size}x{args.size} in {args.folder}, {args.steps} steps of batch {args.batch} "
          f"(+1 untimed first batch), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
