"""Run safety: every case of benchmarks/error_table.py over every command (exit code, one `unifusion:
error:` line naming problem and fix, a refused command's folder left exactly as it was), then two
runs into one folder, atomic sample outputs on a full disk, checkpoint group names that point
outside, config types, `uf.sample`'s argument checks, and issue 19's cases that are not one command
(sorted safetensors metadata, tar captions, the shard writer's first shard, calibrate's progress).

The cases run in-process through `unifusion.cli.main` (a subprocess each would take about a minute
on two cores); UNIFUSION_SUBPROCESS=1 runs them as `python -m unifusion` instead, as the script does.
"""
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import unifusion as uf
from benchmarks.error_table import CASES, STEP, TINY_FLAGS, make_run, run_case, screen_lines, shared, unifusion
from unifusion import cli
from unifusion import data
from unifusion import config as C
from unifusion import checkpoint
from unifusion.training import run_dir

SUBPROCESS = os.environ.get("UNIFUSION_SUBPROCESS") == "1"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny trained run (moons, 3 steps), copied by every case that needs a model."""
    return make_run(tmp_path_factory.mktemp("shared") / "run", inprocess=True)


def _copy(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock")))


def _one_error_line(err: str) -> str:
    lines = screen_lines(err)  # what the terminal shows (a progress bar redraws itself with \r)
    assert len(lines) == 1 and lines[0].startswith("unifusion: error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- the table's cases
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.known)]
                                               if c.known else []) for c in CASES])
def test_case(case, tiny_run, tmp_path):
    r = run_case(case, tmp_path, tiny_run, inprocess=not SUBPROCESS)
    assert not r["problems"], (f"{r['command']}: {'; '.join(r['problems'])}\n--- stdout\n{r['stdout'][-3000:]}"
                               f"\n--- stderr\n{r['stderr'][-3000:]}")


def test_cases_have_unique_names():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


def test_a_real_process_exits_with_the_codes(tmp_path):
    """The console boundary itself (main's return value becomes the exit status)."""
    code, out, err = unifusion(["--version"], tmp_path)
    assert code == 0 and out.startswith(f"unifusion {uf.__version__}")
    code, out, err = unifusion(["sample", "--checkpoint", "nope", "--n", "2", "--out", "s.npz"], tmp_path)
    assert code == 2
    assert "no checkpoint at nope" in _one_error_line(err)


# --------------------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    lock = run_dir.RunLock(out).acquire()
    try:
        code, stdout, err = unifusion(["train", *TINY_FLAGS, "--out", "run"], tmp_path)  # another process
    finally:
        lock.release()
    assert code == 2, err
    line = _one_error_line(err)
    assert "another run" in line and f"pid {os.getpid()}" in line and "--out" in line
    assert [p.name for p in out.iterdir()] == [run_dir.LOCK]  # nothing of the refused run was written


# --------------------------------------------------------------------------- atomic outputs
def _full_disk_sample(tiny_run, tmp_path, monkeypatch, capsys):
    """A good s.npz, then a second write into it that fails half-way with ENOSPC -> (old bytes, exit, stderr)."""
    run = _copy(tiny_run, tmp_path / "run")
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", str(run), "--nfe", "2", "--out", str(out)]
    assert cli.main([*argv, "--seeds", "0-2"]) == 0
    good = out.read_bytes()
    capsys.readouterr()

    def full_disk(file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(good[: len(good) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    code = cli.main([*argv, "--seeds", "10-12"])
    return good, code, capsys.readouterr().err


def test_a_failed_sample_write_keeps_the_old_file(tiny_run, tmp_path, monkeypatch, capsys):
    good, code, err = _full_disk_sample(tiny_run, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert (tmp_path / "s.npz").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.npz"]  # no temp file left
    assert "No space left on device" in _one_error_line(err)


def test_a_full_disk_message_names_the_file_and_the_fix(tiny_run, tmp_path, monkeypatch, capsys):
    good, code, err = _full_disk_sample(tiny_run, tmp_path, monkeypatch, capsys)
    line = _one_error_line(err)
    assert "s.npz" in line and "free some space" in line


# --------------------------------------------------------------------------- checkpoints
def test_a_group_name_pointing_outside_is_refused_before_any_read(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoints" / STEP
    state = json.loads((ckpt / "state.json").read_text())
    state["_checkpoint"]["groups"] = ["model", "../../x"]
    (ckpt / "state.json").write_text(json.dumps(state))
    shutil.copy(ckpt / "model.safetensors", run / "x.safetensors")  # what "../../x" would read

    opened = []
    real_open, real_load = io.open, checkpoint.load_file

    def spy_open(file, *args, **kwargs):
        opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def spy_load(file, *args, **kwargs):
        opened.append(Path(file).resolve())
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy_open)  # pathlib's read_text
    monkeypatch.setattr(checkpoint, "load_file", spy_load)
    with pytest.raises(checkpoint.CheckpointError, match=r"invalid group name\(s\) \['\.\./\.\./x'\]"):
        checkpoint.load(ckpt)
    monkeypatch.undo()
    assert (ckpt / "state.json").resolve() in opened  # the spy sees the loader's reads
    outside = [p for p in opened if not p.is_relative_to(ckpt.resolve())]
    assert not outside, f"opened outside the checkpoint: {outside}"
    assert (run / "x.safetensors").resolve() not in opened


# --------------------------------------------------------------------------- config
def test_config_refuses_a_boolean_for_a_number():
    with pytest.raises(ValueError, match="--steps"):
        C.from_dict({"steps": True})
    with pytest.raises(ValueError, match="--lr"):
        C.from_dict({"lr": False})


# --------------------------------------------------------------------------- uf.sample
def test_sample_refuses_a_denoiser_of_the_wrong_shape():
    with pytest.raises(ValueError, match=re.escape("shaped like x")):
        uf.sample(lambda x, sigma: x[:, :1], torch.randn(4, 2) * 80, sampler="euler", nfe=4)


@pytest.mark.parametrize("grid", [[1.0, 2.0, 0.5], [2.0, 1.0, 1.0, 0.5]], ids=["increasing", "repeated"])
def test_sample_refuses_a_grid_that_is_not_decreasing(grid):
    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="strictly decreasing"):
        uf.sample(denoiser, torch.randn(4, 2), sampler="euler", grid=torch.tensor(grid), sigma_max=max(grid))
    assert not calls  # refused before any denoiser call


# --------------------------------------------------------------------------- issue 19: beyond the table
def _header(path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path, tiny_run):
    """Post-hoc snapshots (and every file with metadata) are byte-deterministic: safetensors keeps
    metadata in a hash map whose order changes per process, so the keys are sorted on write."""
    from unifusion.safeio import save_safetensors
    meta = {k: str(i) for i, k in enumerate(["zeta", "alpha", "mid", "gammas", "step", "beta", "omega", "kappa"])}
    save_safetensors({"x": torch.arange(3.0)}, tmp_path / "a.safetensors", meta)
    assert list(_header(tmp_path / "a.safetensors")["__metadata__"]) == sorted(meta)
    from unifusion.safeio import read_safetensors
    tensors, read = read_safetensors(tmp_path / "a.safetensors", with_metadata=True)
    assert read == meta and torch.equal(tensors["x"], torch.arange(3.0))
    snaps = sorted((shared(tiny_run, "posthoc") / "posthoc").glob("step-*.safetensors"))
    assert snaps and all(list(_header(p)["__metadata__"]) == sorted(_header(p)["__metadata__"]) for p in snaps)


def test_encode_takes_tar_captions_from_txt_members(tmp_path, tiny_run):
    """Tar shards with a .txt for some samples: their captions are stored, "" for the others."""
    digits = data.load("digits-train")

    class Captioned(data.ArrayDataset):
        def captions(self, indices):
            return [f"digit {int(self.y[i])}" if i % 3 else None for i in indices]

    data.write_shards(Captioned(digits.x[:40], digits.y[:40], 10), tmp_path / "tars", per_shard=16)
    ae = shared(tiny_run, "ae")
    assert cli.main(["encode", "--autoencoder", str(ae), "--data", str(tmp_path / "tars"), "--per-shard", "16",
                     "--out", str(tmp_path / "lat")]) == 0
    lat = data.load(str(tmp_path / "lat"))
    assert lat.captions(range(40)) == [f"digit {int(digits.y[i])}" if i % 3 else "" for i in range(40)]


def test_a_failing_first_shard_writes_nothing(tmp_path):
    """The shard writer makes the first shard before it creates the folder or its index."""
    from unifusion.data import couplings

    def draw(seeds):
        x = torch.zeros(len(seeds), 2)
        x[1] = float("nan")
        return {"noise": torch.zeros(len(seeds), 2), "x0": x}

    header = {"teacher": {"digest": "0"}, "shape": [2], "num_classes": 0}
    with pytest.raises(ValueError, match=r"seed\(s\) \[1\] are not finite"):
        couplings.write_couplings(tmp_path / "c", 8, 4, draw, header, progress=False)
    assert not (tmp_path / "c").exists()


def test_calibrate_shows_the_reference_solve_and_refuses_large_budgets(capsys):
    def denoiser(x, sigma):
        return x / (1 + sigma.view(-1, 1) ** 2)

    uf.samplers.calibrate(denoiser, (2,), "euler", 3, n_ref=2, n_val=2, method="powell", max_evals=3,
                          progress=True)
    assert "reference solve" in capsys.readouterr().err  # a progress bar from the first denoiser call
    with pytest.raises(ValueError, match="nfe must be at most 100"):
        uf.samplers.calibrate(denoiser, (2,), "euler", 1000, n_ref=2, n_val=2)


def test_weights_digest_names_weights_not_files():
    from unifusion.safeio import tensors_digest
    a = {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    assert tensors_digest(a) == tensors_digest({k: v.clone() for k, v in reversed(a.items())})
    assert tensors_digest(a) != tensors_digest({**a, "w": torch.ones(3, 2)})  # same bytes, another shape
    assert tensors_digest(a) != tensors_digest({**a, "b": torch.ones(3, dtype=torch.bfloat16)})
