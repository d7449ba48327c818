"""Data parallel set-up: a no-op for one process; under torchrun (gloo on CPU, nccl on GPU) either
DDP (every rank holds the whole model) or FSDP2 (`--sharding fsdp`: parameters, gradients and
optimizer state sharded over the ranks, one all-gather group per block).

FSDP state is saved as *full* tensors gathered on rank 0, never as per-rank shards: a checkpoint
written under FSDP is the same safetensors file, key for key and tensor for tensor, as one
written by one process or under DDP, so `unifusion.models.load`, `unifusion sample` and
`--resume` under any world size or sharding read it unchanged. The models this library trains
(digits to ImageNet-scale diffusion models) fit one host's RAM whole; per-rank sharded files
(torch.distributed.checkpoint) would be the next step for models that do not.

The gather is `DTensor.full_tensor()` over the optimizer's own `state_dict()` (and the model's,
the EMA's), not `torch.distributed.checkpoint.state_dict`: that one re-keys optimizer state by
parameter name, while the one-process format keys it by parameter index; and the EMA shadows are
no modules. Loading slices each full tensor into this rank's shard locally (no communication).

The EMA and post-hoc EMA shadows are built from the sharded parameters, so they are DTensor
shards too: an update is a local elementwise lerp, the same arithmetic per element as in one
process (exact), costs no communication and no full copy; saving, previews and the final model
gather them like the weights.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sharding: str = "ddp"
    _root: nn.Module | None = field(default=None, repr=False)  # the FSDP-sharded model, once wrapped

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """True under torchrun with --sharding fsdp: parameters are DTensor shards."""
        return self.enabled and self.sharding == "fsdp"

    def wrap(self, model: nn.Module, compile: bool | str = False, precision: str = "fp32") -> nn.Module:
        """The module the training step calls. DDP wraps (torch.compile inside); FSDP shards
        `model` in place (its parameters become DTensor shards: build the optimizer and the EMA
        after this) and compiles the sharded model. One process: the model, compiled if asked.
        compile: False / "off", True / "default", or a torch.compile mode ("reduce-overhead", ...)."""
        mode = None if compile in (False, "off") else "default" if compile is True else compile
        compiled = (lambda m: torch.compile(m, mode=mode)) if mode else (lambda m: m)
        if self.sharding == "fsdp" and not self.enabled:
            if self.rank == 0:
                print("--sharding fsdp: one process, so the model runs unsharded (FSDP shards over torchrun ranks)")
        if self.sharded:
            self._root = shard(model, self.device, self.world_size, precision)
            return compiled(model)
        net = compiled(model)
        if not self.enabled:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def no_sync(self, net):
        """Skip the gradient reduction on accumulation micro-steps but the last. Run the backward
        inside it too: DDP decides at forward time, FSDP at backward time."""
        if self.sharded:
            return _fsdp_no_sync(self._root)
        return net.no_sync() if self.enabled else nullcontext()

    # ---- full tensors for saving, shards for loading (module docstring)
    def full(self, tree):
        """Under FSDP (a collective: call it on every rank, with trees of the same structure):
        rank 0 gets `tree` with every DTensor replaced by its full tensor on the CPU, the other
        ranks None; tensors are gathered one at a time, so at most one full tensor is in device
        memory. Otherwise `tree` itself, as it is."""
        if not self.sharded:
            return tree
        out = _map(tree, self._gather)
        return out if self.rank == 0 else None

    def _gather(self, t):
        if not _is_dtensor(t):
            return t.detach().cpu() if self.rank == 0 else None
        full = t.detach().full_tensor()
        return full.cpu() if self.rank == 0 else None

    def local(self, state: dict, like: dict) -> dict:
        """A full state {name: tensor} (as read from a checkpoint) as this rank holds it: where
        `like[name]` is a DTensor shard, this rank's shard of the full tensor (sliced locally,
        no communication), on the shard's device; other entries as they are."""
        return {k: _shard_like(v, like[k]) if k in like else v for k, v in state.items()}

    def local_optimizer_state(self, opt_state: dict, opt: torch.optim.Optimizer) -> dict:
        """A full optimizer state_dict (parameter-indexed, as saved) with each per-parameter tensor
        of the parameter's shape sharded like that parameter, ready for opt.load_state_dict."""
        if not self.sharded:
            return opt_state
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {}
        for i, per_param in opt_state["state"].items():
            p = params[int(i)]
            state[i] = {k: _shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                        for k, v in per_param.items()}
        return {**opt_state, "state": state}

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t)
            t /= self.world_size
        return t

    def min_max(self, value: int) -> tuple[int, int]:
        """(min, max) of an integer over the ranks (itself twice on one process)."""
        if not self.enabled:
            return value, value
        t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t[0]), int(-t[1])

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


def shard(model: nn.Module, device: torch.device, world_size: int, precision: str = "fp32") -> nn.Module:
    """FSDP2 in place: `fully_shard` on every element of every nn.ModuleList in the model (UNet
    and DiT blocks, MLP blocks, flow layers; bottom-up, containers skipped), then on the root.

    bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) - blocks all-gather and
    compute with bf16 parameters, gradients are reduce-scattered (and accumulated over
    micro-steps) in fp32, the sharded master weights and the optimizer stay fp32. The root does
    not cast its inputs: the batch (x0, noise, sigma), the preconditioning and the loss stay
    fp32 as under DDP, and the loop keeps torch.autocast on, which it needs - the root's own
    layers (noise embedding, input/output convs) then hold bf16 parameters and take fp32
    inputs, which only autocast reconciles - and which keeps autocast's float32 ops in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    if precision == "bf16":
        block = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    elif precision == "fp32":
        block = root = MixedPrecisionPolicy()
    else:
        raise ValueError(f"--sharding fsdp supports --precision fp32 or bf16, not {precision}")
    containers = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
    done: set[int] = set()
    for module in reversed(list(model.modules())):  # children before their parents
        if isinstance(module, nn.ModuleList):
            for element in module:
                if not isinstance(element, containers) and id(element) not in done:
                    fully_shard(element, mesh=mesh, mp_policy=block)
                    done.add(id(element))
    fully_shard(model, mesh=mesh, mp_policy=root)
    return model


@contextmanager
def _fsdp_no_sync(root):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def _shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(like):
        return t
    from torch.distributed.tensor import distribute_tensor
    # src_data_rank=None: every rank holds the full tensor and keeps its own slice, no scatter
    return distribute_tensor(t.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _map(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, fn) for v in tree)
    return tree


# set once this process has started a process group: the CLI then ends a failed run with os._exit, since
# a peer that froze mid-collective can leave the backend's threads waiting and block interpreter teardown
STARTED = False


def setup(device: str = "auto", timeout_s: float | None = None, sharding: str = "ddp") -> Dist:
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
        global STARTED
        STARTED = True
    return Dist(rank, world, local, dev, sharding)


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
