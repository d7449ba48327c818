"""Checkpoints (safetensors + JSON, atomic, never pickles) and the EMA."""
from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unifusion import checkpoint as ckpt
from unifusion.checkpoint import CheckpointError, CheckpointNotFoundError
from unifusion.training.ema import EMA

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 2))


def _train_step(model, opt, ema):
    x = torch.randn(16, 3)
    loss = (model(x) - x[:, :2]).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema.update(model, batch_size=16)


def _bundle(model, opt, ema, step):
    opt_t, opt_meta = ckpt.optimizer_to_tensors(opt.state_dict())
    rng_t, rng_meta = ckpt.rng_state()
    tensors = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt_t, "rng": rng_t}
    state = {"step": step, "config": {"lr": 1e-2}, "optimizer": opt_meta, "rng": rng_meta}
    return tensors, state


def _small(step):
    return {"model": {"w": torch.full((4,), float(step))}}, {"step": step}


# ------------------------------------------------------------------------ round trip


def test_round_trip_resumes_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    ema = EMA(model, half_life_samples=100.0, warmup_ratio=0.05)
    for _ in range(3):
        _train_step(model, opt, ema)
    tensors, state = _bundle(model, opt, ema, step=3)
    path = ckpt.save(tmp_path, 3, tensors, state)
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert ckpt.latest(tmp_path) == path
    original_opt_sd = copy.deepcopy(opt.state_dict())  # state_dict() aliases the live tensors

    # continue the original run one step (RNG, optimizer and EMA all advance)
    _train_step(model, opt, ema)
    py_next, np_next = random.random(), np.random.rand(3)

    # a fresh process-like restore: new objects, scrambled RNGs, load from the run dir
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    model2 = _net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    ema2 = EMA(model2, half_life_samples=100.0, warmup_ratio=0.05)
    t, s = ckpt.load(tmp_path)
    assert s["step"] == 3 and s["config"] == {"lr": 1e-2} and "_checkpoint" not in s
    model2.load_state_dict(t["model"])
    restored_sd = ckpt.optimizer_from_tensors(t["optimizer"], s["optimizer"])
    assert restored_sd["param_groups"] == original_opt_sd["param_groups"]  # tuples, ints, None exact
    assert restored_sd["state"].keys() == original_opt_sd["state"].keys()
    for pid, st in original_opt_sd["state"].items():
        assert restored_sd["state"][pid].keys() == st.keys()
        assert all(torch.equal(restored_sd["state"][pid][k], v) and restored_sd["state"][pid][k].dtype == v.dtype
                   for k, v in st.items())
    opt2.load_state_dict(restored_sd)
    ema2.load_state_dict(t["ema"])
    ckpt.set_rng_state(t["rng"], s["rng"])
    _train_step(model2, opt2, ema2)

    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], ema2.shadow[n]), n
    assert ema.samples_seen == ema2.samples_seen == 64
    assert random.random() == py_next
    assert np.array_equal(np.random.rand(3), np_next)


def test_rng_state_restores_every_generator():
    tensors, meta = ckpt.rng_state()
    json.dumps(meta)  # JSON-able
    expected = (torch.rand(5), random.random(), np.random.rand(2), np.random.randn())
    ckpt.set_rng_state(tensors, json.loads(json.dumps(meta)))
    got = (torch.rand(5), random.random(), np.random.rand(2), np.random.randn())
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]
    assert np.array_equal(expected[2], got[2]) and expected[3] == got[3]


def test_shared_and_strided_tensors_are_saved(tmp_path):
    w = torch.randn(4, 4)
    tensors = {"model": {"a": w, "tied": w, "t": w.t(), "row": w[1], "empty": torch.empty(0),
                         "half": torch.randn(3).to(torch.bfloat16)}}
    ckpt.save(tmp_path, 0, tensors, {})
    t, _ = ckpt.load(tmp_path)
    for k, v in tensors["model"].items():
        assert torch.equal(t["model"][k], v) and t["model"][k].dtype == v.dtype, k


def test_state_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(tmp_path, 1, {}, {"x": object()})
    assert ckpt.latest(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists()  # failed before touching the disk


# ------------------------------------------------------------------------ atomicity


def test_enospc_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = ckpt.save(tmp_path, 1, {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}}, {"step": 1})
    real_save_file = ckpt.save_file
    calls = []

    def disk_full_on_second_group(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            real_save_file(tensors, filename, metadata=metadata)  # leave a partial file behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", disk_full_on_second_group)
    with pytest.raises(CheckpointError) as info:
        ckpt.save(tmp_path, 2, {"model": {"w": torch.zeros(3)}, "ema": {"w": torch.zeros(3)}}, {"step": 2})
    msg = str(info.value)
    assert "step-00000001" in msg and "intact" in msg and "No space left" in msg
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert ckpt.latest(tmp_path) == first
    t, s = ckpt.load(tmp_path)
    assert s == {"step": 1} and torch.equal(t["model"]["w"], torch.ones(3))


def test_stale_temp_folder_ignored_then_cleaned(tmp_path):
    first = ckpt.save(tmp_path, 1, *_small(1))
    # what kill -9 mid-save leaves: a half-written hidden folder from a dead pid
    stale = tmp_path / "checkpoints" / ".tmp-step-00000002-4000000"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    (stale / "state.json").write_text("{")
    assert ckpt.latest(tmp_path) == first
    ckpt.save(tmp_path, 3, *_small(3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000003"]


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save(tmp_path, 5, *_small(5))
    ckpt.save(tmp_path, 5, {"model": {"w": torch.zeros(4)}}, {"step": 5, "again": True})
    t, s = ckpt.load(tmp_path)
    assert s["again"] and torch.equal(t["model"]["w"], torch.zeros(4))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005"]


_CHILD = r"""
import sys, torch
from unifusion import checkpoint as ckpt
run_dir = sys.argv[1]
big = {f"g{i}": {"w": torch.randn(256, 1024)} for i in range(8)}  # 8 x 1 MiB
step = 0
while True:
    step += 1
    ckpt.save(run_dir, step, big, {"step": step}, keep=2)
    print(step, flush=True)
"""


def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_dir = tmp_path / "checkpoints"
    try:
        deadline = time.monotonic() + 10
        # wait for two complete checkpoints, then kill while a temp folder is being written
        while time.monotonic() < deadline and len(ckpt._complete(ckpt_dir)) < 2:
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.005)
        while time.monotonic() < deadline and not any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir()):
            time.sleep(0.0005)
        child.send_signal(signal.SIGKILL)
        child.wait(5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close(), child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    found = ckpt.latest(tmp_path)
    assert found is not None
    t, s = ckpt.load(tmp_path)
    assert s["step"] == int(found.name.split("-")[1]) and sorted(t) == [f"g{i}" for i in range(8)]
    ckpt.save(tmp_path, 10_000, *_small(0), keep=2)
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]


def test_prune_keeps_the_newest(tmp_path):
    for step in range(1, 7):
        ckpt.save(tmp_path, step, *_small(step), keep=3)
    assert [p.name for _, p in ckpt._complete(tmp_path / "checkpoints")] == [
        "step-00000004", "step-00000005", "step-00000006"]
    # the checkpoint just written survives even when older than the rest
    ckpt.save(tmp_path, 2, *_small(2), keep=2)
    assert [p.name for _, p in ckpt._complete(tmp_path / "checkpoints")] == ["step-00000002", "step-00000006"]
    ckpt.save(tmp_path, 7, *_small(7), keep=None)
    assert len(ckpt._complete(tmp_path / "checkpoints")) == 3


# ------------------------------------------------------------------------ refusing bad inputs


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save .pt", "pickle .dat", "pickle in .safetensors"])
def test_pickles_are_refused_and_not_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"w": torch.ones(2), "evil": _Evil(str(marker))}
    if how == "torch.save .pt":
        file = tmp_path / "x.pt"
        torch.save(payload, file)
    elif how == "pickle .dat":
        file = tmp_path / "weights.dat"
        file.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        file = tmp_path / "model.safetensors"
        torch.save(payload, file)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load(file)
    assert not marker.exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        ckpt.load(tmp_path)  # an existing run dir without checkpoints
    ckpt.save(tmp_path, 4, *_small(4))
    with pytest.raises(CheckpointNotFoundError, match="step-00000004"):  # lists what is there
        ckpt.load(tmp_path / "checkpoints" / "step-00000009")


def test_corrupt_files_name_the_file(tmp_path):
    path = ckpt.save(tmp_path, 1, *_small(1))
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*model.safetensors"):
        ckpt.load(path)


def test_bare_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "model.safetensors"))
    t, s = ckpt.load(tmp_path / "model.safetensors")
    assert s == {} and torch.equal(t["model"]["w"], torch.arange(3.0))


def test_no_torch_load_in_src():
    src = Path(SRC)
    assert not [p for p in src.rglob("training/*.py") if "torch" + ".load" in p.read_text()]


# ------------------------------------------------------------------------ EMA


def test_ema_converges_to_constant_weights():
    model = nn.Linear(4, 4)
    target = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, half_life_samples=50.0)
    with torch.no_grad():
        for p in ema.shadow.values():
            p.zero_()
    for _ in range(400):
        ema.update(model, batch_size=10)  # 4000 samples = 80 half-lives
    for k, v in target.items():
        torch.testing.assert_close(ema.shadow[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 7, 25])
def test_ema_half_life_is_in_samples(batch_size):
    half_life = 175.0
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, half_life_samples=half_life)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(int(half_life // batch_size)):
        ema.update(model, batch_size)
    assert ema.samples_seen == half_life
    assert abs(ema.shadow["weight"].item() - 0.5) < 1e-6


def test_ema_warmup_shortens_the_half_life():
    ema = EMA(nn.Linear(1, 1), half_life_samples=1000.0, warmup_ratio=0.1)
    assert ema.beta(10) == 0.0  # first update copies the weights
    ema.samples_seen = 500.0
    assert ema.beta(10) == pytest.approx(0.5 ** (10 / 50.0))
    ema.samples_seen = 1e6
    assert ema.beta(10) == pytest.approx(0.5 ** (10 / 1000.0))


def test_ema_swapped_restores_and_copy_to_casts():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).to(torch.float64)
    ema = EMA(model, half_life_samples=10.0)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values() if t.is_floating_point())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in ema.shadow.values():
            t.add_(1) if t.is_floating_point() else None
    with ema.swapped(model) as m:
        assert m is model
        assert torch.equal(model[0].weight, (original["0.weight"].float() + 1).double())
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    assert torch.equal(model[0].weight, original["0.weight"])
    ema.copy_to(model)
    assert model[0].weight.dtype == torch.float64
    assert torch.equal(model[0].weight, (original["0.weight"].float() + 1).double())


def test_ema_state_dict_round_trip_through_safetensors(tmp_path):
    model = _net()
    ema = EMA(model, half_life_samples=30.0)
    ema.update(model, 8)
    ckpt.save(tmp_path, 1, {"ema": ema.state_dict()}, {})
    ema2 = EMA(_net(), half_life_samples=30.0)
    ema2.load_state_dict(ckpt.load(tmp_path)[0]["ema"])
    assert ema2.samples_seen == 8
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="missing"):
        ema2.load_state_dict({"0.weight": torch.zeros(8, 3)})
