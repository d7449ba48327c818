"""A model's default sampler and NFE (issue 24): chosen per process by benchmarks/defaults.py, recorded
in the spec when a model is trained, used by model.sample() / `unifusion sample` when none is named,
with a grid calibrated for that pair when the spec stores one; older specs keep dpmpp_2m at NFE 20;
and `train --calibrate`, which fits that grid after training (resume-safe)."""
import json

import numpy as np
import pytest
import torch

from unifusion import config as C
from unifusion import data as datasets
from unifusion import models
from unifusion import processes as P
from unifusion.cli import main
from unifusion.models.spec import DEFAULT_SAMPLING, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"hidden": 16, "depth": 2, "emb_dim": 8}


def _spec(**kw) -> ModelSpec:
    cfg = C.from_dict({"data": "moons", "network": "mlp-2d", "out": "unused", "network_args": TINY, **kw})
    return C.model_spec(cfg, datasets.load("moons", n=64))


@pytest.mark.parametrize("process, param", [("edm", "edm"), ("ve", "eps"), ("vp", "eps"), ("subvp", "eps"),
                                            ("ddpm", "eps"), ("flow", "velocity")])
def test_a_new_model_records_its_process_default_sampler(process, param):
    spec = _spec(process=process, parametrization=param)
    name, nfe = P.PROCESSES[process]().default_sampling
    assert spec.training["sampling"] == {"name": name, "nfe": nfe, "chosen_by": "auto (benchmarks/defaults.py)"}
    assert spec.sampling_defaults() == (name, nfe)
    # the record survives the JSON round trip
    assert ModelSpec.from_dict(json.loads(spec.to_json())).sampling_defaults() == (name, nfe)


def test_measured_defaults_are_what_the_benchmark_chose():
    """BENCHMARKS.md "Default samplers and grids": the best geometric-mean score with a worst case
    within 3x, at NFE 20 (NFE 10 was worse on the trained toys for every process)."""
    want = {"edm": ("unipc", 20), "ve": ("unipc", 20), "vp": ("dpmpp_3m", 20), "subvp": ("dpmpp_3m", 20),
            "ddpm": ("dpmpp_3m", 20), "flow": ("ipndm", 20)}
    assert {k: tuple(P.PROCESSES[k]().default_sampling) for k in want} == want


def test_named_sampler_and_nfe_are_recorded_as_given():
    spec = _spec(sampler="heun", nfe=12)
    assert spec.training["sampling"] == {"name": "heun", "nfe": 12, "chosen_by": "--sampler, --nfe"}
    assert _spec(sampler="euler").sampling_defaults() == ("euler", 20)
    assert _spec(nfe=7).sampling_defaults() == ("unipc", 7)  # edm's measured sampler, the NFE given
    with pytest.raises(ValueError, match="--sampler 'nope' is not valid"):
        _spec(sampler="nope")
    with pytest.raises(ValueError, match="--nfe must be >= 0"):
        _spec(nfe=-1)
    with pytest.raises(ValueError, match="--calibrate fits the grid of a deterministic fixed-step sampler"):
        _spec(sampler="euler_ancestral", calibrate=True)


def test_an_old_spec_keeps_dpmpp_2m_at_20():
    """A spec written before the record existed samples exactly as before."""
    d = json.loads(_spec().to_json())
    del d["training"]["sampling"]
    old = ModelSpec.from_dict(d)
    assert old.sampling_defaults() == DEFAULT_SAMPLING == ("dpmpp_2m", 20)
    torch.manual_seed(0)
    model = models.build(old).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.sample(seeds=range(6)), model.sample(seeds=range(6), sampler="dpmpp_2m",
                                                                              nfe=20), rtol=0, atol=0)


def test_a_student_keeps_its_own_sampler():
    spec = _spec()
    spec.training["objective"] = {"name": "distill", "sampler": {"name": "euler", "nfe": 2}}
    assert spec.sampling_defaults() == ("euler", 2)


@pytest.mark.parametrize("record, match", [({"name": "nope", "nfe": 5, "chosen_by": "x"}, "unknown sampler"),
                                           ({"name": "euler", "nfe": 0, "chosen_by": "x"}, "NFE >= 1"),
                                           ({"name": "euler", "nfe": 5}, "must be")])
def test_a_bad_record_is_one_clear_error(record, match):
    d = json.loads(_spec().to_json())
    d["training"]["sampling"] = record
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_dict(d)


def _model(sampler="ipndm", nfe=7):
    spec = _spec()
    spec.training["sampling"] = {"name": sampler, "nfe": nfe, "chosen_by": "test"}
    torch.manual_seed(0)
    return models.build(spec.validate()).eval()


def test_sample_without_a_sampler_uses_the_recorded_one(tmp_path):
    model = _model("ipndm", 7)
    with torch.no_grad():
        own = model.sample(seeds=range(6))
        torch.testing.assert_close(own, model.sample(seeds=range(6), sampler="ipndm", nfe=7), rtol=0, atol=0)
        assert not torch.equal(own, model.sample(seeds=range(6), sampler="dpmpp_2m", nfe=20))
        # a named sampler without an NFE takes the model's NFE
        torch.testing.assert_close(model.sample(seeds=range(6), sampler="euler"),
                                   model.sample(seeds=range(6), sampler="euler", nfe=7), rtol=0, atol=0)
    # `unifusion sample` with no --sampler / --nfe: the same samples
    folder = models.save(model, tmp_path / "model")
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(folder), "--seeds", "0-5", "--out", str(npz)]) == 0
    np.testing.assert_array_equal(np.load(npz)["x"], own.numpy())


def test_default_sampling_uses_a_grid_calibrated_for_the_recorded_pair(tmp_path):
    model = _model("dpmpp_2m", 4)
    cal = model.calibrate(n_ref=8, n_val=4)
    assert (cal.sampler, cal.nfe) == ("dpmpp_2m", 4)
    model.spec.calibrated[models.spec.calibration_key("dpmpp_2m", 4)] = cal.to_dict()
    with torch.no_grad():
        own = model.sample(seeds=range(6))
        torch.testing.assert_close(own, model.sample(seeds=range(6), sampler="dpmpp_2m", nfe=4, grid=cal),
                                   rtol=0, atol=0)
        assert not torch.equal(own, model.sample(seeds=range(6), grid=model.spec.grid["name"]))
        # another range than the one calibrated on: the spec's grid
        hi = model.spec.sigma_range()[1]
        torch.testing.assert_close(model.sample(seeds=range(6), sigma_max=hi / 2),
                                   model.sample(seeds=range(6), sigma_max=hi / 2, grid=model.spec.grid["name"]),
                                   rtol=0, atol=0)


def test_a_model_folder_keeps_its_calibrations_only_for_the_same_weights(tmp_path):
    model = _model("dpmpp_2m", 3)
    folder = models.save(model, tmp_path / "m")
    spec = models.io.read(folder)[0]
    spec.calibrated["dpmpp_2m@3"] = model.calibrate(n_ref=4, n_val=2).to_dict()
    models.io.save_spec(folder, spec)
    models.save(model, folder)  # the same weights written again (a finished run resumed): kept
    assert "dpmpp_2m@3" in models.io.read(folder)[0].calibrated
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    models.save(model, folder)  # new weights: a grid fitted to the old ones is dropped
    assert models.io.read(folder)[0].calibrated == {}


# ------------------------------------------------------------------------------ train --calibrate
BASE = ["--data", "moons", "--steps", "6", "--batch-size", "32", "--warmup-steps", "1", "--sample-every", "0",
        "--threads", "1", "--nfe", "3"]
RUN = [*BASE, "--network", "mlp-2d", "--network.hidden", "16", "--network.depth", "2", "--network.emb_dim", "8"]


def test_train_calibrate_stores_the_default_grid_and_a_resume_keeps_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out), "--calibrate", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    spec = models.io.read(out / "model")[0]
    sampler, nfe = spec.sampling_defaults()
    assert (sampler, nfe) == ("unipc", 3) and list(spec.calibrated) == [f"{sampler}@{nfe}"]
    assert f"calibrate: {sampler} at NFE 3 in" in printed and "held-out RMSE" in printed
    fitted = spec.calibrated[f"{sampler}@{nfe}"]
    model = models.load(out)
    with torch.no_grad():  # default sampling takes it
        torch.testing.assert_close(model.sample(seeds=range(4)),
                                   model.sample(seeds=range(4), grid=spec.calibration(sampler, nfe)), rtol=0, atol=0)
    # resumed (a run begun with --overwrite resumes; finished, it writes its final outputs again), with and
    # without the flag: not fitted again
    assert main(["train", "--out", str(out), "--resume", "--calibrate"]) == 0
    assert "already holds the grid of unipc at NFE 3" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--calibrate", "false"]) == 0
    assert models.io.read(out / "model")[0].calibrated == {f"{sampler}@{nfe}": fitted}
    # trained further: new weights, fitted again
    assert main(["train", "--out", str(out), "--resume", "--steps", "8", "--calibrate"]) == 0
    again = models.io.read(out / "model")[0].calibrated
    assert list(again) == [f"{sampler}@{nfe}"] and again[f"{sampler}@{nfe}"] != fitted


@pytest.mark.parametrize("args, match", [
    ([*BASE, "--family", "flow-realnvp"], "--calibrate fits a sampler's noise grid"),
    ([*RUN, "--nfe", "500"], "--calibrate: a calibrated grid is for 1..100 denoiser calls"),
])
def test_train_calibrate_refuses_before_writing(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), "--calibrate"]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_train_calibrate_tries_a_looser_reference_then_keeps_the_model_uncalibrated(tmp_path, capsys, monkeypatch):
    """A reference solve that does not converge (a stiff learned denoiser) is tried again with the
    looser LOOSE_REFERENCE; failing that too, training's outputs stand, uncalibrated, exit 0."""
    from unifusion.models.diffusion import DiffusionModel
    from unifusion.samplers.calibrate import ReferenceNotConverged
    from unifusion.training import loop as L
    tried = []

    def stiff(self, *args, reference=None, **kw):
        tried.append(reference)
        raise ReferenceNotConverged("the reference solve did not reach sigma_min")
    monkeypatch.setattr(DiffusionModel, "calibrate", stiff)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out), "--calibrate"]) == 0
    printed = capsys.readouterr().out
    assert tried == [None, L.LOOSE_REFERENCE]
    assert "calibrate: not calibrated" in printed and "calibrated:   no" in printed
    assert models.io.read(out / "model")[0].calibrated == {}
