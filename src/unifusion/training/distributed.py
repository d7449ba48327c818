"""Data parallel set-up: a no-op for one process, DDP under torchrun (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, net):
        if not self.enabled:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def no_sync(self, net):
        """Skip the gradient all-reduce on accumulation micro-steps but the last."""
        return net.no_sync() if self.enabled else nullcontext()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t)
            t /= self.world_size
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when the flag is set on any (e.g. one rank caught SIGTERM)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self):
        if self.enabled:
            tdist.barrier()

    def cleanup(self):
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def setup(device: str = "auto", timeout_s: float | None = None) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start the process group when there are
    several. The collective timeout (UNIFUSION_DIST_TIMEOUT seconds, default 120) turns a dead
    rank into an error on the others instead of a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        _die_with_launcher()
    if world > 1 and not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("UNIFUSION_DIST_TIMEOUT", "120")))
        tdist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    return Dist(rank, world, local, dev)


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL (an OOM
    kill, `kill -9`) would leave the ranks training on, orphaned. Ask Linux to send this rank
    SIGTERM when its parent dies: the loop then checkpoints and stops on every rank together."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() == 1:  # the launcher died before we asked
        raise RuntimeError("the torchrun launcher of this rank has died; restart the job")


def set_threads(requested: int = 0, device: torch.device | str = "cpu") -> int:
    """The intra-op thread policy for CPU work (measured in BENCHMARKS.md, "CPU threads").

    `requested` > 0 wins; else OMP_NUM_THREADS, when set, is left to torch; else AUTO: one thread
    per rank on machines with at most 4 usable cores per rank (OpenMP's spinning barriers make 2+
    threads 4-10x slower as soon as another busy process shares the cores, while one thread
    loses little), and all but one of the rank's cores on bigger machines.
    """
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    if requested > 0:
        n = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        per_rank = max(1, cores // local_world)
        n = 1 if per_rank <= 4 else per_rank - 1
    torch.set_num_threads(n)
    return n
