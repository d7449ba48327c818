"""evaluation/evaluate.py and `unifusion eval`: scores, caching, sweeps, plots, NLL convention, errors."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from unifusion import config as C
from unifusion import data
from unifusion.cli import main
from unifusion.evaluation import evaluate as E
from unifusion.evaluation import features as fx
from unifusion.likelihood import log_likelihood
from unifusion.training import loop as L


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = C.from_dict({"data": "digits-train", "steps": 3, "batch_size": 16, "checkpoint_every": 3,
                       "sample_every": 0, "sample_nfe": 2, "warmup_steps": 1, "out": str(out)})
    L.train(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    return E.reference("digits-train", {}, fx.digits_features(), tmp_path_factory.mktemp("ref"))


def test_scores_tell_copies_and_held_out_data_from_noise(digits_ref):
    label = dict(sampler="x", nfe=0, grid="-", cfg_scale=1.0, seconds=0.0)
    train = digits_ref.train
    copies = E.score(train.x[:300], train.y[:300], digits_ref, label)
    held = E.real_data_row(digits_ref)
    noise = E.score(torch.rand(300, 1, 8, 8) * 2 - 1, train.y[:300], digits_ref, label)
    # training images are copies of themselves; held-out digits are not; noise is neither
    assert copies.copy_rate == 1.0 and held.copy_rate < 0.05 and noise.copy_rate == 0.0
    assert held.n == 297 and held.accuracy > 0.95 and noise.accuracy < 0.3
    assert held.fid < 5 < 20 < noise.fid
    assert held.precision > 0.6 and noise.precision < 0.1
    assert held.kid < noise.kid


def test_reference_is_cached_and_invalidated_by_content(tmp_path):
    ex = fx.digits_features()
    ref = E.reference("digits-train", {}, ex, tmp_path)
    files = sorted(tmp_path.glob("ref-*.npz"))
    assert [f.name for f in files] == ["ref-digits-train-digits-cnn-features.npz", "ref-digits-train-digits-cnn-stats.npz"]
    stamp = [f.stat().st_mtime_ns for f in files]
    again = E.reference("digits-train", {}, ex, tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == stamp  # read, not recomputed
    np.testing.assert_allclose(again.stats.mu, ref.stats.mu)
    assert json.loads(again.stats.meta)["n"] == 1500
    # different content under the same name (an .npz data set that changed) is recomputed
    p = tmp_path / "d.npz"
    np.savez(p, x=data.digits("test").x.numpy())
    a = E.reference(str(p), {}, ex, tmp_path)
    np.savez(p, x=data.digits("train").x[:100].numpy())
    b = E.reference(str(p), {}, ex, tmp_path)
    assert len(a.feats) == 297 and len(b.feats) == 100


def test_feature_extractor_choice():
    assert isinstance(E.feature_extractor((1, 8, 8)), fx.DigitsFeatures)
    raw = E.feature_extractor((2,))
    assert raw.name == "raw" and raw(torch.ones(3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match="--inception"):
        E.feature_extractor((3, 32, 32))


def test_eval_cli_single_setting(digits_run, capsys):
    assert main(["eval", "--checkpoint", str(digits_run), "--sampler", "euler", "--nfe", "3", "--n", "40"]) == 0
    printed = capsys.readouterr().out
    assert "| euler | 3 | tuned |" in printed and "held-out data" in printed  # an EDM model's default grid
    out = digits_run / "eval"
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [r["sampler"] for r in rows] == ["euler", "held-out data"]
    assert rows[0]["n"] == "40" and 0 <= float(rows[0]["copy_rate"]) <= 1 and float(rows[0]["seconds"]) > 0
    assert float(rows[0]["fid"]) > float(rows[1]["fid"])  # a 3-step model is far from real digits
    res = json.loads((out / "eval.json").read_text())
    assert res["features"] == "digits-cnn" and res["reference"] == "digits-train" and res["step"] == 3


def test_eval_cli_sweep_with_cfg_writes_table_and_plots(digits_run, tmp_path):
    out = tmp_path / "sweep"
    assert main(["eval", "--checkpoint", str(digits_run / "checkpoints"), "--sweep", "--samplers", "euler,heun",
                 "--nfes", "2,4", "--cfg-scales", "1,2", "--n", "24", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "eval.csv")))
    settings = {(r["sampler"], r["nfe"], r["cfg_scale"]) for r in rows[:-1]}
    assert settings == {(s, k, w) for s in ("euler", "heun") for k in ("2", "4") for w in ("1.0", "2.0")}
    assert all(r["accuracy"] != "" for r in rows)
    assert (out / "sweep.png").stat().st_size > 0 and (out / "cfg.png").stat().st_size > 0


def test_eval_cli_errors(digits_run, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(digits_run), "--sampler", "nope", "--n", "8", "--out", str(tmp_path)]) == 2
    assert "unknown sampler" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(digits_run), "--sweep", "--nfes", "5,x", "--out", str(tmp_path)]) == 2
    assert "--nfes" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err


def test_eval_cli_refuses_guidance_for_unconditional_models(tmp_path, capsys):
    cfg = C.from_dict({"data": "moons", "network": "mlp-2d", "steps": 2, "batch_size": 16, "checkpoint_every": 2,
                       "sample_every": 0, "sample_nfe": 2, "warmup_steps": 1, "out": str(tmp_path / "m")})
    L.train(cfg, progress=False)
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--cfg-scales", "1,2", "--n", "8"]) == 2
    assert "unconditional" in capsys.readouterr().err
    # 2-D toys are scored in raw coordinates against fresh held-out draws
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--nfe", "2", "--n", "16"]) == 0
    res = json.loads((tmp_path / "m" / "eval" / "eval.json").read_text())
    assert res["features"] == "raw" and res["rows"][-1]["sampler"] == "held-out data"


def test_run_dir_from_any_checkpoint_path(tmp_path):
    run = tmp_path / "r"
    assert E.run_dir(run) == run
    assert E.run_dir(run / "checkpoints") == run
    assert E.run_dir(run / "checkpoints" / "step-00000003") == run


def test_quantization_levels():
    assert data.levels(data.digits("test")) == 17
    x8 = torch.randint(0, 256, (10, 3, 4, 4)) / 255 * 2 - 1
    assert data.levels(data.ArrayDataset(x8)) == 256
    assert data.levels(data.load("moons", n=100)) is None


def test_nll_convention_matches_direct_integration():
    """A 1-D Gaussian model p = N(0, s^2 + sigma_min^2), with its exact denoiser, scored on data
    on the 17 digits levels (mostly positive, so a wrongly centred bin shows): bits/dim must equal
    the bound computed here independently by quadrature over each bin centred on its level,
    E_u[-log2 p(x + (u - 1/2) delta)] - log2 delta."""
    s = 0.6
    x = torch.linspace(-1, 1, 17)[torch.tensor([5, 9, 12, 14, 16, 16])].repeat(100)[:, None]
    ds = data.ArrayDataset(x.float(), kind="image")  # discrete values on [-1, 1]: image-like, 17 levels

    sigma_min = 0.002

    def denoiser(xt, sigma):
        return xt * s**2 / (s**2 + sigma[:, None] ** 2)

    class Exact:  # the model interface nll needs: a device and log_likelihood
        device = torch.device("cpu")

        def log_likelihood(self, x, return_nfe=False, **kw):
            return log_likelihood(denoiser, x, sigma_min, 80.0, **kw)

    r = E.nll(Exact(), ds, len(x), probes=1, seed=0)
    assert r["levels"] == 17 and r["n"] == 600
    delta = 2 / 16
    var = s**2 + sigma_min**2
    u = (np.arange(2000) + 0.5) / 2000 - 0.5
    pts = x.double().numpy() + u[None, :] * delta
    neg_log2 = (0.5 * pts**2 / var + 0.5 * math.log(2 * math.pi * var)) / math.log(2)
    expected = neg_log2.mean() - math.log2(delta)
    # one dequantization draw per example against the bin average: the only randomness is u, whose
    # spread within each bin is known, so 4 of its standard errors bound the difference
    draw_se = math.sqrt(neg_log2.var(axis=1).sum()) / len(x)
    assert abs(r["bits_per_dim"] - expected) < 4 * draw_se
    assert draw_se < 0.01 and r["stderr"] > 0
