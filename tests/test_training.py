"""The trainer end to end on tiny problems: config errors, exact resume, non-finite losses,
SIGINT, data parallel equality and a dying rank."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unifusion import config as C
from unifusion import models
from unifusion import checkpoint
from unifusion.training import loop as L

TINY = dict(data="moons", network="mlp-2d", process="flow", parametrization="velocity", noise_density="uniform_t",
            steps=12, batch_size=32, checkpoint_every=4, sample_every=0, log_every=2, warmup_steps=3, lr=1e-3,
            sample_nfe=4, ema_half_life=500.0)


def tiny(tmp_path, **kw):
    return C.from_dict({**TINY, "out": str(tmp_path / "run"), **kw})


def weights(run_dir):
    tensors, state = checkpoint.load(run_dir)
    return tensors, state


# ---------------------------------------------------------------- config
def test_config_typo_suggests_the_nearest_key():
    with pytest.raises(ValueError, match="did you mean --batch-size"):
        C.from_dict({"batch-sise": 8})
    with pytest.raises(ValueError, match="--steps expects int"):
        C.from_dict({"steps": "many"})
    with pytest.raises(ValueError, match="choose one of"):
        C.from_dict({"process": "vpp"})


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nlr: 0.01\ndata: moons\n")
    cfg = C.load(str(p), {"lr": "0.02", "resume": "true"})
    assert (cfg.steps, cfg.lr, cfg.data, cfg.resume) == (7, 0.02, "moons", True)
    with pytest.raises(FileNotFoundError):
        C.load(str(tmp_path / "missing.yaml"))


# ---------------------------------------------------------------- a run and its outputs
def test_tiny_run_writes_its_outputs(tmp_path):
    res = L.train(tiny(tmp_path), progress=False)
    assert not res["interrupted"]
    for key in ("checkpoint", "samples", "loss_curve", "log"):
        assert Path(res[key]).exists(), key
    log = [json.loads(line) for line in Path(res["log"]).read_text().splitlines()]
    assert log[-1]["step"] == 12 and all(np.isfinite(r["loss"]) for r in log)
    _, state = weights(res["out"])
    assert state["step"] == 12


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    """12 steps straight vs a run that crashes after step 6 (checkpoint at 4) and resumes."""
    full = L.train(tiny(tmp_path / "a"), progress=False)

    real_ema_update = L.EMA.update
    calls = {"n": 0}

    def crash_after_6(self, model, batch, *ok):
        real_ema_update(self, model, batch, *ok)
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(L.EMA, "update", crash_after_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.train(tiny(tmp_path / "b"), progress=False)
    monkeypatch.setattr(L.EMA, "update", real_ema_update)
    assert weights(tmp_path / "b" / "run")[1]["step"] == 4
    L.train(tiny(tmp_path / "b", resume=True), progress=False)

    (ta, sa), (tb, sb) = weights(full["out"]), weights(tmp_path / "b" / "run")
    assert sa["step"] == sb["step"] == 12
    for group in ("model", "ema", "optimizer"):
        for k in ta[group]:
            assert torch.equal(ta[group][k], tb[group][k]), (group, k)


def test_resume_refuses_a_different_model(tmp_path):
    L.train(tiny(tmp_path, steps=4), progress=False)
    with pytest.raises(ValueError, match="started with other --parametrization"):
        L.train(tiny(tmp_path, steps=8, resume=True, parametrization="eps"), progress=False)


def test_non_finite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    from unifusion.models import DiffusionModel
    real = DiffusionModel.forward
    state = {"n": 0}

    def sometimes_nan(*a, **k):
        state["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if state["n"] in (4, 5) else out  # call 1 is the pre-flight shape check
    monkeypatch.setattr(DiffusionModel, "forward", sometimes_nan)
    L.train(tiny(tmp_path), progress=False)  # two bad steps in a row < max_bad_steps: skipped
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12

    monkeypatch.setattr(DiffusionModel, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match="not finite for 3 steps in a row"):
        L.train(tiny(tmp_path / "x", max_bad_steps=3), progress=False)


# ---------------------------------------------------------------- processes: CLI, SIGINT, torchrun
def _cli(*args):
    return [sys.executable, "-m", "unifusion", *args]


def _train_args(out, **kw):
    cfg = {**TINY, **kw, "out": str(out)}
    return [f"--{k}={v}" for k, v in cfg.items()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_and_the_printed_command_resumes(tmp_path, sig):
    """Ctrl-C or SIGTERM saves and exits 130; `unifusion train --out DIR --resume` alone (what the
    message prints) continues with the stored config, and the log does not repeat steps."""
    out = tmp_path / "run"
    p = subprocess.Popen(_cli("train", *_train_args(out, steps=40, checkpoint_every=100000, log_every=1)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 130, text
    command = text.strip().splitlines()[-1].split("Continue with: ")[1]
    assert command == f"unifusion train --out {out} --resume"
    _, state = checkpoint.load(out)
    assert 5 <= state["step"] < 40
    res = subprocess.run(_cli(*command.split()[1:]), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    final = checkpoint.load(out)[1]
    assert final["step"] == 40 and final["config"] == {**state["config"], "resume": True}
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 41))


def _torchrun(nproc, out, **kw):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "unifusion", "train", *_train_args(out, **kw)]


def test_two_ranks_equal_one_rank(tmp_path):
    """Same global batch: 2 gloo ranks (16 each) vs 1 rank (32), and vs 1 rank with 2 accumulation
    steps, under the default class-conditional recipe (EDM, label dropout 0.1) on labelled data."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = dict(steps=8, checkpoint_every=8, data="gmm", process="edm", parametrization="edm",
              noise_density="lognormal")
    runs = {"one": _cli("train", *_train_args(tmp_path / "one", **kw)),
            "two": _torchrun(2, tmp_path / "two", **kw),
            "accum": _cli("train", *_train_args(tmp_path / "accum", grad_accum=2, **kw))}
    for name, cmd in runs.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-3000:])
    ref = weights(tmp_path / "one")[0]["model"]
    for name in ("two", "accum"):
        other = weights(tmp_path / name)[0]["model"]
        for k in ref:
            torch.testing.assert_close(other[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{name} {k}")


def test_a_dying_rank_ends_the_run(tmp_path):
    """kill -9 one worker: torchrun stops the others and exits non-zero instead of hanging."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIFUSION_DIST_TIMEOUT": "30"}
    p = subprocess.Popen(_torchrun(2, out, steps=100000, checkpoint_every=100000, log_every=1),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.3)
    assert log.exists(), "training never started"
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    try:
        p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the run hung after a rank died")
    assert p.returncode != 0


# ---------------------------------------------------------------- unifusion sample
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    cfg = C.from_dict({"data": "digits", "steps": 3, "batch_size": 16, "checkpoint_every": 3, "sample_every": 0,
                       "sample_nfe": 2, "warmup_steps": 1, "out": str(out)})
    L.train(cfg, progress=False)
    return out


def test_sample_cli_writes_the_contract(digits_run, tmp_path):
    from unifusion.cli import main
    npz, png = tmp_path / "s.npz", tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(digits_run), "--sampler", "euler", "--nfe", "4",
                 "--seeds", "0-7", "--out", str(npz), "--png", str(png)]) == 0
    f = np.load(npz)
    assert f["x"].shape == (8, 1, 8, 8) and f["x"].dtype == np.float32
    assert f["x"].min() >= -1 and f["x"].max() <= 1
    assert f["y"].tolist() == [s % 10 for s in range(8)]
    assert png.stat().st_size > 0
    # a sample depends only on its seed, not on the batch it was drawn in
    npz2 = tmp_path / "t.npz"
    assert main(["sample", "--checkpoint", str(digits_run), "--sampler", "euler", "--nfe", "4",
                 "--seeds", "5,6", "--out", str(npz2)]) == 0
    np.testing.assert_allclose(np.load(npz2)["x"], f["x"][5:7], atol=1e-6)


def test_sample_cli_bad_checkpoints(tmp_path, capsys):
    from unifusion.cli import main
    assert main(["sample", "--checkpoint", str(tmp_path / "nope"), "--n", "2", "--out", str(tmp_path / "a.npz")]) == 2
    assert "nope" in capsys.readouterr().err
    pkl = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pkl)
    assert main(["sample", "--checkpoint", str(pkl), "--n", "2", "--out", str(tmp_path / "a.npz")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_bf16_autocast_trains(tmp_path):
    res = L.train(tiny(tmp_path, precision="bf16", steps=6), progress=False)
    log = [json.loads(line) for line in Path(res["log"]).read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)


def test_data_the_network_cannot_take(tmp_path):
    """RGB images into the 1-channel digits UNet: one clear error naming the shapes."""
    from unifusion import data
    rgb = data.ArrayDataset(torch.rand(40, 3, 8, 8) * 2 - 1, torch.arange(40) % 10)
    path = tmp_path / "rgb.npz"
    np.savez(path, x=((rgb.x.numpy() + 1) * 127.5).round().astype(np.uint8), y=rgb.y.numpy())
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\)"):
        L.train(C.from_dict({"data": str(path), "network": "unet-digits", "steps": 2, "batch_size": 16,
                             "out": str(tmp_path / "r")}), progress=False)


@pytest.mark.parametrize("data,shape,preset,kwargs", [
    ("moons", (2,), "MLP", {"dim": 2}),
    ("digits-train", (1, 8, 8), "UNet", {"in_channels": 1, "resolution": 8, "attn_resolutions": [4]}),
    ("shapes-32-train:64", (3, 32, 32), "UNet", {"in_channels": 3, "resolution": 32, "attn_resolutions": [8]}),
    ("rgb16", (3, 16, 16), "UNet", {"in_channels": 3, "resolution": 16, "attn_resolutions": [4]}),
])
def test_the_default_network_follows_the_data(tmp_path, data, shape, preset, kwargs):
    """--network auto (the default): vectors get the MLP, 8x8 images the digits UNet, larger images
    unet-32 fitted to their channels and size; each trains a step without any --network flag."""
    from unifusion import data as datasets
    if data == "rgb16":
        x = (torch.rand(32, 3, 16, 16) * 255).round().numpy().astype(np.uint8)
        np.savez(tmp_path / "rgb16.npz", x=x, y=np.arange(32) % 4)
        data = str(tmp_path / "rgb16.npz")
    cfg = C.from_dict({"data": data, "steps": 1, "batch_size": 8, "sample_every": 0, "out": str(tmp_path / "r")})
    spec = C.model_spec(cfg, datasets.load(data))
    assert spec.shape == shape and spec.network["class"] == preset
    assert {k: spec.network["kwargs"][k] for k in kwargs} == kwargs
    model = models.build(spec)
    batch = {"x0": torch.zeros((4,) + shape), "cond": {"y": torch.zeros(4, dtype=torch.long)}}
    assert model.loss(batch, torch.Generator().manual_seed(0)).shape == (4,)


def test_image_options_only_for_folders(tmp_path):
    with pytest.raises(ValueError, match="only to image folders"):
        L.train(tiny(tmp_path, image_size=16), progress=False)


def test_example_configs_are_valid_and_digits_is_the_default():
    examples = sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
    assert len(examples) >= 3
    for p in examples:
        C.load(str(p))  # every key known, every value valid
    assert C.load(str(Path(__file__).parent.parent / "examples" / "digits.yaml")) == C.TrainConfig()


def test_resuming_a_run_killed_after_its_last_checkpoint_writes_its_outputs(tmp_path):
    import shutil
    res = L.train(tiny(tmp_path, steps=4), progress=False)
    shutil.rmtree(Path(res["out"]) / "model")
    (Path(res["out"]) / "loss.png").unlink()
    again = L.train(tiny(tmp_path, steps=4, resume=True), progress=False)
    assert Path(again["model"], "spec.json").is_file() and Path(again["loss_curve"]).is_file()
    assert again["checkpoint"] == res["checkpoint"]
    with pytest.raises(ValueError, match="beyond --steps 3"):
        L.train(tiny(tmp_path, steps=3, resume=True), progress=False)


def test_repeated_sigterm_only_asks_to_stop_but_a_second_ctrl_c_stops_at_once():
    """A kill -9 of a multi-threaded torchrun makes Linux send the parent-death SIGTERM once per
    exiting launcher thread: those repeats must not abort the checkpoint the first one asked for."""
    import signal
    with L._Interrupt() as stop:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.hit
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ranks_checkpoint_and_stop_when_the_launcher_is_killed(tmp_path):
    """kill -9 of torchrun alone: its ranks (in sessions of their own) get SIGTERM from Linux, save
    one checkpoint at the same step and exit, instead of training on as orphans."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIFUSION_DIST_TIMEOUT": "30"}
    p = subprocess.Popen(_torchrun(2, out, steps=100000, checkpoint_every=100000, log_every=1),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.3)
    workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2, workers
    p.kill()
    p.wait()
    deadline = time.time() + 60
    while any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2]
              for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert time.time() < deadline, "the ranks kept running after their launcher died"
    _, state = checkpoint.load(out)
    assert state["step"] >= 3


def test_a_run_killed_before_its_first_checkpoint_resumes_with_its_own_config(tmp_path):
    """The config is stored in <out>/config.json before step 0, so `--out DIR --resume` after a
    kill -9 before any checkpoint restarts the same run, not the default one."""
    out = tmp_path / "run"
    p = subprocess.Popen(_cli("train", *_train_args(out, steps=30, checkpoint_every=100000, log_every=1)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.1)
    p.kill()
    p.wait()
    assert not (out / "checkpoints").exists() or checkpoint.latest(out) is None
    res = subprocess.run(_cli("train", "--out", str(out), "--resume"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    _, state = checkpoint.load(out)
    assert state["step"] == 30 and state["config"]["data"] == "moons" and state["config"]["network"] == "mlp-2d"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 31))


def test_ranks_that_would_resume_from_different_steps_are_refused(tmp_path, monkeypatch):
    """Nodes with their own local --out: rank 0 finds the checkpoint, the others start over. The
    ranks compare their resume step first and stop with a message instead of training apart."""
    from unifusion.training import distributed
    monkeypatch.setattr(distributed.Dist, "min_max", lambda self, v: (0, 10))
    with pytest.raises(ValueError, match="resume from different steps.*every node mounts"):
        L.train(tiny(tmp_path), progress=False)


def test_a_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch):
    import errno
    import fcntl

    from unifusion.training import run_dir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="without file locks"):
        lock = run_dir.RunLock(tmp_path / "run").acquire()
    lock.release()


def test_a_run_refused_by_rank_0_ends_every_rank_at_once(tmp_path):
    """Rank 0 alone checks the run folder (here: it already holds a run, and neither --resume nor
    --overwrite is given); the other rank stops with it instead of waiting out the collective
    timeout (120 s by default)."""
    out = tmp_path / "run"
    r = subprocess.run(_cli("train", *_train_args(out, steps=4)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    t0 = time.time()
    r = subprocess.run(_torchrun(2, out, steps=4), capture_output=True, text=True, timeout=100,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert time.time() - t0 < 60, "the second rank waited for the collective timeout"
    assert "already holds a run" in r.stderr and "rank 0 refused" in r.stderr, r.stderr[-3000:]
