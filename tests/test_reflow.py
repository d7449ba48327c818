"""Couplings from a teacher (`unifusion couple`), reflow training on them, and the straightness
S(Z) of rectified flow, against closed forms where there is one."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from unifusion import cli, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion.data.couplings import CouplingSource
from unifusion.evaluation.straightness import model_straightness, straightness
from unifusion.training import loop as L

from .test_training import TINY


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_straightness_of_a_gaussian_matches_the_closed_form(s):
    """Data N(0, s^2 I) under the flow process: the PF-ODE path from noise n is Z_t = a(t) n with
    a(t) = sqrt((1 - t)^2 s^2 + t^2), so S = d int_0^1 (1 - s - a'(t))^2 dt exactly."""
    d = 3

    def denoise(x, sigma):  # E[x0 | x_hat] for x0 ~ N(0, s^2), x_hat = x0 + sigma n; 0 at sigma = inf
        sig = sigma.reshape(-1, 1).double()
        return torch.where(torch.isinf(sig), torch.zeros_like(x), x * s**2 / (s**2 + sig**2))

    noise = torch.randn(4000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = straightness(denoise, noise, steps=400)
    t = np.linspace(0, 1, 200001)
    a = np.sqrt((1 - t) ** 2 * s**2 + t**2)
    expected = d * np.trapezoid((1 - s - (t - (1 - t) * s**2) / a) ** 2, t)
    assert abs(r["S"] - expected) < 0.02 * expected + 2e-3
    torch.testing.assert_close(r["samples"], noise * s, rtol=2e-2, atol=2e-2)  # Z_0 = s n


def test_a_straight_flow_has_zero_straightness():
    """Data at one point c: every path is the line from n to c, walked at constant speed."""
    c = torch.tensor([0.3, -0.7], dtype=torch.float64)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = straightness(lambda x, sigma: c.expand_as(x), noise, steps=10)
    assert r["S"] < 1e-20
    torch.testing.assert_close(r["samples"], c.expand_as(noise))


def _teacher(tmp_path, steps=150):
    cfg = C.from_dict({**TINY, "steps": steps, "checkpoint_every": steps, "out": str(tmp_path / "teacher")})
    return L.train(cfg, progress=False)


def _couple(teacher, out, n=96, **kw):
    argv = ["couple", "--checkpoint", teacher, "--sampler", "heun", "--nfe", "9", "--n", str(n), "--out", str(out),
            "--shard-size", "32"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return cli.main(argv)


def test_couplings_are_the_teachers_samples_and_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    teacher = _teacher(tmp_path)["out"]
    assert _couple(teacher, tmp_path / "a") == 0
    src = CouplingSource(tmp_path / "a")
    assert len(src) == 96 and src.shape == (2,) and src.reference[0] == "moons"
    # each coupling is the teacher's deterministic sample from that unit noise
    model = models.load(teacher)
    seeds = [0, 37, 95]
    noise = torch.stack([src[i]["noise"] for i in seeds])
    torch.testing.assert_close(noise, torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s))
                                                   for s in seeds]))
    x = model.sample(seeds=seeds, noise=noise, sampler="heun", nfe=9)
    torch.testing.assert_close(torch.stack([src[i]["x0"] for i in seeds]), x)
    # killed after the second shard: the rerun writes only the missing one, identical to the uninterrupted run
    from unifusion.data import couplings
    real, calls = couplings.save_safetensors, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(couplings, "save_safetensors", dying)
    assert _couple(teacher, tmp_path / "b") == 130
    monkeypatch.setattr(couplings, "save_safetensors", real)
    assert len(json.loads((tmp_path / "b" / "index.json").read_text())["shards"]) == 2
    with pytest.raises(ValueError, match="holds 64 of 96"):
        CouplingSource(tmp_path / "b")
    assert _couple(teacher, tmp_path / "b") == 0
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_reflow_trains_on_the_couplings_from_the_teacher_and_straightens(tmp_path):
    teacher = _teacher(tmp_path, steps=300)["out"]
    assert _couple(teacher, tmp_path / "c", n=1024) == 0
    cfg = C.from_dict({**TINY, "data": str(tmp_path / "c"), "reflow": True, "init_from": teacher, "steps": 300,
                       "checkpoint_every": 300, "out": str(tmp_path / "2rf")})
    res = L.train(cfg, progress=False)
    student, first = models.load(res["model"]), models.load(teacher)
    made = student.spec.training["made_from"]
    assert made["couplings"]["sampler"]["name"] == "heun" and made["init_from"] == teacher
    assert student.spec.data["source"] == "moons"  # scored against the teacher's data, not its samples
    s_teacher = model_straightness(first, n=512, steps=50)["S"]
    s_student = model_straightness(student, n=512, steps=50)["S"]
    assert s_student < 0.5 * s_teacher, (s_student, s_teacher)


def test_bad_couplings_and_reflow_requests_get_one_clear_error(tmp_path, capsys):
    teacher = _teacher(tmp_path, steps=20)["out"]
    assert _couple(teacher, tmp_path / "c", n=64) == 0
    # resuming into the folder with another sampler budget
    assert _couple(teacher, tmp_path / "c", n=64, nfe=5) == 2
    assert "another sampler" in capsys.readouterr().err
    # a shard missing from the folder
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    (tmp_path / "d" / "couplings-000001.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        datasets.load(str(tmp_path / "d"))
    # a truncated shard
    shutil.copytree(tmp_path / "c", tmp_path / "e")
    p = tmp_path / "e" / "couplings-000000.safetensors"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ValueError, match="damaged"):
        datasets.load(str(tmp_path / "e"))
    # reflow on ordinary data
    with pytest.raises(ValueError, match="--reflow trains on noise-data couplings"):
        L.train(C.from_dict({**TINY, "reflow": True, "out": str(tmp_path / "r1")}), progress=False)
    # initial weights of another network
    with pytest.raises(ValueError, match="--init-from"):
        L.train(C.from_dict({**TINY, "data": str(tmp_path / "c"), "network_args": {"hidden": 16},
                             "init_from": teacher, "out": str(tmp_path / "r2")}), progress=False)
    # straightness of a non-flow model
    edm = L.train(C.from_dict({**TINY, "steps": 2, "checkpoint_every": 2, "process": "edm",
                               "parametrization": "edm", "noise_density": "lognormal", "out": str(tmp_path / "edm")}),
                  progress=False)
    with pytest.raises(ValueError, match="flow-process"):
        model_straightness(models.load(edm["model"]), n=4)
    assert math.isfinite(model_straightness(models.load(teacher), n=4, steps=4)["S"])
