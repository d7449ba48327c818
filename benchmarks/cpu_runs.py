"""CPU-budgeted runs of the CLI for the benchmark scripts: one thread per process, one job at a
time; CPU time is the children's user + system time (resource.getrusage), so it counts what the
work cost, not what the wall clock says (it holds when another process shares the cores), and
a `done.json` in a kept folder lets a rerun continue where an earlier one stopped."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

QUIET = ["--sample-every", "0", "--threads", "1", "--checkpoint-every", "100000", "--log-every", "50"]


def cli_cpu(args: list[str]) -> float:
    """Run `unifusion ARGS` with one thread; returns the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "unifusion", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def steps_for(train: list[str], budget: float, tmp: Path, short: int = 8, long: int = 40) -> tuple[int, float]:
    """Steps that fit `budget` CPU seconds, from pilots of `short` and `long` steps (their
    difference removes start-up and final outputs); also the CPU seconds per step."""
    a = cli_cpu([*train, "--out", str(tmp / "pilot-a"), "--overwrite", "--steps", str(short), "--warmup-steps", "1",
                 *QUIET])
    b = cli_cpu([*train, "--out", str(tmp / "pilot-b"), "--overwrite", "--steps", str(long), "--warmup-steps", "1",
                 *QUIET])
    per_step = max((b - a) / (long - short), 1e-3)
    return max(20, int(budget / per_step)), per_step


def train_cpu(train: list[str], out: Path, steps: int, warmup: int | None = None) -> float:
    """`unifusion TRAIN --out OUT --steps N` (quiet, one thread); returns its CPU seconds."""
    warm = min(200, steps // 10) if warmup is None else warmup
    return cli_cpu([*train, "--out", str(out), "--overwrite", "--steps", str(steps), "--warmup-steps", str(warm),
                    *QUIET])


def done(tmp: Path, parts=()) -> dict:
    """Rows already measured in a kept folder (--keep): a rerun continues where it stopped."""
    p = tmp / "done.json"
    d = json.loads(p.read_text()) if p.is_file() else {}
    for part in parts:
        d.setdefault(part, {})
    return d


def record(tmp: Path, part: str, key: str, value) -> None:
    from unifusion.safeio import atomic_write
    d = done(tmp, [part])
    d[part][key] = value
    atomic_write(tmp / "done.json", json.dumps(d, indent=1, default=str))
