"""`unifusion calibrate` on a trained model: the file it writes, the spec's default grid for a
(sampler, NFE), `eval --grid calibrated`, and the errors for a grid used with another pair."""
import json

import pytest
import torch

from unifusion import config as C
from unifusion import models
from unifusion.cli import main
from unifusion.training import loop as L

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "run"
    cfg = C.from_dict({"data": "gmm", "network": "mlp-2d", "sampler": "dpmpp_2m",  # the default pair named below
                       "steps": 30, "batch_size": 64, "sample_every": 0,
                       "checkpoint_every": 30, "sample_nfe": 4, "warmup_steps": 5, "out": str(out),
                       "network_args": {"hidden": 32, "depth": 2, "emb_dim": 16}})
    threads = torch.get_num_threads()
    L.train(cfg, progress=False)
    torch.set_num_threads(threads)
    return out


def test_calibrate_writes_a_grid_that_sample_and_eval_use(run, tmp_path, capsys):
    assert main(["calibrate", "--checkpoint", str(run), "--sampler", "dpmpp_2m", "--nfe", "4", "--n-ref", "16",
                 "--n-val", "16", "--fit-labels", "0-3", "--val-labels", "4-7"]) == 0
    printed = capsys.readouterr().out
    path = run / "calibration" / "dpmpp_2m-nfe4.json"
    d = json.loads(path.read_text())
    assert d["sampler"] == "dpmpp_2m" and d["nfe"] == 4 and "calibrated" in d["rmse_val"]
    assert "held-out RMSE" in printed and "labels [4, 5, 6, 7]" in printed
    # sample with the file; the same file with another NFE is refused
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run), "--nfe", "4", "--n", "8", "--noise-grid", str(path),
                 "--out", str(npz)]) == 0
    assert main(["sample", "--checkpoint", str(run), "--nfe", "6", "--n", "8", "--noise-grid", str(path),
                 "--out", str(npz)]) == 2
    assert "calibrated for dpmpp_2m at NFE 4" in capsys.readouterr().err
    # eval finds it by (sampler, NFE), and says how to make a missing one
    assert main(["eval", "--checkpoint", str(run), "--nfe", "4", "--n", "50", "--grid", "karras,calibrated"]) == 0
    assert "| calibrated |" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--nfe", "5", "--n", "50", "--grid", "calibrated"]) == 2
    assert "unifusion calibrate --checkpoint RUN --sampler dpmpp_2m --nfe 5" in capsys.readouterr().err


def test_a_grid_saved_to_the_model_is_its_default_for_that_pair(run, tmp_path):
    import shutil
    model_dir = shutil.copytree(run / "model", tmp_path / "model")
    assert main(["calibrate", "--checkpoint", str(model_dir), "--sampler", "euler", "--nfe", "3", "--n-ref", "8",
                 "--n-val", "8", "--save-to-model", "--out", str(tmp_path / "c.json")]) == 0
    model = models.load(model_dir)
    cal = model.spec.calibration("euler", 3)
    assert cal is not None and model.spec.calibration("euler", 4) is None
    seen = []
    real = model.denoise

    def spy(x, sigma, **c):
        seen.append(float(sigma[0]))
        return real(x, sigma, **c)
    model.denoise = spy
    model.sample(seeds=range(4), sampler="euler", nfe=3)
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), cal.sigmas[:-1], rtol=1e-6, atol=0)
    seen.clear()
    model.sample(seeds=range(4), sampler="euler", nfe=3, grid="karras")  # an explicit grid wins
    assert seen != cal.sigmas[:-1].tolist()


def test_fitted_coefficients_travel_from_calibrate_to_sample_and_eval(run, tmp_path, capsys):
    """`calibrate --sampler fitted` fits the grid and the coefficients on a trained network (autograd
    through it); the file and the model's spec carry them, and sample / eval use them."""
    import shutil
    model_dir = shutil.copytree(run / "model", tmp_path / "model")
    out = tmp_path / "fitted.json"
    assert main(["calibrate", "--checkpoint", str(model_dir), "--sampler", "fitted", "--nfe", "4", "--n-ref", "16",
                 "--n-val", "16", "--save-to-model", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["sampler"] == "fitted" and len(d["coefficients"]) == 4
    assert d["rmse_val"]["calibrated"] < d["rmse_val"]["tuned"]
    cal = models.load(model_dir).spec.calibration("fitted", 4)
    assert cal.coefficients == d["coefficients"]
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(model_dir), "--sampler", "fitted", "--nfe", "4", "--n", "8",
                 "--noise-grid", str(out), "--out", str(npz)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(model_dir), "--sampler", "fitted", "--nfe", "4", "--n", "50",
                 "--grid", "tuned,calibrated"]) == 0
    assert "| calibrated |" in capsys.readouterr().out
