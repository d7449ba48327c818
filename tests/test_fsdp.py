"""FSDP2 sharding (--sharding fsdp) on CPU with gloo: two sharded ranks equal one process (also with
gradient accumulation), resume is bit-exact, checkpoints keep the one-process format (so they
resume in one process, and models.load / unifusion sample read them unchanged), one process says
it runs unsharded, and bf16 keeps the loss in float32.

The runs train the digits UNet at width 8 (its encoder, middle and decoder ModuleLists are sharded
block by block) with post-hoc EMA snapshots on; they are shared by the module's tests."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unifusion import config as C
from unifusion import checkpoint
from unifusion.training import loop as L
from unifusion.training.ema import read_snapshots


RUN = {"data": "digits", "network.model_channels": 8, "steps": 6, "batch_size": 16, "checkpoint_every": 3,
       "keep_checkpoints": 5, "sample_every": 0, "log_every": 1, "warmup_steps": 2, "lr": 2e-3, "sample_nfe": 2,
       "ema_half_life": 100.0, "posthoc_every": 3, "threads": 1, "sharding": "fsdp"}
GROUPS = ("model", "ema", "optimizer", "posthoc")
NOTE = "--sharding fsdp: one process, so the model runs unsharded"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(out, **kw):
    return [f"--{k}={v}" for k, v in {**RUN, **kw, "out": str(out)}.items()]


def _torchrun(*args):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "unifusion", "train", *args], capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def _train_here(out, **kw) -> str:
    """One process in this interpreter (no start-up cost); returns what it printed."""
    threads, text = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            L.train(C.from_dict({**RUN, **kw, "out": str(out)}), progress=False)
    finally:
        torch.set_num_threads(threads)
    return text.getvalue()


def _back_to_step_3(src: Path, dst: Path) -> Path:
    """A copy of a finished 6-step run as if it had stopped after its step-3 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-00000006")
    shutil.rmtree(dst / "model")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    printed = _train_here(root / "one")  # the reference: one process (with --sharding fsdp: unsharded)
    _torchrun(*_args(root / "two"))
    _torchrun(*_args(root / "accum", grad_accum=2))
    return root, printed


def _close(a: dict, b: dict, tol: float, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        if tol == 0:
            assert torch.equal(a[k], b[k]), (what, k)
        else:
            torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=f"{what} {k}")


def _same_run(a: Path, b: Path, tol: float):
    """Checkpoints, post-hoc snapshots and the model folder of two runs agree to tol (0: bit for bit)."""
    (ta, sa), (tb, sb) = checkpoint.load(a), checkpoint.load(b)
    assert sa["step"] == sb["step"] == RUN["steps"]
    assert set(ta) == set(tb) == set(GROUPS)
    assert sa["optimizer"] == sb["optimizer"]  # the same parameter-indexed optimizer layout
    for g in GROUPS:
        _close(ta[g], tb[g], tol, f"{b.name} {g}")
    snaps_a, snaps_b = read_snapshots(a / "posthoc"), read_snapshots(b / "posthoc")
    assert [s[0] for s in snaps_a] == [s[0] for s in snaps_b] == [3, 6]
    for (_, _, x), (_, _, y) in zip(snaps_a, snaps_b):
        _close(x, y, tol, f"{b.name} posthoc snapshot")


def test_two_sharded_ranks_equal_one_process(runs):
    """Same global batch: 2 FSDP ranks (8 examples each), and 2 ranks x 2 accumulation micro-steps
    (4 each), against one process (16): weights, EMA, optimizer state and post-hoc snapshots, with
    gradient clipping active (the digits UNet's gradient norm starts well above --grad-clip 1)."""
    root, _ = runs
    for name in ("two", "accum"):
        _same_run(root / "one", root / name, 1e-5)


def test_sharded_resume_is_bit_exact(runs, tmp_path):
    """A 2-rank FSDP run stopped after its step-3 checkpoint and resumed with `--out DIR --resume`
    alone (the stored config says fsdp) ends bit for bit where the uninterrupted run did."""
    root, _ = runs
    out = _back_to_step_3(root / "two", tmp_path / "two")
    printed = _torchrun(f"--out={out}", "--resume")
    assert "at step 3" in printed
    _same_run(root / "two", out, 0)


def test_a_sharded_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Sharding does not change the checkpoint format (it is resume-safe): the 2-rank FSDP run's
    step-3 checkpoint continues in one process, under --sharding ddp, to the one-process result."""
    root, _ = runs
    out = _back_to_step_3(root / "two", tmp_path / "two")
    _train_here(out, resume=True, sharding="ddp")
    _same_run(root / "one", out, 1e-5)


def test_the_sharded_run_loads_and_samples_in_a_plain_process(runs, tmp_path):
    """models.load and `unifusion sample` read the FSDP run as any other: its final model folder
    holds the gathered weights and EMA, equal to its last checkpoint's."""
    from unifusion import models
    from unifusion.cli import main
    run = runs[0] / "two"
    tensors, _ = checkpoint.load(run)
    spec, weights, ema, _ = models.read(run / "model")
    _close(tensors["model"], weights, 0, "model folder weights")
    _close({k: v for k, v in tensors["ema"].items() if k in ema}, ema, 0, "model folder ema")
    model = models.load(run)
    assert model.info["weights"] == "ema"
    x = model.sample(seeds=[0, 1], sampler="euler", nfe=2)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run / "model"), "--sampler", "euler", "--nfe", "2",
                 "--seeds", "0-1", "--out", str(npz)]) == 0


def test_one_process_says_it_runs_unsharded(runs):
    root, printed = runs
    assert NOTE in printed and printed.count(NOTE) == 1
    assert checkpoint.load(root / "one")[1]["step"] == RUN["steps"]


def test_the_sharding_key():
    with pytest.raises(ValueError, match="choose one of"):
        C.from_dict({"sharding": "zero3"})
    with pytest.raises(ValueError, match="fp32 or bf16"):
        C.from_dict({"sharding": "fsdp", "precision": "fp16"})
    stored = C.from_dict({"data": "moons"}).to_dict()
    assert C.resumed(stored, {"sharding": "fsdp"}).sharding == "fsdp"  # resume-safe


def test_bf16_shards_keep_the_loss_float32_and_no_sync_holds_gradients_back(tmp_path):
    """distributed.shard with bf16 on a one-rank gloo group (FSDP2 runs its hooks as with many):
    under the loop's autocast the loss equals the unsharded autocast loss and is float32; a
    backward inside no_sync leaves the shards without gradients (nothing reduce-scattered), the
    next one outside it delivers float32 gradients to every float32 shard."""
    import torch.distributed as tdist
    from torch.distributed.tensor import DTensor

    from unifusion import data, models
    from unifusion.training import distributed
    cfg = C.from_dict({**RUN, "out": str(tmp_path)})
    source = data.load(cfg.data)
    torch.manual_seed(0)
    model = models.build(C.model_spec(cfg, source))
    plain = models.build(model.spec)
    plain.load_state_dict(model.state_dict())
    batch = next(iter(data.StepBatches(source, 0, 8, 1, 0, 0, 0, end_step=1)))
    batch = {**batch, **model.random(8, torch.Generator().manual_seed(0))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(batch).mean()
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        distributed.shard(model, torch.device("cpu"), 1, "bf16")
        params = list(model.parameters())
        for micro in range(2):
            with distributed._fsdp_no_sync(model) if micro == 0 else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(batch).mean()
                loss.backward()
            assert loss.dtype == torch.float32 and torch.equal(loss.detach(), expected.detach())
            if micro == 0:
                assert all(p.grad is None for p in params)
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad is not None
                   and p.grad.dtype == torch.float32 for p in params)
    finally:
        tdist.destroy_process_group()
