"""One run per output folder: an exclusive lock for the run's lifetime, a refusal to mix a new
run into an old one, `--overwrite` that deletes the old run, and the log cut back to the
checkpoint a run resumes from."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import warnings
from pathlib import Path

LOCK = ".lock"
CONFIG = "config.json"  # the run's config, written before step 0 (so --resume works before any checkpoint)
RUN_MARKERS = ("checkpoints", "log.jsonl", "samples", "model", "loss.png", CONFIG, "posthoc")  # what a unifusion run leaves


class RunLock:
    """flock on <out>/.lock, released when the process ends (also on kill -9).

    `discard()` undoes what acquiring created (the lock file, and the folders made for it) for a
    run refused before it wrote anything; `committed` (set once the run writes) forbids that."""

    def __init__(self, out: Path):
        self.out, self.fd = Path(out), None
        self.committed = False
        self._made: list[Path] = []  # folders acquire created, innermost first
        self._made_lock = False

    def acquire(self) -> "RunLock":
        try:
            missing, p = [], self.out
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            had_lock = (self.out / LOCK).exists()
            self.out.mkdir(parents=True, exist_ok=True)
            self._made = missing
            fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            self._made_lock = not had_lock
        except OSError as e:
            raise ValueError(f"cannot write the run folder {self.out} ({e.strerror}); "
                             "choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"another run (pid {holder}) is writing to {self.out}; wait for it, "
                             "or choose another --out") from None
        except OSError as e:  # a shared file system without flock (e.g. Lustre without -o flock)
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            warnings.warn(f"{self.out} is on a file system without file locks ({e.strerror}): training without "
                          "the one-run-per-folder lock; make sure no other run uses this --out", stacklevel=2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def discard(self) -> None:
        """Release, then remove the lock file and the folders acquire created (those still empty)."""
        if self.committed:
            return
        made_lock = self._made_lock and self.fd is not None
        if made_lock:
            (self.out / LOCK).unlink(missing_ok=True)  # while still held: no other run took it meanwhile
        self.release()
        for d in self._made:
            try:
                d.rmdir()
            except OSError:  # not empty (or gone): leave it
                break


def check(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to start a new run in a folder that holds one (or anything else) unless resuming
    or overwriting, and --overwrite of a folder that is not a run; writes nothing. Returns what
    --overwrite would delete."""
    entries = [e for e in out.iterdir() if e.name != LOCK] if out.is_dir() else []
    if not entries or resume:
        return []
    if not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(sorted(e.name for e in entries)[:4])}); "
                         "continue it with --resume, delete it with --overwrite, or choose another --out")
    if not any(e.name in RUN_MARKERS for e in entries):
        raise ValueError(f"--overwrite refuses to empty {out}: it does not look like a unifusion run "
                         "folder; choose another --out")
    return entries


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """check(), then --overwrite deletes the old run's files (only in a folder that is a run)."""
    for e in check(out, resume, overwrite):
        shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()


def truncate_log(log: Path, step: int) -> None:
    """Keep only the records up to `step`, so a resumed run never repeats steps in the log."""
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    from ..safeio import atomic_write
    atomic_write(log, "".join(line + "\n" for line in kept))


def stored_config(out: Path) -> dict | None:
    """The config a run in `out` was started with: its latest checkpoint's, else <out>/config.json."""
    from .. import checkpoint
    last = checkpoint.latest(out)
    if last is not None:
        _, state = checkpoint.load(last)
        if not isinstance(state.get("config"), dict):
            raise ValueError(f"cannot resume from {last}: its state.json has no 'config' (edited by hand?); "
                             "start a new run with --overwrite or another --out")
        return state["config"]
    p = Path(out) / CONFIG
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except ValueError:
            raise ValueError(f"{p} is not valid JSON; start a new run with --overwrite") from None
        if isinstance(d, dict):
            return d
    return None


def truncate_snapshots(folder: Path, step: int) -> None:
    """Remove post-hoc EMA snapshots written after `step` by a run killed past its last checkpoint
    (the resumed run writes them again, identically)."""
    if folder.is_dir():
        for p in folder.glob("step-*.safetensors"):
            try:
                if int(p.stem.split("-")[1]) > step:
                    p.unlink()
            except (IndexError, ValueError):
                continue
