"""A model family from outside the package (tests/plugins/diag_gauss.py), registered through the
`unifusion.families` entry point of a distribution installed only on PYTHONPATH: it trains,
checkpoints, resumes exactly after kill -9, samples and evaluates through the `unifusion` CLI with
no edit under src/. Also: uf.models.register in-process, and the one-line error for a family that
is not registered."""
from __future__ import annotations

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
from unifusion.safeio import read_safetensors

PLUGINS = Path(__file__).parent / "plugins"
FLAGS = ["--family", "diag-gauss", "--data", "moons", "--batch-size", "64", "--lr", "0.05", "--warmup-steps", "1",
         "--sample-every", "0", "--log-every", "5", "--ema-half-life", "200"]


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """An environment whose Python finds the plugin through its entry point: a .dist-info folder
    (what pip writes for an installed package) on PYTHONPATH next to the module."""
    site = tmp_path_factory.mktemp("site")
    info = site / "diag_gauss_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diag-gauss-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[unifusion.families]\ndiag-gauss = diag_gauss:DiagGaussModel\n")
    path = os.pathsep.join([str(site), str(PLUGINS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def cli(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "unifusion", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def final_weights(run: Path) -> dict:
    return read_safetensors(run / "model" / "weights.safetensors")


def test_an_outside_family_trains_resumes_samples_and_evaluates(plugin_env, tmp_path):
    # help lists its option; its option is a flag; the stored config keeps it
    h = cli(plugin_env, "train", "--family", "diag-gauss", "--help")
    assert h.returncode == 0 and "family diag-gauss:" in h.stdout and "--init-log-std" in h.stdout
    assert "--kl-weight" not in h.stdout  # only that family's own options
    whole = tmp_path / "whole"
    r = cli(plugin_env, "train", *FLAGS, "--steps", "400", "--checkpoint-every", "50", "--init-log-std", "0.5",
            "--out", str(whole))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((whole / "config.json").read_text())["init_log_std"] == 0.5
    spec = json.loads((whole / "model" / "spec.json").read_text())
    assert spec["family"] == "diag-gauss" and spec["training"] == {"init_log_std": 0.5}
    w = final_weights(whole)  # maximum likelihood: the mean and std of moons
    from unifusion import data
    x = data.load("moons").x
    torch.testing.assert_close(w["mean"], x.mean(0), atol=0.15, rtol=0)

    # kill -9 after the first checkpoint, then `train --out DIR --resume`: the same final weights
    cut = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, "-m", "unifusion", "train", *FLAGS, "--steps", "400", "--checkpoint-every",
                          "50", "--init-log-std", "0.5", "--out", str(cut)], env=plugin_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cut / "checkpoints").glob("step-*")):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "model").exists(), "the run finished before it was killed: make it longer"
    r = cli(plugin_env, "train", "--out", str(cut), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    for k, v in final_weights(whole).items():
        torch.testing.assert_close(final_weights(cut)[k], v, rtol=0, atol=0, msg=k)

    # sample and eval through the CLI
    r = cli(plugin_env, "sample", "--checkpoint", str(whole), "--n", "50", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.load(tmp_path / "s.npz")["x"].shape == (50, 2)
    r = cli(plugin_env, "eval", "--checkpoint", str(whole), "--n", "200", "--nll", "100", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["rows"][0]["n"] == 200 and result["nll"]["n"] == 100

    # without the plugin the saved model names a family nobody registered: one line, how to register
    bare = {**plugin_env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    r = cli(bare, "sample", "--checkpoint", str(whole), "--n", "4", "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "'diag-gauss' is not registered" in r.stderr and "unifusion.families" in r.stderr
    assert not (tmp_path / "t.npz").exists()


def test_register_in_process(tmp_path, monkeypatch):
    sys.path.insert(0, str(PLUGINS))
    try:
        from diag_gauss import DiagGaussModel
    finally:
        sys.path.remove(str(PLUGINS))
    monkeypatch.setitem(models.FAMILIES, "diag-gauss", DiagGaussModel)  # undone after the test
    models.register("diag-gauss", DiagGaussModel, replace=True)
    cfg = C.from_dict({"family": "diag-gauss", "data": "moons", "init_log_std": -1.0})
    assert cfg.options.init_log_std == -1.0 and cfg.to_dict()["init_log_std"] == -1.0
    with pytest.raises(ValueError, match="--init-log-std is an option of --family diag-gauss"):
        C.from_dict({"data": "moons", "init_log_std": -1.0})
    with pytest.raises(ValueError, match="has no network"):
        C.from_dict({"family": "diag-gauss", "network": "mlp-2d"})
    from unifusion import data
    spec = C.model_spec(cfg, data.load("moons"))
    model = models.build(spec)
    assert torch.allclose(model.log_std, torch.full((2,), -1.0))
    assert model.loss({"x0": torch.zeros(3, 2)}).shape == (3,)


def test_register_refuses_what_is_not_a_family():
    with pytest.raises(TypeError, match="subclass of unifusion.models.Model"):
        models.register("x", dict)
    class Other(models.DiffusionModel):
        pass
    with pytest.raises(ValueError, match="already registered"):
        models.register("diffusion", Other)
    assert "family" not in Other.__dict__  # a refused registration changes nothing
    with pytest.raises(ValueError, match="register it under that name"):
        models.register("not-cnf", models.CNFModel)
